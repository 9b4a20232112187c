"""``reconstruct``: refit a student that another tool compressed, by cross distillation.

A student made by magnitude pruning or SparseGPT (zeros in its weights), by a
quantizer (weights on a grid), or by Torch-Pruning (channels removed) keeps its
structure; only its weights are fit again, layer by layer in execution order, to the
teacher (SPEC §2–§4), with ``h^T`` from the teacher and ``h^S`` from the student
refit so far. Its zero weights stay zero (``keep_zeros``), a ``Quantize`` in
``compression`` puts each layer back on a grid of that many bits, and removed
channels are matched to the teacher's through ``kept_channels``.
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn

from ..layer.constraints import Quantize, normalize
from .compress import CompressionReport, LayerReport, fit_layer
from .counting import count_flops, count_parameters
from .graph import ModelGraph
from .walk import calibration_batches, execution_order

__all__ = ["reconstruct"]


def _replay(teacher: nn.Module, example: torch.Tensor, kept_channels: dict) -> ModelGraph:
    """A copy of the teacher with the channels the student lacks removed, group by group:
    its graph then knows which teacher channels every student layer still has."""
    model = copy.deepcopy(teacher).eval()
    graph = ModelGraph(model, example)
    order = {n: i for i, n in enumerate(execution_order(model, example)[0])}
    used = set()
    for g in sorted(graph.groups, key=lambda g: min((order.get(c, -1) for c in g.consumers), default=-1)):
        given = [p for p in g.producers + g.passthrough if p in kept_channels]
        if not given:
            continue
        kept = torch.as_tensor(kept_channels[given[0]]).long().flatten()
        if len(kept) and (int(kept.min()) < 0 or int(kept.max()) >= g.channels):
            raise ValueError(f"kept_channels[{given[0]!r}]: indices must lie in 0..{g.channels - 1}")
        alive = torch.zeros(g.channels, dtype=torch.bool)
        alive[kept] = True
        graph.prune(g, torch.nonzero(~alive).flatten().tolist())
        used.update(given)
    unknown = set(kept_channels) - used - {p for g in graph.groups for p in g.producers + g.passthrough}
    if unknown:
        raise ValueError(f"kept_channels: {sorted(unknown)} produce no channel group of the teacher")
    return graph


def reconstruct(teacher: nn.Module, student: nn.Module, data, *, loss: str = "cross", mu: float = 0.9,
                solver: str = "exact", steps: int = 3000, lr: float = 1e-3, compression=None,
                kept_channels: dict | None = None, keep_zeros: bool | None = None, layers: list[str] | None = None,
                batch_size: int = 256, inplace: bool = False, progress: bool = True, verbose: bool = False,
                **layer_kwargs):
    """Refit ``student`` (compressed by another tool) to ``teacher``; returns ``(student, report)``.

    Args:
        teacher: the uncompressed network (kept intact).
        student: the compressed network: the teacher's module names and layer types;
            its Conv2d/Linear layers may have fewer channels (see ``kept_channels``).
        data: calibration inputs, as :func:`cdfast.compress` takes them.
        loss, mu, solver, steps, lr: as :func:`cdfast.distill_layer` (default: the
            exact solver, μ = 0.9).
        compression: constraints every refit layer keeps, e.g. ``Quantize(4)`` for a
            student quantized to 4 bits (each layer is put back on a 4-bit grid, its
            scale refit); ``WeightPrune``/``NMSparsity`` prune further.
        kept_channels: for a student whose channels were removed, ``{layer name:
            indices of the teacher's output channels it kept}`` for the Conv2d/Linear
            layers that produce them (``report.kept_outputs`` of :func:`cdfast.compress`,
            or the complement of the indices a Torch-Pruning run removed); every layer
            that reads those channels is matched through the teacher's dependency graph.
        keep_zeros: keep the student's zero weights at zero (the mask of a pruned
            student). Default: True, unless ``compression`` quantizes (then a zero is
            only a weight rounded to zero).
        layers: names of the layers to refit (default: every Conv2d/Linear).
        inplace: refit ``student`` itself rather than a copy.
        **layer_kwargs: passed on to :func:`cdfast.distill_layer`.
    """
    start = time.perf_counter()
    for arg, m in (("teacher", teacher), ("student", student)):
        if not isinstance(m, nn.Module):
            raise TypeError(f"{arg}: expected an nn.Module, got {type(m).__name__}")
    items = normalize(compression)
    if keep_zeros is None:
        keep_zeros = not any(isinstance(c, Quantize) for c in items)
    batches = calibration_batches(data, batch_size)
    if not batches or sum(len(b) for b in batches) == 0:
        raise ValueError("data: expected at least one calibration sample, got none")
    t_mode = teacher.training
    teacher.eval()
    example = batches[0][:1]
    graph = _replay(teacher, example, dict(kept_channels or {}))
    if not inplace:
        student = copy.deepcopy(student)
    student.eval()
    order, _ = execution_order(student, example)
    names = order if layers is None else list(layers)
    replayed = graph.model.state_dict()
    for n in names:
        if n not in order:
            raise ValueError(f"layers: the student has no Conv2d/Linear {n!r} that its forward calls")
        try:
            t_layer = teacher.get_submodule(n)
        except AttributeError:
            raise ValueError(f"student: layer {n!r} has no counterpart in the teacher") from None
        s_layer = student.get_submodule(n)
        if type(t_layer) is not type(s_layer):
            raise ValueError(f"student: layer {n!r} is a {type(s_layer).__name__}, the teacher's a "
                             f"{type(t_layer).__name__}")
        if replayed[n + ".weight"].shape != s_layer.weight.shape:
            raise ValueError(f"student: layer {n!r} has weight shape {tuple(s_layer.weight.shape)}, the teacher's "
                             f"with the kept channels {tuple(replayed[n + '.weight'].shape)}; pass kept_channels= "
                             "for the channels another tool removed")
    report = CompressionReport(params_before=count_parameters(teacher),
                               flops_before=count_flops(teacher, (1, *example.shape[1:]), batched=True),
                               samples=sum(len(b) for b in batches))
    kw = dict(layer_kwargs, loss=loss, mu=mu, solver=solver, steps=steps, lr=lr)
    data_form = kw.get("form", "auto") == "data" or kw.get("objective", "linear") != "linear"
    from tqdm.auto import tqdm

    for n in tqdm(names, desc="cdfast reconstruct", disable=not progress, unit="layer"):
        t0 = time.perf_counter()
        res, inputs, rows, cols = fit_layer(n, teacher, student, graph, batches, items, kw, data_form, keep_zeros)
        line = LayerReport(n, "refit", res.loss_before, res.loss_after, inputs.full, len(inputs.kept), res.sparsity,
                           res.bits, rows, cols, time.perf_counter() - t0, res.solver, res.backend)
        report.layers.append(line)
        if res.codes is not None:
            report.quantized[n] = {"codes": res.codes, "scale": res.scale, "bits": res.bits}
        if verbose:
            tqdm.write(line.line())
    report.params_after = count_parameters(student)
    report.flops_after = count_flops(student, (1, *example.shape[1:]), batched=True)
    report.seconds = time.perf_counter() - start
    teacher.train(t_mode)
    return student, report
