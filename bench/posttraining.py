"""cdfast's exact solver against GPTQ and SparseGPT on the layer sizes users have.

    python -m bench.posttraining --threads 1              # the full table (about 40 min here)
    python -m bench.posttraining --quick                  # the two smallest layers, one repeat (tests)
    python -m bench.posttraining --only linear_768 --repeats 5
    python -m bench.posttraining --only 768x768 --tasks 50% --adam   # with cdfast's Adam

Every layer is bias-free, its teacher weight drawn once (Laplace entries, a log-normal
scale per output channel); its inputs come from a fixed random feature model, so that
calibration and held-out rows are drawn the same way:

* Linear: ``x = (z ⊙ s)·Mᵀ/√D + 0.05·ε + μ``, ``s`` log-spaced from 1 to 10^-1.5 (a decaying
  spectrum), ``M`` a fixed Gaussian mixing matrix, ``μ`` a fixed offset, and 1 % of the
  features scaled ×6 (outlier channels);
* Conv 3×3: a quarter as many latent channels, smoothed over 3×3 pixels, mixed into the
  channels, plus noise and a per-channel offset, through a ReLU (post-activation maps).

The teacher's and the student's inputs are equal (``E = 0``), so every loss of cdfast's
family is the plain reconstruction ``‖W·X − W₀·X‖²`` the peers minimise. Errors are
relative, ``‖(W − W₀)·X‖²/‖W₀·X‖²`` in float64, on the calibration rows and on as many
held-out rows. Times are wall clock with the statistics included (the peers build
``H = X·Xᵀ`` from the same inputs; cdfast runs ``distill_layer`` on them), medians of
repeats taken round-robin over the implementations of a case so that a change in the
machine's load falls on all of them (a case where one call takes more than
``LONG_CALL_S`` is timed once, by its first calls).

Tasks and implementations (one CSV row each, ``bench/results/posttraining.csv``):

* ``W2``, ``W4`` (per-channel grid ``s·{0, ±1/L, …, ±1}``): ``gptq`` (scale ``max|w|``),
  ``gptq_act`` (act-order), ``gptq_clip`` (its clipping search), ``gptq_clip_act``, and
  ``cdfast`` (``Quantize``, ``solver="exact"``). The ratios compare with GPTQ with its
  clipping search: the faster of its two variants for the time, the better for the error.
* ``50%`` and ``2:4``: ``sparsegpt`` and ``cdfast`` (``WeightPrune(0.5)``, ``NMSparsity(2, 4)``).
* ``channel`` (half the input channels): ``cdfast`` (the greedy selection and its solve)
  against one plain GPTQ pass (``gptq_pass``, W4) on the same layer.
* ``cdfast_adam`` (the authors' Adam, 3000 steps) on the two smallest layers with
  ``--adam``, for the choice of ``solver="auto"`` (minutes per layer: off by default).

The peers are in :mod:`bench.peers` (written from the papers, not the library).
"""
from __future__ import annotations

import argparse
import math
import statistics as st
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import harness as Hn
from . import peers

import cdfast

OUT = Hn.REPO / "bench" / "results" / "posttraining.csv"

COLUMNS = ["run_id", "case", "kind", "c_in", "c_out", "kernel", "rows", "cols", "task", "impl", "status",
           "repeats", "median_s", "min_s", "calib_err", "heldout_err", "peer", "peer_time_s", "peer_heldout_err",
           "ratio_time_vs_peer", "ratio_heldout_vs_peer", "solver", "form", "torch_threads", "cpu_model",
           "torch_version", "git", "loadavg_1m", "timestamp", "note"]

TASKS = ("W2", "W4", "50%", "2:4", "channel")
#: Calls longer than this (seconds) are timed once, by the first call (see run_case).
LONG_CALL_S = 20.0
QUANT_PEERS = ("gptq", "gptq_act", "gptq_clip", "gptq_clip_act")


@dataclass(frozen=True)
class Case:
    name: str
    kind: str       # "linear" or "conv"
    c_in: int
    c_out: int
    rows: int       # calibration rows (linear) or samples (conv)
    hw: int = 0     # conv input size
    adam: bool = False

    @property
    def k(self) -> int:
        return 3 if self.kind == "conv" else 1


CASES = (
    Case("linear_768x768", "linear", 768, 768, 2048, adam=True),
    Case("linear_768x3072", "linear", 768, 3072, 2048),
    Case("linear_4096x4096", "linear", 4096, 4096, 2048),
    Case("conv_64x64_3x3", "conv", 64, 64, 32, hw=16, adam=True),
    Case("conv_256x256_3x3", "conv", 256, 256, 32, hw=16),
)


# ------------------------------------------------------------------- the data
class LinearInputs:
    """Correlated features with a decaying spectrum, an offset and outlier channels."""

    def __init__(self, d: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.g, self.d = g, d
        self.s = torch.logspace(0, -1.5, d)
        self.mix = torch.randn(d, d, generator=g) / math.sqrt(d)
        self.mu = 0.3 * torch.randn(d, generator=g)
        self.gain = torch.ones(d)
        self.gain[torch.randperm(d, generator=g)[: max(1, d // 100)]] = 6.0

    def draw(self, n: int) -> torch.Tensor:
        z = torch.randn(n, self.d, generator=self.g) * self.s
        return (z @ self.mix.T + 0.05 * torch.randn(n, self.d, generator=self.g) + self.mu) * self.gain


class ConvInputs:
    """Post-ReLU feature maps: smoothed latent channels mixed into ``c`` channels."""

    def __init__(self, c: int, hw: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.g, self.c, self.hw = g, c, hw
        self.latent = max(4, c // 4)
        self.mix = torch.randn(c, self.latent, generator=g) / math.sqrt(self.latent)
        self.bias = 0.3 * torch.randn(c, generator=g)

    def draw(self, n: int) -> torch.Tensor:
        z = torch.randn(n, self.latent, self.hw, self.hw, generator=self.g)
        z = F.avg_pool2d(z, 3, 1, 1) * 3
        x = torch.einsum("cl,nlhw->nchw", self.mix, z)
        x = x + 0.2 * torch.randn(n, self.c, self.hw, self.hw, generator=self.g)
        return torch.relu(x + self.bias[None, :, None, None])


def teacher_weight(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Laplace entries with a log-normal scale per output channel, ``(rows, cols)``."""
    g = torch.Generator().manual_seed(seed)
    u = (torch.rand(rows, cols, generator=g) - 0.5).clamp(-0.4999999, 0.4999999)
    w = -torch.sign(u) * torch.log1p(-2 * u.abs())
    return w * torch.exp(0.3 * torch.randn(rows, 1, generator=g)) / math.sqrt(2 * cols)


@dataclass
class Prepared:
    case: Case
    layer: nn.Module
    h: torch.Tensor        # calibration inputs
    X: torch.Tensor        # their unfolded form (D, M), for the errors
    Xh: torch.Tensor       # held-out rows, unfolded
    A: torch.Tensor        # teacher matrix (R, D)


def prepare(case: Case, seed: int = 0) -> Prepared:
    if case.kind == "linear":
        layer = nn.Linear(case.c_in, case.c_out, bias=False)
        src = LinearInputs(case.c_in, seed)
        h, hh = src.draw(case.rows), src.draw(case.rows)
        X, Xh = h.t().contiguous(), hh.t().contiguous()
    else:
        layer = nn.Conv2d(case.c_in, case.c_out, 3, padding=1, bias=False)
        src = ConvInputs(case.c_in, case.hw, seed)
        h, hh = src.draw(case.rows), src.draw(case.rows)
        X, Xh = _unfold(h), _unfold(hh)
    D = X.shape[0]
    A = teacher_weight(case.c_out, D, seed + 1)
    with torch.no_grad():
        layer.weight.copy_(A.reshape(layer.weight.shape))
    return Prepared(case, layer, h, X, Xh, A)


def _unfold(h: torch.Tensor) -> torch.Tensor:
    cols = F.unfold(h, 3, padding=1)  # (N, C·9, L)
    return cols.permute(1, 0, 2).reshape(cols.shape[1], -1)


def rel_err(A: torch.Tensor, W: torch.Tensor, X: torch.Tensor) -> float:
    A64, X64 = A.double(), X.double()
    Y = A64 @ X64
    return float(((W.double() - A64) @ X64).pow(2).sum() / Y.pow(2).sum())


# ----------------------------------------------------------- the implementations
def _hessian(p: Prepared) -> torch.Tensor:
    """The peers' statistics: ``H = X·Xᵀ`` from the layer inputs (unfolded for a conv)."""
    X = p.h.t() if p.case.kind == "linear" else _unfold(p.h)
    return X @ X.t()


def _compression(task: str):
    return {"W2": cdfast.Quantize(2), "W4": cdfast.Quantize(4), "50%": cdfast.WeightPrune(0.5),
            "2:4": cdfast.NMSparsity(2, 4), "channel": cdfast.ChannelPrune(0.5)}[task]


def make_fn(p: Prepared, task: str, impl: str):
    """A zero-argument callable returning ``(W (R, D), info)``."""
    if impl.startswith("gptq") or impl == "gptq_pass":
        bits = 4 if impl == "gptq_pass" else int(task[1])
        act, clip = "act" in impl, "clip" in impl

        def fn():
            return peers.gptq(p.A, _hessian(p), bits, act_order=act, clip_search=clip)[0], {}
    elif impl == "sparsegpt":
        def fn():
            H = _hessian(p)
            if task == "2:4":
                return peers.sparsegpt(p.A, H, nm=(2, 4), taps=p.case.k ** 2), {}
            return peers.sparsegpt(p.A, H, density=0.5), {}
    elif impl in ("cdfast", "cdfast_adam"):
        kw = dict(compression=_compression(task), solver="exact" if impl == "cdfast" else "adam")

        def fn():
            r = cdfast.distill_layer(p.layer, p.h, p.h, **kw)
            return r.weight.detach().reshape(p.A.shape), {"solver": r.solver, "form": r.form}
    else:
        raise ValueError(f"impl: unknown implementation {impl!r}")
    return fn


def impls_for(case: Case, task: str, adam: bool = False) -> list[str]:
    if task in ("W2", "W4"):
        out = list(QUANT_PEERS) + ["cdfast"]
    elif task == "channel":
        out = ["gptq_pass", "cdfast"]
    else:
        out = ["sparsegpt", "cdfast"]
    if adam and case.adam and task in ("50%", "2:4"):
        out.append("cdfast_adam")
    return out


def peer_of(task: str, rows: dict) -> tuple[str, str]:
    """``(time peer, error peer)``: GPTQ with its clipping search (the faster of the act-order
    and plain variants for the time, the better for the error), SparseGPT, one GPTQ pass."""
    if task in ("W2", "W4"):
        ok = [rows[i] for i in ("gptq_clip", "gptq_clip_act") if rows.get(i, {}).get("status") == "ok"]
        t = min(ok, key=lambda r: r["median_s"])["impl"] if ok else "gptq_clip_act"
        e = min(ok, key=lambda r: r["heldout_err"])["impl"] if ok else "gptq_clip_act"
        return t, e
    if task == "channel":
        return "gptq_pass", "gptq_pass"
    return "sparsegpt", "sparsegpt"


# -------------------------------------------------------------------- running
def run_case(case: Case, tasks, repeats: int, common: dict, log, adam: bool = False) -> list[dict]:
    p = prepare(case)
    rows = []
    for task in tasks:
        impls = impls_for(case, task, adam)
        fns = {i: make_fn(p, task, i) for i in impls}
        times = {i: [] for i in impls}
        outs = {}
        first = {}
        for i in impls:  # first calls: allocator and thread pools warm, results kept
            t = time.perf_counter()
            outs[i] = fns[i]()
            first[i] = time.perf_counter() - t
        # a case whose calls take more than LONG_CALL_S is timed by its first calls, once each
        # (warming up is a negligible share of such a call, and the big layers would take hours)
        long_case = max(first.values()) > LONG_CALL_S
        if long_case:
            for i in impls:
                times[i].append(first[i])
        reps = {i: 0 if long_case else (1 if i == "cdfast_adam" else repeats) for i in impls}
        for r in range(repeats):  # round-robin: a change in the machine's load hits every impl
            for i in impls:
                if r >= reps[i]:
                    continue
                t = time.perf_counter()
                outs[i] = fns[i]()
                times[i].append(time.perf_counter() - t)
        by = {}
        for i in impls:
            W, info = outs[i]
            by[i] = dict(common, case=case.name, kind=case.kind, c_in=case.c_in, c_out=case.c_out, kernel=case.k,
                         rows=p.X.shape[1], cols=p.X.shape[0], task=task, impl=i, status="ok",
                         repeats=len(times[i]), median_s=st.median(times[i]), min_s=min(times[i]),
                         calib_err=rel_err(p.A, W, p.X), heldout_err=rel_err(p.A, W, p.Xh),
                         solver=info.get("solver", ""), form=info.get("form", ""), loadavg_1m=Hn.loadavg(),
                         timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                         note="Adam, 3000 steps, one timed call" if i == "cdfast_adam" else "")
        t_peer, e_peer = peer_of(task, by)
        for i, row in by.items():
            row["peer"] = t_peer if t_peer == e_peer else f"{t_peer} (time), {e_peer} (error)"
            row["peer_time_s"] = by[t_peer]["median_s"]
            row["peer_heldout_err"] = by[e_peer]["heldout_err"]
            row["ratio_time_vs_peer"] = row["median_s"] / by[t_peer]["median_s"]
            row["ratio_heldout_vs_peer"] = row["heldout_err"] / by[e_peer]["heldout_err"]
            rows.append(row)
            log(f"  {case.name:<18} {task:<8} {i:<14} {row['median_s']:9.3f}s  calib {row['calib_err']:.4e}  "
                f"held-out {row['heldout_err']:.4e}  time/peer {row['ratio_time_vs_peer']:.3f}  "
                f"err/peer {row['ratio_heldout_vs_peer']:.3f}")
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    """Rows of the same (case, task, impl) already in ``path`` are replaced, the others kept."""
    Hn.merge_csv(rows, path, COLUMNS, lambda r: (r["case"], r["task"], r["impl"]))


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m bench.posttraining", description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per implementation (median)")
    ap.add_argument("--only", default=None, help="cases whose name contains this text")
    ap.add_argument("--tasks", nargs="*", default=list(TASKS), choices=TASKS)
    ap.add_argument("--quick", action="store_true", help="the two smallest layers, one repeat")
    ap.add_argument("--adam", action="store_true", help="also cdfast's Adam (3000 steps) on the smallest layers")
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cases = [c for c in CASES if a.only is None or a.only in c.name]
    if a.quick:
        cases = [Case(c.name, c.kind, c.c_in, c.c_out, c.rows, c.hw) for c in cases
                 if c.name in ("linear_768x768", "conv_64x64_3x3")]
        a.repeats = 1
    common = dict(run_id=datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ"), torch_threads=torch.get_num_threads(),
                  cpu_model=Hn.cpu_model(), torch_version=torch.__version__, git=Hn.git_state())
    log = lambda m: print(m, file=sys.stderr, flush=True)
    rows = []
    for c in cases:
        log(f"[posttraining] {c.name}")
        rows += run_case(c, a.tasks, a.repeats, common, log, a.adam)
    out = Path(a.out)
    write_csv(rows, out)
    log(f"[posttraining] wrote {out} ({len(rows)} rows)")
    return out


if __name__ == "__main__":
    main()
