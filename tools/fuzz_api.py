"""Throw generated bad and extreme inputs at cdfast's public API and count the outcomes.

Every call must end in one of two ways: a clear error (``TypeError``/``ValueError`` whose
message starts with the argument's name as the user wrote it) or a finite result no worse
than naive compression. Anything else — another exception, a message that names nothing,
a non-finite or worse-than-naive result — is a defect, printed with the call that made it.

    python tools/fuzz_api.py --cases 3000 --seed 0                 # distill_layer
    python tools/fuzz_api.py --api compress --cases 300 --seed 0  # compress on small models
    python tools/fuzz_api.py --api cli --cases 200 --seed 0       # `cdfast compress` on the user's model

For ``compress`` a finite result is a student whose parameters and outputs on the
calibration data are finite, with no more parameters than the teacher.
"""
from __future__ import annotations

import argparse
import math
import random
import sys
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import cdfast  # noqa: E402
from test_robustness import ARGUMENTS, _NAMED  # noqa: E402

GOOD = dict(loss="cross", mu=0.6, compression=None, solver="auto", steps=5, lr=1e-3, momentum=0.9, form="auto",
            fit_bias=False, stats_dtype=torch.float32, damping=1e-6, backend="auto", strict=None, log_every=0)

BAD_VALUES = {
    "loss": ["l2", 3, None, "NC"], "mu": [-0.1, 1.5, float("nan"), "0.5", True],
    "solver": ["newton", 1, None], "steps": [0, -1, 2.5, "10", True, float("inf")],
    "lr": [0.0, -1.0, float("nan"), float("inf"), 1e300, 1e30, "1e-3", True],
    "momentum": [-0.5, 1.0, 5.0, float("nan"), float("inf"), "0.9"],
    "form": ["dense", 0], "fit_bias": ["no", 1, None], "stats_dtype": [torch.float16, torch.int32, "float32"],
    "damping": [-1.0, float("nan"), float("inf"), "1e-6"], "backend": ["gpu", 3], "strict": ["yes", 0],
    "log_every": [-3, "x", 1.5], "compression": ["prune", 3, [cdfast.ChannelPrune(0.5), cdfast.WeightPrune(0.5)],
                                                [cdfast.Quantize(4), cdfast.Quantize(2)]],
}
CONSTRAINT_BAD = [
    (cdfast.ChannelPrune, dict(keep=0.0)), (cdfast.ChannelPrune, dict(keep=1.5)), (cdfast.ChannelPrune, dict(keep="half")),
    (cdfast.ChannelPrune, dict(keep=0.5, ramp=-1)), (cdfast.ChannelPrune, dict(keep=0.5, lr_drop=0)),
    (cdfast.WeightPrune, dict(density=float("nan"))), (cdfast.WeightPrune, dict(density=2)),
    (cdfast.NMSparsity, dict(n=3, m=2)), (cdfast.NMSparsity, dict(n=0, m=4)), (cdfast.NMSparsity, dict(n=2.0, m=4)),
    (cdfast.Quantize, dict(bits=1)), (cdfast.Quantize, dict(bits=9)), (cdfast.Quantize, dict(bits=4.0)),
    (cdfast.Quantize, dict(bits=4, per_channel="no")), (cdfast.L1, dict(strength=-1)),
    (cdfast.L1, dict(strength=float("inf"))), (cdfast.GroupLasso, dict(strength="big")),
]
GOOD_COMPRESSIONS = [None, cdfast.ChannelPrune(0.5), cdfast.WeightPrune(0.3), cdfast.NMSparsity(1, 2),
                     cdfast.Quantize(2), cdfast.Quantize(4, per_channel=False), cdfast.L1(1e-3),
                     cdfast.GroupLasso(1e-2), [cdfast.ChannelPrune(0.5), cdfast.Quantize(4)],
                     [cdfast.WeightPrune(0.5), cdfast.Quantize(3)]]


def classify(fn) -> tuple[str, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn()
    except (TypeError, ValueError) as exc:
        m = _NAMED.match(str(exc))
        if m and all(n.strip() in ARGUMENTS for n in m.group(0)[:-1].split(",")):
            return "clear error", ""
        return "defect", f"unnamed {type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001
        return "defect", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=3)}"
    if out is None:
        return "finite result", ""
    res, compression = out
    for name in ("weight", "bias", "scale"):
        t = getattr(res, name)
        if t is not None and not bool(torch.isfinite(t).all()):
            return "defect", f"non-finite {name}"
    if res.weight.requires_grad:
        return "defect", "result weight carries a graph"
    if not all(math.isfinite(v) for v in (res.loss_after, res.loss_before, res.loss_teacher)):
        return "defect", "non-finite loss"
    items = compression if isinstance(compression, list) else [compression]
    if not any(isinstance(c, (cdfast.L1, cdfast.GroupLasso)) for c in items):
        if res.loss_after > res.loss_before * (1 + 1e-6) + 1e-30:
            return "defect", f"worse than naive: {res.loss_after} > {res.loss_before}"
    return "finite result", ""


def random_case(rng: random.Random):
    kind = rng.choice(["conv", "linear"])
    cin, cout = rng.randint(1, 6), rng.randint(1, 5)
    if kind == "conv":
        layer = nn.Conv2d(cin, cout, rng.choice([1, 3]), padding=rng.choice([0, 1]), bias=rng.random() < 0.5)
        shape = (rng.randint(1, 3), cin, rng.randint(1, 5), rng.randint(1, 5))
    else:
        layer = nn.Linear(cin, cout, bias=rng.random() < 0.5)
        shape = (rng.randint(1, 12), cin)
    mag = rng.choice([1e-30, 1e-12, 1.0, 1.0, 1e6, 1e18])
    h_t = torch.randn(shape) * mag
    h_s = h_t + rng.choice([0.0, 0.1, 1.0]) * mag * torch.randn(shape)
    kw = dict(GOOD, compression=rng.choice(GOOD_COMPRESSIONS), loss=rng.choice(["nc", "cross", "soft", "imitation"]),
              solver=rng.choice(["auto", "exact", "adam", "sgd"]), steps=rng.choice([1, 2, 7, 40]),
              lr=rng.choice([1e-12, 1e-3, 1e-1, 10.0]), form=rng.choice(["auto", "gram", "data"]),
              fit_bias=rng.random() < 0.3)
    r = rng.random()
    if r < 0.45:  # one bad argument
        name = rng.choice(sorted(BAD_VALUES))
        kw[name] = rng.choice(BAD_VALUES[name])
    elif r < 0.55:  # a bad tensor
        what = rng.choice(["nan", "inf", "shape", "dtype", "device-like", "empty", "grad"])
        if what == "nan":
            h_s = h_s.clone().view(-1).index_fill_(0, torch.tensor([0]), float("nan")).view(shape)
        elif what == "inf":
            h_t = h_t.clone().view(-1).index_fill_(0, torch.tensor([0]), float("inf")).view(shape)
        elif what == "shape":
            h_s = h_s[..., :1] if h_s.dim() > 1 else h_s
        elif what == "dtype":
            h_t = h_t.long()
        elif what == "device-like":
            h_t = h_t.numpy()
        elif what == "empty":
            h_t, h_s = h_t[:0], h_s[:0]
        else:
            h_s = h_s.clone().requires_grad_(True)
    elif r < 0.6:  # a non-finite teacher
        with torch.no_grad():
            layer.weight.view(-1)[0] = rng.choice([float("nan"), float("inf")])
    compression = kw["compression"]

    def call():
        return cdfast.distill_layer(layer, h_t, h_s, **kw), compression
    return call, f"{layer} {tuple(h_t.shape) if hasattr(h_t, 'shape') else type(h_t)} mag={mag:g} {kw}"


def constraint_cases():
    for cls, kw in CONSTRAINT_BAD:
        yield (lambda cls=cls, kw=kw: cls(**kw) and None), f"{cls.__name__}({kw})"
    for dtype in (torch.float16, "float", torch.int64):
        yield (lambda d=dtype: cdfast.LayerStatistics(nn.Linear(3, 2), dtype=d) and None), f"LayerStatistics(dtype={dtype})"
    yield (lambda: cdfast.LayerStatistics(nn.ReLU()) and None), "LayerStatistics(ReLU)"
    yield (lambda: cdfast.LayerStatistics(nn.Linear(3, 2)).G_TT and None), "empty statistics"


COMPRESS_ARGUMENTS = ARGUMENTS | {"teacher", "data", "policy", "prune_tied", "overrides", "batch_size", "fold_bn",
                                  "checkpoint", "progress", "verbose", "keep", "augment", "typo_kwarg"}
COMPRESS_BAD = {
    "loss": ["l2", None], "mu": [2.0, float("nan")], "solver": ["newton"], "steps": [0, "5"], "lr": [-1.0],
    "policy": ["first", 3], "prune_tied": ["no"], "overrides": [{"nope": {}}, {"0": {"action": "drop"}}, [1], {"0": 3}],
    "batch_size": [0, 2.5, "8"], "fold_bn": [None], "checkpoint": [3, ""], "progress": ["yes"],
    "compression": ["half", [cdfast.ChannelPrune(0.5), cdfast.WeightPrune(0.5)]], "typo_kwarg": [1],
}


class _Residual(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.head = nn.Linear(c, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.body(h))
        return self.head(h.mean((2, 3)))


def _small_model(rng: random.Random) -> tuple[nn.Module, tuple[int, ...]]:
    kind = rng.choice(["mlp", "cnn", "residual"])
    if kind == "mlp":
        d = rng.randint(2, 9)
        return nn.Sequential(nn.Linear(d, 6), nn.ReLU(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)), (d,)
    c = rng.randint(2, 6)
    if kind == "cnn":
        return nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c + 1, 3),
                             nn.ReLU(), nn.Flatten(), nn.LazyLinear(3)), (1, 6, 6)
    return _Residual(c), (1, 6, 6)


def random_compress_case(rng: random.Random):
    model, shape = _small_model(rng)
    n = rng.choice([1, 2, 5, 17])
    mag = rng.choice([1e-20, 1.0, 1.0, 1e6])
    data = torch.randn(n, *shape) * mag
    with torch.no_grad():
        model(data[:1])  # materialise lazy layers
    kw = dict(compression=rng.choice([None, cdfast.ChannelPrune(0.5), cdfast.Quantize(4), cdfast.WeightPrune(0.5),
                                      [cdfast.ChannelPrune(0.5), cdfast.Quantize(3)]]),
              loss=rng.choice(["nc", "cross", "auto"]), solver=rng.choice(["auto", "exact", "adam"]), steps=5,
              policy=rng.choice(["auto", "all", "skip_first"]), progress=False, verbose=False,
              batch_size=rng.choice([1, 4, 256]))
    r = rng.random()
    if r < 0.45:
        name = rng.choice(sorted(COMPRESS_BAD))
        kw[name] = rng.choice(COMPRESS_BAD[name])
    elif r < 0.6:
        what = rng.choice(["nan", "shape", "empty", "list", "none", "ints", "teacher"])
        if what == "nan":
            data[0].view(-1)[0] = float("nan")
        elif what == "shape":
            data = data[..., :1]
        elif what == "empty":
            data = data[:0]
        elif what == "list":
            data = [data, "x"]
        elif what == "none":
            data = None
        elif what == "ints":
            data = data.long()
        else:
            with torch.no_grad():
                next(model.parameters()).view(-1)[0] = float("inf")
    teacher, inputs = model.eval(), data

    def call():
        student, report = cdfast.compress(teacher, inputs, **kw)
        for name, p in student.named_parameters():
            if not bool(torch.isfinite(p).all()):
                raise AssertionError(f"student parameter {name} is not finite")
        with torch.no_grad():
            if not bool(torch.isfinite(student(inputs)).all()):
                raise AssertionError("student outputs are not finite")
        if report.params_after > report.params_before:
            raise AssertionError("the student has more parameters than the teacher")
        return None
    return call, f"{type(model).__name__} data={getattr(data, 'shape', type(data))} mag={mag:g} {kw}"


def classify_compress(fn) -> tuple[str, str]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn()
    except (TypeError, ValueError) as exc:
        m = _NAMED.match(str(exc).replace("overrides[", "overrides_"))
        first = str(exc).split(":")[0]
        if m or first.startswith("overrides["):
            names = [x.strip() for x in first.split(",")]
            if all(x in COMPRESS_ARGUMENTS or x.startswith("overrides[") for x in names):
                return "clear error", ""
        return "defect", f"unnamed {type(exc).__name__}: {exc}"
    except Exception as exc:  # noqa: BLE001
        return "defect", f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
    return "finite result", ""


CLI_MODULE = """
import torch, torch.nn as nn
def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)).eval()
def calibration():
    return torch.randn(12, 3, 8, 8)
def broken():
    raise RuntimeError("the user's factory fails")
"""
CLI_BAD = {
    "--keep": ["0", "1.5", "half", "nan"], "--density": ["-1", "x"], "--bits": ["1", "9", "4.5"], "--mu": ["2", "nan"],
    "--loss": ["l2"], "--solver": ["newton"], "--steps": ["0", "-3", "1e9x"], "--lr": ["0", "-1", "inf"],
    "--policy": ["first"], "--batch-size": ["0"], "--device": ["tpu", "cuda:99"], "--image-size": ["0", "8x"],
    "--k": ["0"], "--out": ["netmod.py"], "--output": ["missing/m.safetensors"], "--report": ["missing/r.json"],
    "--weights": ["missing.pt", "text.txt"], "--backend": ["gpu"],
}
CLI_BAD_DATA = ["missing.pt", "text.txt", "nan.pt", "shape.pt", "empty.pt", "ints.pt", "netmod:broken", "netmod:nothing",
                "no_such_module:fn", "."]


def _cli_files(root: Path) -> None:
    (root / "netmod.py").write_text(CLI_MODULE)
    (root / "text.txt").write_text("not a tensor")
    good = torch.randn(12, 3, 8, 8)
    torch.save(good, root / "good.pt")
    torch.save(good.clone().index_fill_(0, torch.tensor([0]), float("nan")), root / "nan.pt")
    torch.save(torch.randn(12, 5, 8, 8), root / "shape.pt")
    torch.save(torch.randn(0, 3, 8, 8), root / "empty.pt")
    torch.save(torch.randint(0, 9, (12, 3, 8, 8)), root / "ints.pt")


def random_cli_case(rng: random.Random):
    argv = ["compress", "netmod:build", "--data", rng.choice(["good.pt", "netmod:calibration"]),
            rng.choice(["--keep", "--bits", "--density"]), rng.choice(["0.5", "4"]), "--steps", "3",
            "--out", f"run{rng.randrange(10**9)}"]
    if argv[4] == "--keep":
        argv[5] = "0.5"
    if argv[4] == "--density":
        argv[5] = "0.5"
    r = rng.random()
    if r < 0.55:
        flag = rng.choice(sorted(CLI_BAD))
        argv += [flag, rng.choice(CLI_BAD[flag])]
    elif r < 0.8:
        argv[3] = rng.choice(CLI_BAD_DATA)
    elif r < 0.85:
        argv[1] = rng.choice(["netmod:broken", "netmod", "missing.safetensors", "text.txt"])
    return argv, " ".join(argv)


def classify_cli(argv) -> tuple[str, str]:
    import contextlib
    import io

    from cdfast import cli

    err, out = io.StringIO(), io.StringIO()
    try:
        with warnings.catch_warnings(), contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            warnings.simplefilter("ignore")
            rc = cli.main(argv)
    except BaseException as exc:  # noqa: BLE001 - anything escaping main is a traceback for the user
        return "defect", f"{type(exc).__name__} escaped: {exc}"
    text = err.getvalue()
    if "Traceback" in text:
        return "defect", "a traceback on stderr"
    if rc == 0:
        return "finite result", ""
    last = text.strip().splitlines()[-1] if text.strip() else ""
    if rc == 2 and ": error: " in last:
        return "clear error", ""
    return "defect", f"rc={rc}, stderr: {text[-300:]!r}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api", choices=["distill_layer", "compress", "cli"], default="distill_layer")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    torch.manual_seed(args.seed)
    counts: Counter = Counter()
    defects = []
    if args.api == "cli":
        import os
        import tempfile

        root = Path(tempfile.mkdtemp(prefix="cdfast-fuzz-cli-"))
        _cli_files(root)
        os.chdir(root)
        sys.path.insert(0, str(root))
        cases, judge = [random_cli_case(rng) for _ in range(args.cases)], classify_cli
    elif args.api == "compress":
        cases, judge = [random_compress_case(rng) for _ in range(args.cases)], classify_compress
    else:
        cases, judge = list(constraint_cases()), classify
        cases += [random_case(rng) for _ in range(args.cases - len(cases))]
    for fn, desc in cases:
        outcome, why = judge(fn)
        counts[outcome] += 1
        if outcome == "defect":
            defects.append((desc, why))
    print(f"{sum(counts.values())} calls: {counts['clear error']} clear errors, "
          f"{counts['finite result']} finite results{' no worse than naive' if args.api == 'distill_layer' else ''}, {counts['defect']} defects")
    for desc, why in defects[:40]:
        print(f"- {desc}\n  {why}")
    return 1 if defects else 0


if __name__ == "__main__":
    raise SystemExit(main())
