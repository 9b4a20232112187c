"""When does crossing help? Per-layer drift of ``cross`` against ``nc`` versus M/D.

Cross distillation trades fidelity to the teacher's target (``nc`` fits the student
exactly to ``W^T∗h^T`` from the student's own inputs) for robustness when a layer
sees too few sampled rows to pin its weights down. A layer's statistics have
``M = N·H_out·W_out`` rows and ``D = C_in·k²`` columns: with ``M < D`` the Gram
matrix is singular and ``nc``'s fit is underdetermined, which is the paper's regime
(few samples, wide layers).

:func:`crossing_study` compresses one teacher with ``nc`` and with ``cross`` from the
same K-shot draws, then measures on held-out images, for every layer, the relative
drift of the student's layer output from the teacher's,
``‖Y^S_l − Y^T_l‖² / ‖Y^T_l‖²``, and reports it beside ``M/D``. A layer whose output
channels were removed is compared on the teacher's channels it kept.
"""
from __future__ import annotations

import csv
import os

import torch
import torch.nn as nn

from ..model.compress import compress
from ..layer.constraints import ChannelPrune

__all__ = ["layer_drift", "crossing_study", "summarize_study", "write_study", "plot_study"]

#: M/D buckets of the summary table (lower edges).
BUCKETS = (0.0, 1.0, 2.0, 4.0, 16.0, 64.0)


def layer_drift(teacher: nn.Module, student: nn.Module, x: torch.Tensor, names: list[str],
                batch_size: int = 500, kept_outputs: dict | None = None) -> dict[str, float]:
    """Relative output drift per named layer on inputs ``x`` (``kept_outputs``: the teacher's
    output channels a narrower student layer kept, as ``CompressionReport.kept_outputs``)."""
    kept_outputs = kept_outputs or {}
    num = {n: 0.0 for n in names}
    den = {n: 0.0 for n in names}
    for i in range(0, len(x), batch_size):
        outs: dict = {}
        hooks = []
        for tag, model in (("t", teacher), ("s", student)):
            for n in names:
                hooks.append(model.get_submodule(n).register_forward_hook(
                    lambda m, inp, out, key=(tag, n): outs.__setitem__(key, out.detach().double())))
        with torch.no_grad():
            teacher(x[i:i + batch_size])
            student(x[i:i + batch_size])
        for h in hooks:
            h.remove()
        for n in names:
            if n in kept_outputs:
                y = outs[("t", n)]
                outs[("t", n)] = y.index_select(1 if y.dim() == 4 else y.dim() - 1, kept_outputs[n].to(y.device))
            num[n] += float((outs[("s", n)] - outs[("t", n)]).pow(2).sum())
            den[n] += float(outs[("t", n)].pow(2).sum())
    return {n: num[n] / max(den[n], 1e-300) for n in names}


def crossing_study(teacher: nn.Module, train_x_by_seed: dict, held_out: torch.Tensor, keep: float = 0.5,
                   mu: float = 0.9, policy: str = "resnet", solver: str = "exact", log=print) -> list[dict]:
    """Rows of ``(K, seed, layer, M, D, M/D, drift_nc, drift_cross, ratio)``.

    ``train_x_by_seed`` maps ``(K, seed)`` to that draw's calibration images.
    """
    rows = []
    for (k, seed), x in train_x_by_seed.items():
        results = {}
        for loss in ("nc", "cross"):
            torch.manual_seed(seed)
            student, rep = compress(teacher, x, compression=ChannelPrune(keep), loss=loss, mu=mu, solver=solver,
                                    policy=policy, progress=False, verbose=False)
            fitted = [l for l in rep.layers if l.action != "skipped"]
            results[loss] = (layer_drift(teacher, student, held_out, [l.name for l in fitted],
                                         kept_outputs=rep.kept_outputs), fitted)
        drift_nc, fitted = results["nc"]
        drift_cross, _ = results["cross"]
        for l in fitted:
            ratio = drift_cross[l.name] / max(drift_nc[l.name], 1e-300)
            rows.append(dict(k=k, seed=seed, layer=l.name, action=l.action, rows=l.rows, cols=l.cols,
                             m_over_d=l.rows / l.cols, drift_nc=drift_nc[l.name],
                             drift_cross=drift_cross[l.name], ratio=ratio))
        last = fitted[-1].name
        log(f"K={k} seed={seed}: output drift nc {drift_nc[last]:.4f}, cross {drift_cross[last]:.4f}")
    return rows


def summarize_study(rows: list[dict]) -> str:
    """A Markdown table: per M/D bucket, how many layers, the geometric mean of the drift
    ratio cross/nc, and in how many crossing lowered the drift. The last fitted layer of
    each draw (the classifier, which is only refit) is listed apart from the others."""
    import math

    last = {}
    for r in rows:
        last[(r["k"], r["seed"])] = r["layer"]
    groups = {"conv": [r for r in rows if r["layer"] != last[(r["k"], r["seed"])]],
              "classifier": [r for r in rows if r["layer"] == last[(r["k"], r["seed"])]]}
    edges = list(BUCKETS) + [math.inf]
    lines = ["| layers | M/D | count | geometric-mean drift ratio cross / nc | cross lowers the drift in |",
             "| --- | --- | --- | --- | --- |"]
    for kind, rs in groups.items():
        for lo, hi in zip(edges[:-1], edges[1:]):
            sel = [float(r["ratio"]) for r in rs if lo <= float(r["m_over_d"]) < hi and float(r["ratio"]) > 0]
            if not sel:
                continue
            gm = math.exp(sum(math.log(v) for v in sel) / len(sel))
            span = f"≥ {lo:g}" if hi == math.inf else (f"< {hi:g}" if lo == 0 else f"{lo:g} – {hi:g}")
            lines.append(f"| {kind} | {span} | {len(sel)} | {gm:.3f} | {sum(v < 1 for v in sel)} / {len(sel)} |")
    return "\n".join(lines) + "\n"


def write_study(rows: list[dict], out_dir: str) -> dict:
    """Write ``crossing_study.csv``, the summary ``crossing_study.md`` and the scatter plot."""
    if not rows:
        raise ValueError("rows: expected at least one study row, got none")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "crossing_study.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    md = os.path.join(out_dir, "crossing_study.md")
    with open(md, "w") as f:
        f.write(summarize_study(rows))
    return {"csv": path, "md": md, "png": plot_study(rows, os.path.join(out_dir, "crossing_study.png"))}


def plot_study(rows: list[dict], path: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ks = sorted({r["k"] for r in rows})
    cmap = plt.get_cmap("viridis")
    for i, k in enumerate(ks):
        rs = [r for r in rows if r["k"] == k]
        ax.scatter([r["m_over_d"] for r in rs], [r["ratio"] for r in rs], s=14, alpha=0.75,
                   color=cmap(i / max(1, len(ks) - 1)), label=f"K={k}")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axvline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("sampled rows per weight column, M/D")
    ax.set_ylabel("held-out drift, cross / nc  (<1: crossing helps)")
    ax.set_title("Where cross distillation beats plain layer-wise distillation")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
