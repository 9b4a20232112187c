"""The paper's experiment on Fashion-MNIST: methods × few-shot sizes × seeds.

``run_experiment`` trains (or loads from the cache) a teacher, draws K samples per
class for each seed, compresses with every method, and measures top-1 accuracy on
the full 10,000-image test set. ``write_outputs`` turns the rows into a Markdown
table (mean ± std over seeds), a CSV of every run and a plot of accuracy against K.

Tasks:
    ``channel``  remove half of the compressible input channels (ResNet: the
                 block-internal ones; VGG: every conv but the first), physically;
    ``weight``   unstructured pruning to 30 % density (first conv kept dense);
    ``w4``/``w2`` 4-/2-bit weights with a per-channel scale (first conv and
                 classifier kept in full precision, as is customary).

A cross-distillation method (``nc``, ``cross``, ``soft``, ``auto``) takes options
after ``+`` (:func:`parse_method`): ``auto+flip+shift`` compresses with
``augment="flip+shift"``, ``+bias`` fits each layer's bias (``fit_bias=True``),
``+bn`` re-estimates the student's BatchNorm statistics on the (augmented) samples
afterwards, ``+bndrift`` corrects them by the student's drift from the teacher on
those samples (:func:`recalibrate_batchnorm`), and ``+ridge1e-2`` solves with
``damping=1e-2``, a ridge pulling each layer towards the teacher's weights;
``+normsel`` selects channels on the error after each consumer's BatchNorm
(``select_on="norm"``), and ``+blocks`` refines every block after the layer-wise
pass (``refine_steps=500``, :mod:`cdfast.model.refine`).
"""
from __future__ import annotations

import csv
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from . import baselines
from ..model.compress import compress
from ..layer.constraints import Quantize, WeightPrune
from .data import few_shot, load_fashion_mnist
from .models import count_parameters
from .train import evaluate, train_teacher

__all__ = ["run_experiment", "write_outputs", "read_rows", "parse_method", "recalibrate_batchnorm", "METHODS",
           "TASKS", "OPTIONS"]

TASKS = ("channel", "weight", "w4", "w2")
LABELS = {"teacher": "Teacher", "l1": "L1-norm", "bp": "BP", "fitnet": "FitNet", "fskd": "FSKD",
          "thinet": "ThiNet", "cp": "CP", "naive": "No reconstruction", "nc": "Ours-NC", "cross": "Ours",
          "soft": "Ours-S", "auto": "Ours-auto"}
METHODS = {
    "channel": ("teacher", "l1", "bp", "fskd", "thinet", "cp", "nc", "cross", "soft", "auto"),
    "weight": ("teacher", "naive", "nc", "cross", "soft", "auto"),
    "w4": ("teacher", "naive", "nc", "cross", "soft", "auto"),
    "w2": ("teacher", "naive", "nc", "cross", "soft", "auto"),
}


#: What may follow a cross-distillation method after ``+`` (see the module docstring).
OPTIONS = ("flip", "shift", "mix", "bias", "bn", "bndrift", "normsel", "alloc", "blocks", "ridge<δ>")
FITTED = ("nc", "cross", "soft", "auto")


def parse_method(method: str) -> tuple[str, dict, tuple[str, ...]]:
    """``"auto+flip+bias"`` → ``("auto", {"augment": "flip", "fit_bias": True}, ())``: the
    base method, :func:`cdfast.compress`'s extra keywords, and the BatchNorm step after it."""
    base, *opts = str(method).split("+")
    if not opts:
        if base not in LABELS:
            raise ValueError(f"methods: unknown [{method!r}]; expected some of {sorted(LABELS)} "
                             f"(or one of {list(FITTED)} with options +{'+'.join(OPTIONS)})")
        return base, {}, ()
    ridges = [o for o in opts if o.startswith("ridge")]
    if base not in FITTED or any(o not in OPTIONS and o not in ridges for o in opts) or len(set(opts)) < len(opts) \
            or {"bn", "bndrift"} <= set(opts) or len(ridges) > 1 or not all(_ridge(o) for o in ridges):
        raise ValueError(f"methods: {method!r} is not one of {list(FITTED)} followed by distinct options "
                         f"from {list(OPTIONS)} (at most one of bn, bndrift)")
    kw: dict = {}
    augment = "+".join(o for o in ("flip", "shift", "mix") if o in opts)
    if augment:
        kw["augment"] = augment
    if "bias" in opts:
        kw["fit_bias"] = True
    if "normsel" in opts:
        kw["select_on"] = "norm"
    if "alloc" in opts:  # the uniform plan's parameter count, spent unevenly across the groups
        kw["target"] = "params"
    if "blocks" in opts:
        from ..model.refine import REFINE_STEPS

        kw["refine_steps"] = REFINE_STEPS
    if ridges:
        kw["damping"] = _ridge(ridges[0])
    return base, kw, tuple(o for o in opts if o in ("bn", "bndrift"))


def _ridge(option: str) -> float | None:
    try:
        value = float(option[len("ridge"):])
    except ValueError:
        return None
    return value if 0 < value < 1e3 else None


def label(method: str) -> str:
    base, *opts = method.split("+")
    return " + ".join([LABELS[base], *opts])


def recalibrate_batchnorm(teacher: nn.Module, student: nn.Module, x: torch.Tensor, drift: bool) -> nn.Module:
    """Re-estimate the student's BatchNorm statistics on ``x``, in execution order (each
    from the student as already corrected up to it).

    ``drift=False``: the running mean and variance become the student's batch statistics.
    ``drift=True``: they become the teacher's running statistics corrected by the
    student's drift on ``x``: ``mean_S − mean_T`` added to the mean, the variance scaled
    by ``var_S / var_T`` (the sampling error of ``x``'s statistics is common to both)."""
    from ..model.walk import capture_input, execution_order

    _, leaves = execution_order(student, x[:1])
    bns = [n for n in dict.fromkeys(leaves) if isinstance(student.get_submodule(n), nn.BatchNorm2d)]
    for name in bns:
        bn_s, bn_t = student.get_submodule(name), teacher.get_submodule(name)
        h_s = capture_input(lambda: student(x), bn_s)
        mean_s, var_s = h_s.mean((0, 2, 3)), h_s.var((0, 2, 3), unbiased=False)
        if drift:
            h_t = capture_input(lambda: teacher(x), bn_t)
            kept = _kept_channels(bn_t, bn_s)
            mean_t, var_t = h_t.mean((0, 2, 3))[kept], h_t.var((0, 2, 3), unbiased=False)[kept]
            mean = bn_t.running_mean[kept] + mean_s - mean_t
            var = bn_t.running_var[kept] * var_s / var_t.clamp_min(1e-12)
        else:
            mean, var = mean_s, var_s
        with torch.no_grad():
            bn_s.running_mean.copy_(mean)
            bn_s.running_var.copy_(var)
    return student


def _kept_channels(bn_t: nn.BatchNorm2d, bn_s: nn.BatchNorm2d) -> torch.Tensor:
    """The teacher's channels a shrunk student BatchNorm kept (surgery copies their affine
    parameters and statistics unchanged, so they are found by value)."""
    if bn_s.num_features == bn_t.num_features:
        return torch.arange(bn_t.num_features)
    key_t = torch.stack([bn_t.weight, bn_t.bias, bn_t.running_mean, bn_t.running_var], 1).detach()
    key_s = torch.stack([bn_s.weight, bn_s.bias, bn_s.running_mean, bn_s.running_var], 1).detach()
    match = (key_s[:, None, :] == key_t[None, :, :]).all(-1)
    if not bool((match.sum(1) == 1).all()):
        raise RuntimeError("recalibrate_batchnorm: cannot tell which teacher channels a student BatchNorm kept")
    return match.float().argmax(1)


@dataclass
class Row:
    model: str
    task: str
    method: str
    k: int
    seed: int
    accuracy: float
    params: int
    seconds: float


def _mu(model_name: str) -> float:
    return 0.9 if model_name.startswith("resnet") else 0.6  # the authors' settings


def _run_method(method: str, task: str, model_name: str, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor,
                solver: str, steps: int, seed: int) -> nn.Module:
    policy = "resnet" if model_name.startswith("resnet") else "skip_first"
    mu = _mu(model_name)
    base, kw, after = parse_method(method)
    if task == "channel":
        student = baselines.run(base, teacher, x, keep=0.5, labels=y, policy=policy, steps=steps, seed=seed,
                                solver=solver, mu=mu, **kw)[0]
    elif base == "naive":
        return naive_compress(teacher, WeightPrune(0.3) if task == "weight" else Quantize(4 if task == "w4" else 2))
    else:
        comp = WeightPrune(0.3) if task == "weight" else Quantize(4 if task == "w4" else 2)
        student, _ = compress(teacher, x, compression=comp, loss=base, mu=mu, policy="skip_first", solver=solver,
                              steps=steps, progress=False, verbose=False, **kw)
    if after:
        from ..model.augment import views

        recalibrate_batchnorm(teacher, student, views(x, kw.get("augment")), drift=after[0] == "bndrift")
    return student


def naive_compress(teacher: nn.Module, comp, layers: list[str] | None = None) -> nn.Module:
    """The constraint applied to the teacher's weights with no fitting: magnitude
    pruning, or rounding to the grid with a max-abs per-channel scale. ``layers``
    names the Conv2d/Linear layers to compress (default: every conv but the first,
    as in the fitted runs)."""
    import copy

    from ..layer.constraints import quantize, topk_mask

    student = copy.deepcopy(teacher)
    if layers is None:
        convs = [m for m in student.modules() if isinstance(m, nn.Conv2d)][1:]
    else:
        convs = [student.get_submodule(n) for n in layers]
    with torch.no_grad():
        for conv in convs:
            w = conv.weight
            if isinstance(comp, WeightPrune):
                w.mul_(topk_mask(w.abs(), int(comp.density * w.numel() + 1e-9)))
            else:
                scale = w.abs().flatten(1).amax(1).clamp_min(1e-12).view(-1, *[1] * (w.dim() - 1))
                w.copy_(quantize(w, scale, comp.bits)[1])
    return student


def read_rows(path: str | os.PathLike) -> list[Row]:
    """The rows of a ``results.csv`` written by :func:`run_experiment` or :func:`write_outputs`."""
    with open(path, newline="") as f:
        records = list(csv.DictReader(f))
    rows = []
    for i, r in enumerate(records):
        try:
            rows.append(Row(r["model"], r["task"], r["method"], int(r["k"]), int(r["seed"]), float(r["accuracy"]),
                            int(r["params"]), float(r["seconds"])))
        except (KeyError, TypeError, ValueError) as exc:
            if i == len(records) - 1:  # the row being written when a run was killed: measured again
                warnings.warn(f"{path}: ignoring the incomplete last row {i + 2} (a run killed while writing "
                              "it); it is measured again", stacklevel=2)
                break
            raise ValueError(f"{path}: row {i + 2} is damaged ({exc}); fix or delete that line") from None
    return rows


def _append_row(path: str, row: Row) -> None:
    _drop_partial_line(path)
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(row)))
        if new:
            w.writeheader()
        w.writerow(asdict(row))
        f.flush()
        os.fsync(f.fileno())


def _drop_partial_line(path: str) -> None:
    """Cut a last line without its newline (a run killed while writing it), so the next
    row starts on a line of its own."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def _check_settings(csv_path, settings: dict) -> None:
    """Rows in one CSV must come from one set of settings: the first run records them
    beside the CSV (``<name>.settings.json``) and a resume with others is refused."""
    import json

    path = os.path.splitext(str(csv_path))[0] + ".settings.json"
    if os.path.exists(path):
        with open(path) as f:
            recorded = json.load(f)
        if recorded != settings:
            raise ValueError(f"csv_path: {csv_path} holds rows measured with {recorded}, not {settings}; "
                             "write to another folder (--out) or delete it")
        return
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(settings, f, indent=1)


def run_experiment(models=("resnet20",), tasks=("channel",), ks=(1, 2, 5, 10), seeds=(0, 1, 2),
                   methods: dict | None = None, solver: str = "exact", steps: int = 3000, epochs: int = 3,
                   test_limit: int | None = None, data_root: str | None = None, log=print,
                   csv_path: str | os.PathLike | None = None, teacher_options: dict | None = None) -> list[Row]:
    """Run the grid; returns one :class:`Row` per (model, task, method, K, seed).

    Args:
        methods: task → methods to run (default :data:`METHODS`); a plain sequence of
            method names keeps, for every task, those of its default methods.
        csv_path: where each row is appended (and flushed) as soon as it is measured.
            Rows already in that file are not run again, so an experiment that was
            interrupted resumes where it stopped; the returned list holds the old rows
            of the requested grid as well as the new ones. The solver, steps, epochs
            and test limit are recorded beside it, and resuming with others raises
            ``ValueError``.
        teacher_options: extra keyword arguments of :func:`cdfast.experiments.train.train_teacher`
            (``cache_dir``, ``max_train``, …).
    """
    if methods is not None and not isinstance(methods, dict):
        chosen = list(methods)
        bases = {m: parse_method(m)[0] for m in chosen}  # validates every name
        # a task runs its default methods that were chosen, then the chosen variants of them
        methods = {t: tuple(m for m in METHODS[t] if m in chosen)
                   + tuple(m for m in chosen if m != bases[m] and bases[m] in METHODS[t]) for t in TASKS}
    unknown_tasks = sorted(set(tasks) - set(TASKS))
    if unknown_tasks:
        raise ValueError(f"tasks: unknown {unknown_tasks}; expected some of {list(TASKS)}")
    done: dict[tuple, Row] = {}
    if csv_path is not None:
        _check_settings(csv_path, {"solver": solver, "steps": steps, "epochs": epochs, "test_limit": test_limit})
        if os.path.exists(csv_path) and os.path.getsize(csv_path) > 0:
            done = {(r.model, r.task, r.method, r.k, r.seed): r for r in read_rows(csv_path)}
    train = load_fashion_mnist("train", data_root)
    test = load_fashion_mnist("test", data_root)
    if test_limit:
        test = torch.utils.data.TensorDataset(*(t[:test_limit] for t in test.tensors))
    rows: list[Row] = []
    for model_name in models:
        teacher, acc_t = None, None
        for task in tasks:
            for k in ks:
                for seed in seeds:
                    shot = few_shot(train, k, seed=seed)
                    x, y = shot.tensors
                    for method in (methods or METHODS)[task]:
                        key = (model_name, task, method, k, seed)
                        if key in done:
                            rows.append(done[key])
                            continue
                        if teacher is None:  # only when something is left to run
                            teacher = train_teacher(model_name, epochs=epochs, root=data_root,
                                                    **(teacher_options or {})).eval()
                            acc_t = evaluate(teacher, test)
                            log(f"teacher {model_name}: {acc_t:.2f}% on {len(test)} test images")
                        t0 = time.perf_counter()
                        if method == "teacher":
                            model, acc = teacher, acc_t
                        else:
                            torch.manual_seed(seed)
                            model = _run_method(method, task, model_name, teacher, x, y, solver, steps, seed)
                            acc = evaluate(model.eval(), test)
                        rows.append(Row(model_name, task, method, k, seed, acc, count_parameters(model),
                                        time.perf_counter() - t0))
                        log(f"{model_name:10s} {task:8s} K={k:<3d} seed={seed} {label(method):18s} "
                            f"{acc:6.2f}%  {rows[-1].params:8d} params  {rows[-1].seconds:6.1f}s")
                        if csv_path is not None:
                            _append_row(str(csv_path), rows[-1])
    return rows


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    s = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, s


def summarize(rows: list[Row]) -> dict:
    """(model, task, method) → {K: (mean, std, n, params, seconds)}."""
    groups: dict = {}
    for r in rows:
        groups.setdefault((r.model, r.task, r.method), {}).setdefault(r.k, []).append(r)
    out = {}
    for key, by_k in groups.items():
        out[key] = {}
        for k, rs in sorted(by_k.items()):
            m, s = _mean_std([r.accuracy for r in rs])
            out[key][k] = (m, s, len(rs), rs[0].params, sum(r.seconds for r in rs) / len(rs))
    return out


def _cell(stat: tuple, n_full: int) -> str:
    mean, std, n = stat[:3]
    return f"{mean:.2f} ± {std:.2f}" + (f" (n={n})" if n < n_full else "")  # a cell with fewer seeds says so


def _panels(rows: list[Row]):
    """``(model, task, {method: {K: stats}})`` per (model, task), in the rows' order."""
    summ = summarize(rows)
    for model, task in dict.fromkeys((r.model, r.task) for r in rows):
        yield model, task, {m: by_k for (m_, t_, m), by_k in summ.items() if (m_, t_) == (model, task)}


def markdown(rows: list[Row]) -> str:
    """One table per (model, task): mean ± std over seeds for each method and K."""
    lines = []
    for model, task, panel in _panels(rows):
        ks = sorted({k for by_k in panel.values() for k in by_k})
        n_full = max(v[2] for by_k in panel.values() for v in by_k.values())
        lines.append(f"\n### {model}, {task}\n")
        lines.append("| method | params | " + " | ".join(f"K={k}" for k in ks) + " | seconds |")
        lines.append("| --- | --- | " + " | ".join("---" for _ in ks) + " | --- |")
        for method, by_k in panel.items():
            cells = [_cell(by_k[k], n_full) if k in by_k else "" for k in ks]
            params = next(iter(by_k.values()))[3]
            secs = sum(v[4] for v in by_k.values()) / len(by_k)
            lines.append(f"| {label(method)} | {params:,} | " + " | ".join(cells) + f" | {secs:.1f} |")
    return "\n".join(lines) + "\n"


def write_outputs(rows: list[Row], out_dir: str) -> dict:
    """Write ``results.csv``, ``results.md`` and one ``accuracy_<model>_<task>.png`` per panel."""
    if not rows:
        raise ValueError("rows: expected at least one measured row, got none")
    os.makedirs(out_dir, exist_ok=True)
    paths = {"csv": os.path.join(out_dir, "results.csv"), "md": os.path.join(out_dir, "results.md")}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(asdict(rows[0])))
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))
    with open(paths["md"], "w") as f:
        f.write(markdown(rows))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for model, task, panel in _panels(rows):
        # the right panel zooms on the methods within 15 points of the best student
        best = max((v[0] for m, by_k in panel.items() if m != "teacher" for v in by_k.values()), default=0.0)
        close = {m for m, by_k in panel.items() if min(v[0] for v in by_k.values()) >= best - 15.0}
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for ax, members, title in ((axes[0], set(panel), "all methods"),
                                   (axes[1], close, "within 15 points of the best")):
            for i, (method, by_k) in enumerate(panel.items()):
                if method not in members:
                    continue
                ks = sorted(by_k)
                ax.errorbar(ks, [by_k[k][0] for k in ks], yerr=[by_k[k][1] for k in ks], marker="o", capsize=3,
                            label=label(method), color=f"C{i % 10}",
                            linestyle="--" if method == "teacher" else "-")
            ax.set_xscale("log")
            ax.set_xticks(sorted({r.k for r in rows}))
            ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.set_xlabel("samples per class (K)")
            ax.set_title(title, fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7, ncol=2)
        axes[0].set_ylabel("top-1 accuracy on the test set (%)")
        fig.suptitle(f"Fashion-MNIST, {model}, {task}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"accuracy_{model}_{task}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths[f"{model}_{task}"] = path
    return paths
