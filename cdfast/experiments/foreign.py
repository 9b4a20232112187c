"""Models cdfast did not define: the replicas of :mod:`cdfast.experiments.zoo`, compressed
by :func:`cdfast.compress` and by the baselines a user would otherwise reach for.

* :data:`TINY` — the replicas at test size (16×16 inputs, a few channels), for the tests;
* :func:`magnitude_prune` — Torch-Pruning's group magnitude pruning (L2 over every
  member of a channel group) of the same groups to the same widths, no reconstruction;
* :func:`naive` — the naive counterpart of a compression: magnitude channel pruning,
  magnitude weight pruning, or rounding to the grid, on the layers ``compress`` compressed;
* :func:`main` — the Fashion-MNIST comparison of ``docs/results/foreign_models.md``:
  each replica trained briefly, then half of its prunable channels removed from
  K = 5 images per class by ``compress`` and by Torch-Pruning's magnitude pruning,
  both measured without fine-tuning and after FSKD's recovery.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from ..layer.constraints import ChannelPrune, normalize
from ..model.compress import CompressionReport
from ..model.graph import ModelGraph
from ..model.walk import execution_order
from .grid import naive_compress

__all__ = ["TINY", "magnitude_prune", "naive"]

#: Builder arguments of each replica at test size (inputs 1×12×12).
TINY = {"mlp": dict(hidden=(24, 12), in_features=144), "resnet18": dict(width=2), "resnet50": dict(width=2, layers=(1, 1, 1, 1)),
        "resnext": dict(width=2, groups=2, base=64), "mobilenet_v2": dict(width=4), "efficientnet": dict(width=4),
        "densenet": dict(growth=2), "convnext": dict(dims=(4, 8)), "vit": dict(dim=8, image=12, patch=4),
        "unet": dict(base=4)}


def magnitude_prune(teacher: nn.Module, example: torch.Tensor, kept: dict[str, int]) -> tuple[nn.Module, dict]:
    """Torch-Pruning's group-L2 magnitude pruning of the groups ``kept`` (root → channels
    kept), with the units and block quotas ``compress`` uses; returns the pruned copy and
    the teacher output channels each producer kept (for FSKD)."""
    import torch_pruning as tp

    student = copy.deepcopy(teacher).eval()
    graph = ModelGraph(student, example)
    score = tp.importance.GroupMagnitudeImportance(p=2)
    order = {n: i for i, n in enumerate(execution_order(teacher, example)[0])}
    # in the order compress removes them: a group when its first reader runs
    for g in sorted(graph.groups, key=lambda g: min((order[c] for c in g.consumers), default=-1)):
        if g.root not in kept:
            continue
        imp = score(graph.members(g)).detach().cpu().double()
        unit, block = g.units(g.channels)
        per_unit = torch.zeros(len(block), dtype=torch.float64).index_add_(0, unit, imp)
        n_blocks = int(block.max()) + 1
        k_units = kept[g.root] * len(block) // g.channels // n_blocks
        alive = torch.zeros(len(block), dtype=torch.bool)
        for b in range(n_blocks):
            ids = torch.nonzero(block == b).flatten()
            alive[ids[torch.topk(per_unit[ids], k_units).indices]] = True
        graph.prune(g, torch.nonzero(~alive[unit]).flatten().tolist())
    kept_outputs = {n: graph.kept_out[n] for n in graph.layers
                    if len(graph.kept_out[n]) < ModelGraph._width(teacher.get_submodule(n), "out")}
    return student, kept_outputs


def naive(teacher: nn.Module, example: torch.Tensor, compression, report: CompressionReport) -> nn.Module:
    """What ``compression`` does without any fitting, on what ``report``'s run compressed."""
    items = normalize(compression)
    if any(isinstance(c, ChannelPrune) for c in items):
        return magnitude_prune(teacher, example, {g["root"]: g["kept"] for g in report.groups
                                                  if g["status"] == "pruned"})[0]
    layers = [l.name for l in report.layers if l.action == "compressed"]
    return naive_compress(teacher, items[0], layers)


# ------------------------------------------------------------- the experiment
#: The replicas of the Fashion-MNIST comparison, at their default (``zoo``) sizes.
MODELS = ("mlp", "resnet18", "mobilenet_v2")


def _teacher(name: str, epochs: int, max_train: int, seed: int) -> nn.Module:
    """A replica trained on Fashion-MNIST (cached beside the bundled teachers)."""
    from .train import _atomic_save, default_cache_dir, fit
    from .zoo import build

    path = default_cache_dir() / f"zoo-{name}-e{epochs}-n{max_train}-s{seed}.pt"
    torch.manual_seed(seed)
    model = build(name)
    if path.is_file():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    model = fit(model, epochs, 128, 0.05, seed, "cpu", max_train, None, False, desc=name)
    _atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return model


def compare(name: str, teacher: nn.Module, x: torch.Tensor, test, keep: float = 0.5, mu: float = 0.9,
            solvers=("exact", "adam")) -> dict:
    """One few-shot draw: ``compress`` (with each of ``solvers``) against Torch-Pruning's
    magnitude pruning of the same groups to the same widths, each without fine-tuning and
    after FSKD."""
    import time

    from ..model.compress import compress
    from ..model.counting import count_flops, count_parameters
    from ..model.fskd import fskd
    from .train import evaluate

    shape = tuple(x.shape[1:])
    row = {"model": name, "teacher": evaluate(teacher, test), "params_teacher": count_parameters(teacher),
           "flops_teacher": count_flops(teacher, shape)}
    kept = None
    for solver in solvers:
        t0 = time.perf_counter()
        ours, report = compress(teacher, x, compression=ChannelPrune(keep), solver=solver, mu=mu, progress=False,
                                verbose=False)
        row[f"seconds_{solver}"] = time.perf_counter() - t0
        row[f"cdfast_{solver}"] = evaluate(ours, test)
        row[f"cdfast_{solver}_fskd"] = evaluate(fskd(teacher, ours, x, kept_outputs=report.kept_outputs), test)
        row.update(params=count_parameters(ours), flops=count_flops(ours, shape))
        kept = {g["root"]: g["kept"] for g in report.groups if g["status"] == "pruned"}
    mag, kept_mag = magnitude_prune(teacher, x[:1], kept)
    if count_parameters(mag) != row["params"]:
        raise RuntimeError(f"{name}: the two students differ in size ({count_parameters(mag)} vs "
                           f"{row['params']} parameters)")
    row["tp_magnitude"] = evaluate(mag, test)
    row["tp_magnitude_fskd"] = evaluate(fskd(teacher, mag, x, kept_outputs=kept_mag), test)
    return row


def main(models=MODELS, k: int = 5, seeds=(0, 1, 2), epochs: int = 2, max_train: int = 20000,
         out: str = "docs/results/foreign_models.md") -> list[dict]:
    """The table of ``docs/results/foreign_models.md`` (``python -m cdfast.experiments.foreign``)."""
    import statistics

    from .data import few_shot, load_fashion_mnist

    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    rows = []
    for name in models:
        teacher = _teacher(name, epochs, max_train, 0)
        for seed in seeds:
            x, _ = few_shot(train, k, seed=seed).tensors
            row = compare(name, teacher, x, test)
            row["seed"] = seed
            rows.append(row)
            print({a: (round(b, 2) if isinstance(b, float) else b) for a, b in row.items()}, flush=True)

    def cell(vals):
        return f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else f"{vals[0]:.2f}"

    cols = ("cdfast_exact", "cdfast_adam", "tp_magnitude", "cdfast_exact_fskd", "cdfast_adam_fskd",
            "tp_magnitude_fskd")
    lines = ["| model | teacher | params | FLOPs | cdfast exact | cdfast Adam | TP magnitude | cdfast exact + FSKD "
             "| cdfast Adam + FSKD | TP magnitude + FSKD |", "|" + " --- |" * 10]
    for name in models:
        rs = [r for r in rows if r["model"] == name]
        r0 = rs[0]
        lines.append(f"| {name} | {r0['teacher']:.2f} | {r0['params_teacher']:,} → {r0['params']:,} | "
                     f"{r0['flops_teacher']:,} → {r0['flops']:,} | "
                     + " | ".join(cell([r[c] for r in rs]) for c in cols) + " |")
    table = "\n".join(lines)
    if out:
        import os

        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            f.write(_REPORT.format(k=k, seeds=len(seeds), epochs=epochs, max_train=max_train, table=table,
                                   models=", ".join(models)))
    print(table)
    return rows


_REPORT = """# Models cdfast did not define: cdfast against Torch-Pruning's magnitude pruning

Produced by `python -m cdfast.experiments.foreign` (`cdfast/experiments/foreign.py`,
`main()`); the replicas are in `cdfast/experiments/zoo.py`.

Each replica ({models}) is trained on {max_train:,} Fashion-MNIST training images for
{epochs} epochs (SGD, the bundled teachers' recipe at lr 0.05). Then half of the channels
of every channel group that `cdfast.compress`'s default policy prunes (the groups not
tied to a residual stream, found from Torch-Pruning's dependency graph; the layers that
read the input are not compressed) are removed, from K = {k} images per class (50
unlabelled images):

* **cdfast exact / Adam**: `cdfast.compress(teacher, x, compression=ChannelPrune(0.5),
  solver=..., mu=0.9)`: channels chosen by group OBS on the cross-distillation quadratic
  summed over each group's readers, then every layer fit by cross distillation, with the
  exact solver or with Adam (the authors' procedure: 3000 steps, lr 1e-3);
* **TP magnitude**: Torch-Pruning's group L2 magnitude importance on the same groups,
  pruned to the same widths (the same parameter count), no reconstruction;
* **+ FSKD**: each student then recovered by FSKD (`cdfast.model.fskd.fskd`) from the
  same 50 images.

Top-1 accuracy (%) on the 10,000 test images, mean ± std over {seeds} draws of the
few-shot set; parameters and FLOPs per image (2 × multiply-accumulates of the
Conv2d/Linear layers) of the teacher and of both students (equal by construction).

{table}
"""


if __name__ == "__main__":
    main()
