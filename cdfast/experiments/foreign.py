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

#: Builder arguments of each replica at test size (inputs 1×16×16).
TINY = {"mlp": dict(hidden=(32, 16), in_features=256), "resnet18": dict(width=2), "resnet50": dict(width=2, layers=(1, 1, 1, 1)),
        "resnext": dict(width=2, groups=2, base=64), "mobilenet_v2": dict(width=4), "efficientnet": dict(width=4),
        "densenet": dict(growth=2), "convnext": dict(dims=(4, 8)), "vit": dict(dim=8, image=16, patch=4),
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
