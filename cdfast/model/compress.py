"""``compress``: few-shot compression of any network, layer by layer, on its channel groups.

The channels that must go together (a conv's inputs and its producers' outputs,
through normalisations, activations, concatenations, depthwise convs and gates) come
from a dependency graph (:mod:`cdfast.model.graph`, Torch-Pruning's), never from
layer names. Every Conv2d/Linear is then visited in execution order (SPEC §4): its
teacher input ``h^T`` from the intact teacher, its student input ``h^S`` from the
student compressed so far. When the walk reaches the first layer that reads a
channel group chosen for pruning, the statistics of *all* the group's consumers are
streamed, the kept channels are chosen on the cross-distillation quadratic with the
cost summed over the consumers (:func:`cdfast.layer.solvers.select_shared_channels`),
and the channels are removed from every member of the group at once. Each layer is
then fit by :func:`cdfast.distill_layer` against the teacher's full-width layer, its
removed input channels a :class:`~cdfast.layer.constraints.FixedSupport` (``h^S``
completed there by ``h^T``), and the
walk goes on with the student's inputs recomputed. Layers whose channels stay are
refit by the same loss.
"""
from __future__ import annotations

import copy
import inspect
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .._validation import check_bool, check_finite_model, check_positive_int, check_tensor
from ..layer.constraints import ChannelPrune, FixedSupport, normalize
from ..layer.distill import AUTO_FOLDS, check_arguments, distill_layer
from ..layer.geometry import LayerGeometry
from ..layer.losses import ActivationSpec, LossSpec, Quadratic
from ..layer.solvers.shared import pieces_of, select_shared_channels
from ..layer.selection import FoldedStatistics, candidate, rule_of_thumb
from ..layer.statistics import LayerStatistics
from . import checkpoint as ckpt
from .allocate import ModelCount, allocate_keep, check_target, unit_steps
from .augment import check_augment, views
from .counting import count_flops, count_parameters
from .graph import ChannelGroup, ModelGraph, is_depthwise
from .surgery import fold_batchnorm
from .walk import calibration_batches, capture_input, execution_order

__all__ = ["compress", "CompressionReport", "POLICIES", "plan_policy", "fit_layer"]

#: ``auto``: every Conv2d/Linear but the first compressed; ``resnet``: only the layers that
#: read an untied channel group; ``skip_first``: every Conv2d but the first (Linear refit);
#: ``all``: every layer, the first included.
POLICIES = ("auto", "resnet", "skip_first", "all")


@dataclass
class LayerReport:
    name: str
    action: str            # "compressed", "refit" or "skipped"
    loss_before: float = 0.0
    loss_after: float = 0.0
    in_channels: int = 0
    kept_channels: int = 0
    sparsity: float = 0.0
    bits: int | None = None
    rows: int = 0          # M = N·H_out·W_out
    cols: int = 0          # D = C_in/G·k²
    seconds: float = 0.0
    solver: str = ""
    backend: str = ""
    loss: str = ""         # the loss the layer was fit with, e.g. "nc" or "cross(mu=0.9)"
    choice: str = ""       # with loss="auto": why that loss (held-out scores, or the M/D rule)

    def line(self) -> str:
        extra = f"bits={self.bits} " if self.bits else ""
        fit = f" [{self.loss}]" if self.loss else ""
        return (f"{self.name:28s} {self.action:10s} loss {self.loss_before:.4g} -> {self.loss_after:.4g}  "
                f"ch {self.kept_channels}/{self.in_channels} sparsity {self.sparsity:.2f} {extra}"
                f"M/D {self.rows}/{self.cols} {self.seconds:.2f}s{fit}")


@dataclass
class CompressionReport:
    """What :func:`compress` did, layer by layer and group by group, and what it bought."""

    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    seconds: float = 0.0
    walk: str = "recompute-from-input"
    samples: int = 0
    views: int = 1         # inputs per calibration sample (``augment``)
    #: consumer layer → ``"removed"`` when some of its input channels were removed
    shrink: dict = field(default_factory=dict)
    #: one entry per channel group: root, channels before/after, consumers, and the status
    groups: list = field(default_factory=list)
    #: producer layer → indices of the teacher's output channels it kept (for FSKD, reconstruct)
    kept_outputs: dict = field(default_factory=dict, repr=False)
    quantized: dict = field(default_factory=dict, repr=False)  # name -> {"codes", "scale", "bits"}
    #: with ``target``: the budget, its kind, the uniform plan's count and each group's kept units
    allocation: dict | None = None
    #: with ``refine_steps``: one :class:`~cdfast.model.refine.BlockReport` per block
    blocks: list = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("quantized")
        d["kept_outputs"] = {k: [int(i) for i in v] for k, v in self.kept_outputs.items()}
        d["quantized_layers"] = sorted(self.quantized)
        return d

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def table(self) -> str:
        return "\n".join(l.line() for l in self.layers)

    def choices(self) -> str:
        """With ``loss="auto"``: each fitted layer's loss and why it was chosen, one per line."""
        return "\n".join(f"{l.name:28s} {l.choice}" for l in self.layers if l.choice)


# --------------------------------------------------------------------- the policy
def _channel_keep(items) -> float | None:
    return next((c.keep for c in items if isinstance(c, ChannelPrune)), None)


def plan_policy(policy: str, order: list[str], graph: ModelGraph, compression, overrides: dict,
                prune_tied: bool) -> tuple[dict[str, str], dict[str, tuple], dict[str, float]]:
    """Layer actions, each layer's constraints, and the channel groups to prune.

    Returns ``(actions, constraints, keep)``: ``actions[name]`` is ``"compress"``,
    ``"refit"`` or ``"skip"``; ``constraints[name]`` what its solve gets (before any
    fixed support); ``keep[root]`` the kept fraction of each group chosen for pruning.
    A group is pruned when it can be (see :class:`~cdfast.model.graph.ChannelGroup`), is
    not tied to a residual stream (unless ``prune_tied``), and every layer that reads it
    is compressed with a ``ChannelPrune``; it keeps the largest of their fractions.
    """
    open_groups = [g for g in graph.groups if g.prunable and (prune_tied or not g.tied)]
    readers = {c for g in open_groups for c in g.consumers}
    actions: dict[str, str] = {}
    for n in order:
        m = graph.model.get_submodule(n)
        if n in graph.first_layers and policy != "all":
            actions[n] = "skip"
        elif policy in ("auto", "all"):
            actions[n] = "compress"
        elif policy == "skip_first":
            actions[n] = "compress" if isinstance(m, nn.Conv2d) else "refit"
        else:  # resnet: only the layers that read block-internal (untied) channels
            actions[n] = "compress" if n in readers else "refit"
    constraints: dict[str, tuple] = {}
    for n in order:
        ov = dict(overrides.get(n, {}))
        actions[n] = ov.pop("action", actions[n])
        if actions[n] not in ("compress", "refit", "skip"):
            raise ValueError(f"overrides[{n!r}]['action']: expected 'compress', 'refit' or 'skip', "
                             f"got {actions[n]!r}")
        items = normalize(ov["compression"]) if "compression" in ov else compression
        constraints[n] = items if actions[n] == "compress" else ()
    keep: dict[str, float] = {}
    for g in open_groups:
        fractions = [_channel_keep(constraints.get(c, ())) for c in g.consumers]
        if fractions and all(f is not None for f in fractions):
            keep[g.root] = max(fractions)
    return actions, constraints, keep


# ------------------------------------------------------------------ layer views
def _channel_dim(layer: nn.Module) -> int:
    return 1 if isinstance(layer, nn.Conv2d) else -1


def _teacher_view(layer: nn.Module, kept_out: torch.Tensor) -> nn.Module:
    """The teacher layer restricted to the output channels the student still has (a
    depthwise conv: to those channels altogether)."""
    full = layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features
    if len(kept_out) == full:
        return layer
    k = len(kept_out)
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            view = nn.Linear(layer.in_features, k, bias=layer.bias is not None)
        else:
            dw = is_depthwise(layer)
            view = nn.Conv2d(k if dw else layer.in_channels, k, layer.kernel_size, layer.stride, layer.padding,
                             layer.dilation, k if dw else layer.groups, layer.bias is not None)
        view = view.to(layer.weight)
        view.weight.copy_(layer.weight[kept_out])
        if layer.bias is not None:
            view.bias.copy_(layer.bias[kept_out])
    return view


class _Inputs:
    """A layer's ``(h^T, h^S)`` at the teacher's input width; a depthwise conv sees only its
    remaining channels.

    The student no longer computes a removed input channel; ``h^S`` carries the teacher's
    value there. The student's weights on it are fixed at zero (:class:`FixedSupport`), so
    it only completes the teacher-side target of the terms that feed the teacher the
    student's input (``imitation``, ``cross``, ``soft``): ``W^T∗h^S`` is then what the
    teacher layer gives on the student's input with the removed channels as they were,
    which the kept channels must make up for, as in the authors' masked layers whose
    input keeps every channel. With zeros there, that target would itself lack the
    removed channels and the fit would not compensate for them."""

    def __init__(self, name: str, teacher: nn.Module, student: nn.Module, graph: ModelGraph):
        self.layer_t, self.layer_s = teacher.get_submodule(name), student.get_submodule(name)
        self.kept = graph.kept_in[name]
        self.full = self.layer_t.in_channels if isinstance(self.layer_t, nn.Conv2d) else self.layer_t.in_features
        self.depthwise = is_depthwise(self.layer_t)
        self.dim = _channel_dim(self.layer_t)

    @property
    def pruned(self) -> bool:
        return len(self.kept) < self.full

    def pair(self, h_t: torch.Tensor, h_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.pruned:
            return h_t, h_s
        idx = self.kept.to(h_t.device)
        if self.depthwise:
            return h_t.index_select(self.dim, idx), h_s
        full = h_t.clone()
        full.index_copy_(self.dim % h_s.dim(), idx, h_s)
        return h_t, full

    def batches(self, teacher: nn.Module, student: nn.Module, batches):
        """``(h^T, h^S)`` per calibration batch, computed as they are consumed: the Gram form
        streams them into its statistics, so memory does not grow with the sample count."""
        for x in batches:
            h_t = capture_input(lambda: teacher(x), self.layer_t)
            h_s = capture_input(lambda: student(x), self.layer_s)
            yield self.pair(h_t, h_s)

    def write(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Copy a full-width solution into the student layer (its remaining columns)."""
        layer = self.layer_s
        if self.pruned and not self.depthwise:
            if isinstance(layer, nn.Conv2d) and layer.groups > 1:
                per = self.full // layer.groups
                rel = self.kept[self.kept < per]  # the same positions in every group
                weight = weight[:, rel.to(weight.device)]
            else:
                weight = weight[:, self.kept.to(weight.device)]
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None and layer.bias is not None:
                layer.bias.copy_(bias)


# ------------------------------------------------------------------ selection
def _select(group: ChannelGroup, keep: float, graph: ModelGraph, teacher, student, batches, spec: LossSpec | None,
            stats_kw: dict, select_on: str = "output", costs: list[float] | None = None
            ) -> tuple[list[int], dict[str, str]]:
    """The group's channels to remove: greedy OBS over every consumer's quadratic (``spec``
    None: ``loss="auto"``, each consumer's loss by its rows per column). Returns the
    removed channels and, with ``loss="auto"``, each consumer's selection loss and why.
    ``costs`` collects each removal's cost relative to the consumers' output energy."""
    root = student.get_submodule(group.root)
    channels = root.out_channels if isinstance(root, nn.Conv2d) else root.out_features
    unit, block = group.units(channels)
    n_units, n_blocks = len(block), int(block.max()) + 1
    k = max(n_blocks, int(keep * n_units + 1e-9) // n_blocks * n_blocks)
    if k >= n_units:
        return [], {}
    pieces, chosen_by = [], {}
    for name, (idx, root_idx) in graph.consumer_columns(group).items():
        inputs = _Inputs(name, teacher, student, graph)
        view = _teacher_view(inputs.layer_t, graph.kept_out[name])
        stats = LayerStatistics(view, **stats_kw).update_many(inputs.batches(teacher, student, batches))
        stats.all_reduce()
        geo = stats.geometry
        if spec is None:  # loss="auto": the rows-per-column rule picks the selection's loss
            rule = rule_of_thumb(stats.rows, stats.dim)
            chosen_by[name] = str(rule)
            layer_spec = candidate(rule.chosen)
        else:
            layer_spec = spec
        anchor = geo.weight_matrix(view.weight.detach().to(stats.dtype))
        if stats.fit_bias:
            bias = view.bias.detach() if view.bias is not None else anchor.new_zeros(geo.out_channels)
            anchor = torch.cat([anchor, bias.to(anchor).reshape(geo.groups, geo.group_out, 1)], -1)
        quad = Quadratic.from_statistics(stats, layer_spec, anchor)
        row_energy = (torch.bmm(anchor, stats.G_TT.to(anchor)) * anchor).sum(-1)  # (groups, rows)
        rows_w = _normalized_row_weights(graph, teacher, name) if select_on == "norm" else None
        if rows_w is not None:
            rows_w = rows_w.to(anchor).reshape(row_energy.shape)
            row_energy = row_energy * rows_w
        energy = float(row_energy.sum())
        taps = geo.taps
        if inputs.pruned:  # the columns of the inputs the layer still has, in their order
            now = inputs.kept[inputs.kept < geo.group_in] if geo.groups > 1 else inputs.kept
            cols = (now[:, None] * taps + torch.arange(taps)).reshape(-1)
            if stats.fit_bias:
                cols = torch.cat([cols, torch.tensor([geo.cols])])
            quad = quad.restrict(cols.to(anchor.device))
        per_group = (len(inputs.kept) if inputs.pruned else geo.in_channels) // geo.groups
        for g in range(geo.groups):
            sel = (idx // per_group) == g
            if not bool(sel.any()):
                continue
            rel, units = idx[sel] % per_group, unit[root_idx[sel]]
            order = torch.argsort(units, stable=True)
            rel, units = rel[order], units[order]
            ids, counts = torch.unique_consecutive(units, return_counts=True)
            if bool((counts != counts[0]).any()):
                raise RuntimeError(f"{name}: a channel group's units read unequal column counts")
            cols = (rel[:, None] * taps + torch.arange(taps)).reshape(len(ids), -1)
            pieces.append(pieces_of(quad, ids, cols, 1.0 / max(energy * quad.scale, 1e-300), g,
                                    None if rows_w is None else rows_w[g]))
    kept = select_shared_channels(pieces, n_units, k, block, costs)
    return torch.nonzero(~kept[unit]).flatten().tolist(), chosen_by


def _normalized_row_weights(graph: ModelGraph, teacher: nn.Module, name: str) -> torch.Tensor | None:
    """``(γ/σ)²`` of the BatchNorm right after layer ``name``, on its remaining outputs: how
    much each output row's error weighs once normalised (None without such a BatchNorm)."""
    bn = graph.following_norm(name)
    if not isinstance(bn, nn.BatchNorm2d) or bn.running_var is None:
        return None
    bn_t = teacher.get_submodule(graph.names[bn])
    kept = graph.kept_out[name].to(bn_t.running_var.device)
    gain = bn_t.weight.detach() if bn_t.weight is not None else torch.ones_like(bn_t.running_var)
    w = (gain / (bn_t.running_var + bn_t.eps).sqrt()).pow(2)[kept].double()
    return w / w.mean().clamp_min(1e-300)


def _allocate(target, keep: dict[str, float], graph: ModelGraph, teacher, student, batches, example,
              spec: LossSpec | None, stats_kw: dict, select_on: str, report: CompressionReport) -> dict[str, float]:
    """Each group's kept fraction under ``target`` (:mod:`cdfast.model.allocate`), from the
    error curves of greedy selection on the teacher's features (the student is still whole)."""
    kind = target if isinstance(target, str) else next(iter(target))
    groups = [g for g in graph.groups if g.root in keep]
    curves = {}
    for g in groups:
        units, _, floor = unit_steps(g)
        removal_costs: list[float] = []
        _select(g, floor / units, graph, teacher, student, batches, spec, stats_kw, select_on, removal_costs)
        curves[g.root] = [0.0] + torch.tensor(removal_costs, dtype=torch.float64).cumsum(0).tolist()
    count = ModelCount(student, example, groups, kind)
    budget = None if isinstance(target, str) else next(iter(target.values()))
    if isinstance(budget, float):
        budget = int(round(budget * count.total))
    alloc = allocate_keep(groups, keep, curves, count, budget, kind)
    report.allocation = {"kind": alloc.kind, "budget": alloc.budget, "uniform": alloc.uniform,
                         "planned": alloc.planned, "kept_units": {r: list(u) for r, u in alloc.units.items()}}
    return alloc.keep


# ------------------------------------------------------------------ one layer
def _output_error(student: nn.Module, inputs: "_Inputs", geometry: LayerGeometry, batches,
                  teacher_outputs: list[torch.Tensor], folds: int, period: int | None):
    """``score(W, f)`` for ``loss="auto"``: the squared error of the student's output
    against the teacher's on the samples of fold ``f``, with this layer's weight ``W``
    and the layers after it still the teacher's.

    A layer's own held-out error does not say what a choice does downstream (on VGG at
    K = 1 the folds preferred μ = 0.5 for three middle convs by 3.8–12 standard errors,
    and the accuracy fell 2.5 points); the network's output does.
    """
    batches = list(batches)
    sizes = [len(x) for x in batches]
    fold = FoldedStatistics.fold_of(torch.arange(sum(sizes)), folds, period).split(sizes)
    layer = inputs.layer_s
    params = [p for p in (layer.weight, layer.bias) if p is not None]

    def score(W: torch.Tensor, f: int) -> float:
        saved = [p.detach().clone() for p in params]
        inputs.write(*geometry.weight_tensor(W.to(layer.weight.dtype)))
        total = 0.0
        try:
            with torch.no_grad():  # batch by batch: memory stays that of one forward
                for x, y, of in zip(batches, teacher_outputs, fold):
                    in_fold = of == f
                    if bool(in_fold.any()):
                        out = _flat_output(student(x[in_fold.to(x.device)]))
                        total += float((out.double() - y[in_fold.to(y.device)].double()).pow(2).sum())
            return _summed_over_ranks(total, y.device)
        finally:
            with torch.no_grad():
                for p, v in zip(params, saved):
                    p.copy_(v)
    return score


def _summed_over_ranks(value: float, device) -> float:
    """``value`` summed over the processes of ``torch.distributed`` (each holds its own
    share of the samples, dealt into folds like its statistics); itself without one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t)


def _flat_output(out) -> torch.Tensor | None:
    """A model's output as one ``(samples, values)`` tensor (tuples/dicts: their tensors side
    by side), or None when it holds no tensor."""
    if isinstance(out, torch.Tensor):
        return out.reshape(out.shape[0], -1) if out.dim() else None
    leaves = list(out.values()) if isinstance(out, dict) else list(out) if isinstance(out, (tuple, list)) else []
    flat = [t for t in (_flat_output(v) for v in leaves) if t is not None]
    n = {t.shape[0] for t in flat}
    return torch.cat(flat, 1) if flat and len(n) == 1 else None


def fit_layer(name: str, teacher: nn.Module, student: nn.Module, graph: ModelGraph, batches, items: tuple,
              kw: dict, data_form: bool, keep_zeros: bool = False, images: int | None = None,
              teacher_outputs: list[torch.Tensor] | None = None):
    """Fit student layer ``name`` to the teacher's by :func:`cdfast.distill_layer`; write it back.

    The teacher layer keeps its full input width (restricted to the outputs the student
    still has); the student's removed inputs are a :class:`FixedSupport` (with
    ``keep_zeros``, the student's zero weights as well; see :class:`_Inputs` for ``h^S``).
    ``images``: the batches are views of that many images, view-major (``augment``), and
    ``loss="auto"`` holds out images, not views. Returns ``(result, inputs, rows M, columns D)``.
    """
    kw = dict(kw)
    inputs = _Inputs(name, teacher, student, graph)
    view = _teacher_view(inputs.layer_t, graph.kept_out[name])
    if keep_zeros:
        mask = torch.zeros(view.weight.shape, dtype=torch.bool, device=view.weight.device)
        cols = slice(None)
        if inputs.pruned and not inputs.depthwise:
            grouped = isinstance(view, nn.Conv2d) and view.groups > 1
            cols = inputs.kept[inputs.kept < view.weight.shape[1]] if grouped else inputs.kept
        mask[:, cols] = inputs.layer_s.weight.detach() != 0
        items = (FixedSupport(mask=mask),) + tuple(items)
    elif inputs.pruned and not inputs.depthwise:
        items = (FixedSupport(channels=inputs.kept.tolist()),) + tuple(items)
    kw["compression"] = items
    if kw.get("objective", "linear") == "activation" and kw.get("activation") is None:
        bn = graph.following_norm(name)
        if bn is not None:
            spec = ActivationSpec.from_batchnorm(teacher.get_submodule(graph.names[bn]))
            k_out = graph.kept_out[name].to(spec.scale.device)
            kw["activation"] = ActivationSpec(spec.scale[k_out], spec.shift[k_out])
    pairs = inputs.batches(teacher, student, batches)
    if data_form:  # the data form iterates over the features themselves: they are kept
        pairs = list(pairs)
        res = distill_layer(view, batches=pairs, **kw)
        geo = LayerGeometry.of(view)
        rows, cols = sum(geo.rows(h_t) for h_t, _ in pairs), geo.cols
    else:
        stats_kw = dict(dtype=kw.pop("stats_dtype", torch.float32), fit_bias=kw.pop("fit_bias", False),
                        backend=kw.get("backend", "auto"))
        samples = sum(len(b) for b in batches)
        images = images or samples
        if kw.get("loss") == "auto" and images >= 2:  # held-out folds to choose the loss on
            folds = min(AUTO_FOLDS, images)
            period = images if images < samples else None
            score = None
            if teacher_outputs is not None:
                score = _output_error(student, inputs, LayerGeometry.of(view), batches, teacher_outputs, folds, period)
            stats = FoldedStatistics(view, folds=folds, period=period, score=score, **stats_kw)
        else:
            stats = LayerStatistics(view, **stats_kw)
        stats.update_many(pairs).all_reduce()
        res = distill_layer(view, statistics=stats, **kw)
        total = stats.parts[0] if isinstance(stats, FoldedStatistics) else stats
        rows = sum(p.rows for p in stats.parts) if isinstance(stats, FoldedStatistics) else stats.rows
        cols = total.geometry.cols + int(total.fit_bias)
    inputs.write(res.weight, res.bias)
    return res, inputs, rows, cols


# --------------------------------------------------------------- checkpoints
def _save_checkpoint(path: str, stamp: dict, student: nn.Module, done: list[str], report: CompressionReport,
                     pruned: list, selection: dict) -> None:
    ckpt.save(path, {"fingerprint": stamp, "student": student.state_dict(), "done": list(done),
                     "pruned": [(r, list(rm)) for r, rm in pruned], "layers": [asdict(l) for l in report.layers],
                     "shrink": dict(report.shrink), "quantized": dict(report.quantized), "selection": selection})


#: The keywords ``compress`` passes on to :func:`distill_layer`: read once, from the function
#: itself (a wrapper installed later, a test's say, does not change them).
_LAYER_KEYWORDS = frozenset(inspect.signature(distill_layer).parameters) - {
    "teacher_layer", "h_teacher", "h_student", "batches", "statistics", "compression", "loss", "mu", "solver",
    "steps", "lr"}


def _check_layer_kwargs(layer_kwargs: dict) -> None:
    """``compress``'s extra keywords must be :func:`distill_layer`'s (checked before any work)."""
    for k in layer_kwargs:
        if k not in _LAYER_KEYWORDS:
            raise TypeError(f"{k}: not an argument of compress or distill_layer "
                            f"(expected one of {sorted(_LAYER_KEYWORDS)})")


def _check_overrides(overrides) -> dict[str, dict]:
    if overrides is None:
        return {}
    if not isinstance(overrides, dict):
        raise TypeError(f"overrides: expected a dict of layer name -> dict of settings, got {type(overrides).__name__}")
    for name, ov in overrides.items():
        if not isinstance(name, str) or not isinstance(ov, dict):
            raise TypeError(f"overrides: expected a dict of layer name -> dict of settings, got {name!r}: {ov!r}")
        if "action" in ov and ov["action"] not in ("compress", "refit", "skip"):
            raise ValueError(f"overrides: layer {name!r}: action expected 'compress', 'refit' or 'skip', "
                             f"got {ov['action']!r}")
        if "compression" in ov:
            normalize(ov["compression"])
        settings = {k: v for k, v in ov.items() if k not in ("action", "compression")}
        _check_layer_kwargs({k: v for k, v in settings.items() if k not in ("loss", "mu", "solver", "steps", "lr")})
        check_arguments(**settings)
    return dict(overrides)


# ------------------------------------------------------------------ compress
def compress(teacher: nn.Module, data, *, compression=None, loss: str = "auto", mu: float = 0.9,
             solver: str = "auto", steps: int = 3000, lr: float = 1e-3, policy: str = "auto",
             prune_tied: bool = False, overrides: dict[str, dict] | None = None, batch_size: int = 256,
             fold_bn: bool = False, augment=None, select_on: str = "output", target=None,
             refine_steps: int = 0, checkpoint: str | None = None, progress: bool = True,
             verbose: bool = True, **layer_kwargs):
    """Compress ``teacher`` from a few calibration samples; returns ``(student, report)``.

    Args:
        teacher: any ``nn.Module`` whose forward takes one tensor (kept intact).
        data: calibration inputs: a tensor, a Dataset/DataLoader of ``(x, y)`` or ``x``
            batches, or a list of tensors. Labels are never used.
        compression: constraint(s) for the layers the policy compresses. A
            ``ChannelPrune(keep)`` removes channel groups (physically, from every layer
            that holds them); ``Quantize``/``WeightPrune``/… apply to each layer.
        loss: ``"auto"`` (default): each layer takes ``cross`` μ = 0.9 where it has fewer
            than 2 sampled rows per weight column, else ``nc`` (``nc`` when quantized),
            unless held-out folds of the samples show another of ``nc``, ``cross``
            μ = 0.9, 0.7, 0.5 better by more than one standard error, scored by the
            model's output error on the fold's images (:mod:`cdfast.layer.selection`;
            with one sample or an iterative solver, the prior alone). Each layer's choice and why are in
            ``report.layers[i].loss`` / ``.choice`` (``report.choices()``); the channels
            of a group are selected with the rows-per-column rule on each consumer
            (``report.groups[j]["selection_loss"]``). Or any loss of
            :func:`cdfast.distill_layer` (``"nc"``, ``"cross"`` …) for every layer.
        mu, solver, steps, lr: as :func:`cdfast.distill_layer` (``mu`` only for
            ``loss="cross"``; ``solver="auto"``: the exact solver where it applies; the
            iterative settings default to the authors' ResNet-56 ones, μ=0.9, lr=1e-3).
            Channels are always chosen on the quadratic of the ``linear`` objective by the
            group OBS rule; ``solver`` fits the weights.
        policy: ``"auto"`` (default: every Conv2d/Linear compressed but the layers that
            read the model's input), ``"resnet"`` (only the layers that read a channel
            group not tied to a residual stream; the rest refit, as the paper does for
            ResNets), ``"skip_first"`` (every Conv2d but the first; Linear layers refit)
            or ``"all"``. The first layers and the residual streams are found from the graph.
        prune_tied: also prune channel groups tied to a residual stream (every layer
            that adds into the stream loses the same channels).
        overrides: per-layer keyword overrides by module name, e.g.
            ``{"layer3.0.conv2": {"compression": None, "steps": 500}}``; ``{"action":
            "skip"}`` leaves a layer untouched, ``{"action": "refit"}`` refits it only.
        fold_bn: fold BatchNorms into the preceding convs at the end.
        augment: more sampled rows from the same images (:mod:`cdfast.model.augment`):
            ``"flip"`` (2 views per image), ``"shift"`` (5: shifted by 2 pixels in the
            four directions), ``"flip+shift"`` (10), or a callable ``x -> list of views``
            shaped like ``x``. Every layer is fit on all views; ``loss="auto"`` holds out
            whole images with their views.
        select_on: what channel selection weighs: ``"output"`` (default) each consumer's
            output error, ``"norm"`` that error after the BatchNorm that follows the
            consumer (each output row weighted by ``(γ/σ)²``).
        target: a budget for the whole student, spent where it costs the least error
            (:mod:`cdfast.model.allocate`): ``"params"`` or ``"flops"`` keeps the count a
            uniform ``ChannelPrune(keep)`` would give but lets each group keep a different
            fraction; ``{"params": n}`` / ``{"flops": n}`` sets the count (an int, or a
            float in (0, 1]: a fraction of the teacher's). Needs a ``ChannelPrune`` (its
            groups are the ones that shrink); ``report.allocation`` says what each kept.
        refine_steps: Adam steps of block-wise refinement after the layer-wise pass
            (:func:`cdfast.model.refine.refine_blocks`: each residual block or stage
            of the student fit to the teacher's on the same samples and views; 0, the
            default, skips it; with ``augment="flip+shift+mix"``, 500 took ResNet-20 at
            K = 1 from 91.06 to 91.68 %). Quantized layers stay frozen; ``report.blocks`` says
            what each block gained. Done after the last checkpointed layer, so a
            resumed run repeats it identically.
        checkpoint: path of a file written after every layer; when it exists the
            compression resumes after the last finished layer (the removed channels
            are replayed on a fresh copy of the teacher first).
        **layer_kwargs: passed on to :func:`cdfast.distill_layer` (``form``,
            ``objective``, ``backend``, ``stats_dtype``, ``fit_bias`` …). With
            ``objective="activation"`` each layer's σ is the BatchNorm that follows it
            (restricted to its remaining channels) and a ReLU.
    """
    start = time.perf_counter()
    # every argument is checked before any work: a bad one never fails after minutes of solving
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher: expected an nn.Module, got {type(teacher).__name__}")
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    for name, flag in (("prune_tied", prune_tied), ("fold_bn", fold_bn), ("progress", progress),
                       ("verbose", verbose)):
        check_bool(name, flag)
    check_positive_int("batch_size", batch_size)
    check_augment(augment)
    if select_on not in ("output", "norm"):
        raise ValueError(f"select_on: expected 'output' or 'norm', got {select_on!r}")
    check_target(target)
    check_positive_int("refine_steps", refine_steps, minimum=0)
    compression = normalize(compression)
    _check_layer_kwargs(layer_kwargs)
    check_arguments(loss=loss, mu=mu, solver=solver, steps=steps, lr=lr, compression=compression,
                    **{k: v for k, v in layer_kwargs.items() if k != "activation"})
    overrides = _check_overrides(overrides)
    checkpoint = ckpt.check_path(checkpoint)
    if data is None:
        raise TypeError("data: expected calibration inputs (a tensor, a Dataset or DataLoader, or a list of "
                        "tensors), got None")
    batches = calibration_batches(data, batch_size)
    if not batches or sum(len(b) for b in batches) == 0:
        raise ValueError("data: expected at least one calibration sample, got none")
    for b in batches:
        check_tensor("data", b)
    images = sum(len(b) for b in batches)
    if augment is not None:  # view-major: view v of image i is sample v·N + i
        batches = list(views(torch.cat(batches), augment).split(batch_size))
    params = list(teacher.parameters())
    device = params[0].device if params else torch.device("cpu")
    if batches[0].device != device:
        raise ValueError(f"data: expected tensors on the model's device {device}, got {batches[0].device}")
    check_finite_model("teacher", teacher)
    teacher_mode = teacher.training
    teacher.eval()
    example = batches[0][:1]
    try:
        order, _ = execution_order(teacher, example)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        teacher.train(teacher_mode)
        raise ValueError(f"data: the teacher cannot run on inputs of shape {tuple(example.shape[1:])} "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    if not order:
        raise ValueError("teacher: has no nn.Conv2d or nn.Linear layer to compress")
    for name in overrides:
        if name not in order:
            raise ValueError(f"overrides: no compressible layer named {name!r}; layers are {order}")
    student = copy.deepcopy(teacher).eval()
    graph = ModelGraph(student, example)
    actions, constraints, keep = plan_policy(policy, order, graph, compression, overrides, prune_tied)
    too_small = {g.root for g in graph.groups if g.root in keep and int(keep[g.root] * g.period + 1e-9) < 1}
    if keep and too_small == set(keep):
        g = next(g for g in graph.groups if g.root in keep)
        raise ValueError(f"keep: {keep[g.root]} of the {g.period} channels of group {g.root!r} keeps none; "
                         "expected a ratio that keeps at least one channel")
    for root in too_small:  # a squeeze-and-excitation bottleneck of one channel, say: left whole
        del keep[root]
    report = CompressionReport(params_before=count_parameters(teacher),
                               flops_before=count_flops(teacher, (1, *batches[0].shape[1:]), batched=True),
                               samples=images, views=sum(len(b) for b in batches) // images)
    loss_kw = {k: layer_kwargs[k] for k in ("alpha", "beta") if k in layer_kwargs}
    select_spec = None if loss == "auto" else LossSpec(loss, mu, objective="linear", **loss_kw)
    stats_kw = dict(dtype=layer_kwargs.get("stats_dtype", torch.float32),
                    fit_bias=layer_kwargs.get("fit_bias", False), backend=layer_kwargs.get("backend", "auto"))
    if target is not None:
        if not keep:
            raise ValueError("target: needs a ChannelPrune in compression (the channel groups it may shrink); "
                             "the policy prunes no group")
        keep.update(_allocate(target, keep, graph, teacher, student, batches, example, select_spec, stats_kw,
                              select_on, report))

    group_of = {}  # consumer → groups it reads that are to be pruned, in graph order
    for g in graph.groups:
        if g.root in keep:
            for c in g.consumers:
                group_of.setdefault(c, []).append(g)
    by_root = {g.root: g for g in graph.groups}

    done: list[str] = []
    pruned: list[tuple[str, list[int]]] = []
    stamp, state = None, None
    if checkpoint:
        settings = dict(compression=compression, loss=loss, mu=mu, solver=solver, steps=steps, lr=lr, policy=policy,
                        prune_tied=prune_tied, overrides=overrides, batch_size=batch_size,
                        augment=getattr(augment, "__qualname__", augment), select_on=select_on, target=target,
                        **layer_kwargs)
        stamp = ckpt.fingerprint(teacher, batches, settings)
        state = ckpt.load(checkpoint, stamp)
        if state is not None:
            try:
                for root, removed in state["pruned"]:
                    graph.prune(by_root[root], removed)
                student.load_state_dict(state["student"])
            except (KeyError, RuntimeError) as exc:
                raise ValueError(f"checkpoint: {checkpoint!r} does not fit this model ({str(exc)[:160]}); "
                                 "delete it to start over") from None
            pruned = [(r, list(rm)) for r, rm in state["pruned"]]
            done = list(state["done"])
            report.layers = [LayerReport(**d) for d in state["layers"]]
            report.shrink = dict(state["shrink"])
            report.quantized = dict(state["quantized"])
    selected = {r for r, _ in pruned}
    selection: dict[str, dict[str, str]] = dict(state.get("selection", {})) if state else {}

    data_form = layer_kwargs.get("form", "auto") == "data" or layer_kwargs.get("objective", "linear") != "linear"

    teacher_outputs = None
    if loss == "auto" and not data_form:  # what loss="auto" scores each layer's candidates against
        with torch.no_grad():
            teacher_outputs = [_flat_output(teacher(x)) for x in batches]
        if any(t is None for t in teacher_outputs):
            teacher_outputs = None

    from tqdm.auto import tqdm

    bar = tqdm(order, desc="cdfast compress", disable=not progress, unit="layer")
    try:
        for name in bar:
            bar.set_postfix_str(name)
            if name in done:
                continue
            if actions[name] == "skip":
                report.layers.append(LayerReport(name, "skipped"))
                done.append(name)
                continue
            t0 = time.perf_counter()
            for g in group_of.get(name, []):  # the first reader of a group chooses its channels
                if g.root not in selected:
                    removed, why = _select(g, keep[g.root], graph, teacher, student, batches, select_spec,
                                           stats_kw, select_on)
                    selection[g.root] = why
                    graph.prune(g, removed)
                    pruned.append((g.root, removed))
                    selected.add(g.root)
            kw = dict(layer_kwargs)
            kw.update(loss=loss, mu=mu, solver=solver, steps=steps, lr=lr)
            kw.update({k: v for k, v in overrides.get(name, {}).items() if k not in ("action", "compression")})
            items = tuple(c for c in constraints[name] if not isinstance(c, ChannelPrune))
            res, inputs, rows, cols = fit_layer(name, teacher, student, graph, batches, items, kw, data_form,
                                                images=images, teacher_outputs=teacher_outputs)
            kept_in = len(inputs.kept)
            action = "compressed" if items or inputs.pruned else "refit"
            lr_ = LayerReport(name, action, res.loss_before, res.loss_after, inputs.full, kept_in, res.sparsity, res.bits,
                              rows, cols, time.perf_counter() - t0, res.solver, res.backend, res.loss,
                              str(res.loss_choice) if res.loss_choice is not None else "")
            report.layers.append(lr_)
            if res.codes is not None:
                report.quantized[name] = {"codes": res.codes, "scale": res.scale, "bits": res.bits}
            if inputs.pruned:
                report.shrink[name] = "removed"
            done.append(name)
            if verbose:
                tqdm.write(lr_.line())
            if checkpoint:
                _save_checkpoint(checkpoint, stamp, student, done, report, pruned, selection)
    except KeyboardInterrupt:
        where = f"{len(done)} of {len(order)} layers"
        if checkpoint:
            print(f"\ncdfast: interrupted after {where}; {checkpoint} holds them: run the same call again "
                  "to resume", file=sys.stderr)
        else:
            print(f"\ncdfast: interrupted after {where}; pass checkpoint='run.pt' to be able to resume",
                  file=sys.stderr)
        teacher.train(teacher_mode)
        raise
    finally:
        bar.close()

    for g in graph.groups:
        removed = next((rm for r, rm in pruned if r == g.root), None)
        status = ("pruned" if removed is not None else g.reason or
                  ("tied to a residual stream" if g.tied and not prune_tied else
                   "too few channels for the ratio" if g.root in too_small else "not compressed"))
        entry = {"root": g.root, "channels": g.channels, "kept": g.channels - len(removed or []),
                 "consumers": list(g.consumers), "status": status}
        if selection.get(g.root):  # loss="auto": the loss each consumer's selection quadratic used, and why
            entry["selection_loss"] = selection[g.root]
        report.groups.append(entry)
    report.kept_outputs = {n: graph.kept_out[n].clone() for n in graph.layers
                           if len(graph.kept_out[n]) < ModelGraph._width(teacher.get_submodule(n), "out")}
    if refine_steps:
        from .refine import refine_blocks

        fitted = [l.name for l in report.layers if l.action in ("compressed", "refit")]
        report.blocks = refine_blocks(teacher, student, batches, steps=refine_steps, layers=fitted,
                                      frozen=report.quantized, kept_outputs=report.kept_outputs,
                                      batch_size=batch_size, progress=progress)
        if verbose:
            for b in report.blocks:
                tqdm.write(b.line())
    if fold_bn:
        fold_batchnorm(student, execution_order(student, example)[1])
    report.params_after = count_parameters(student)
    report.flops_after = count_flops(student, (1, *batches[0].shape[1:]), batched=True)
    report.seconds = time.perf_counter() - start
    teacher.train(teacher_mode)
    return student, report
