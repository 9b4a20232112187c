"""Channel groups from a dependency graph: which channels must go together, and removing them.

cdfast does not trace networks itself: Torch-Pruning's ``DependencyGraph`` follows the
autograd graph of one forward pass and knows how every layer type couples its
channels (a conv's inputs with its producers' outputs through BatchNorm, LayerNorm,
GroupNorm, activations and pooling; residual additions and multiplications that tie
several producers; concatenations and flattens that shift indices; depthwise convs
whose inputs are their outputs). Its pruning functions then remove a group's
channels from every member. This module reads that graph into
:class:`ChannelGroup` records for :func:`cdfast.compress`:

* **producers**: the Conv2d/Linear layers whose output channels the group is;
* **consumers**: the Conv2d/Linear layers that read them as input channels (their
  columns are what the selection weighs, SPEC §3), with the index of every column;
* **tied**: the channels are *added* to another producer's (a residual stream, the
  paper's reason to leave ResNet block outputs alone, SPEC §4), found from the
  graph's ``add``/``sub`` nodes, not from names;
* a **reason** when the group cannot be pruned: it is the model's output, passes
  through an attention product (softmax/matmul of activations, whose heads the graph
  does not know), or holds a layer cdfast cannot refit (transposed convs, RNNs,
  ``nn.MultiheadAttention``).

:class:`ModelGraph` also tracks, for every Conv2d/Linear of the pruned model, which
of the teacher's input and output channels it still has, so that each layer can be
fit against the teacher's full-width layer.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

__all__ = ["ChannelGroup", "ModelGraph", "is_depthwise"]

COMPRESSIBLE = (nn.Conv2d, nn.Linear)
_RESIDUAL_OPS = ("AddBackward", "SubBackward")
_ATTENTION_OPS = ("SoftmaxBackward", "BmmBackward", "BaddbmmBackward", "MatmulBackward", "ScaledDotProduct",
                  "LogSoftmaxBackward")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
          nn.PReLU)


def is_depthwise(m: nn.Module) -> bool:
    """A conv whose every output channel reads only the input channel of the same index."""
    return isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels


@dataclass
class ChannelGroup:
    """One set of coupled channels (indices in the root's output channels).

    ``units``: channels that must be removed together, ``c`` and ``c + k·period``
    (a grouped conv reads the same position in each of its groups); ``blocks``: the
    number of contiguous blocks that must keep equal counts (a grouped conv's output
    groups).
    """

    root: str
    channels: int
    producers: list[str] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    passthrough: list[str] = field(default_factory=list)
    tied: bool = False
    reason: str = ""
    period: int = 0
    blocks: int = 1

    @property
    def prunable(self) -> bool:
        return not self.reason

    def units(self, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(unit of every channel, block of every unit)`` for the group at width ``channels``."""
        period = self.period * channels // self.channels
        unit = torch.arange(channels) % period
        block = (torch.arange(period) * self.blocks) // period
        return unit, block


class ModelGraph:
    """Torch-Pruning's dependency graph of ``model`` read into channel groups.

    ``model`` is the network that will be pruned (in place, by :meth:`prune`);
    ``example`` one input batch.
    """

    def __init__(self, model: nn.Module, example: torch.Tensor):
        import torch_pruning as tp

        self.model = model
        self.names = {m: n for n, m in model.named_modules()}
        grads = {p: p.requires_grad for p in model.parameters()}
        for p in grads:
            p.requires_grad_(True)
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.dg = tp.DependencyGraph().build_dependency(model, example_inputs=(example,), verbose=False)
        finally:
            for p, g in grads.items():
                p.requires_grad_(g)
        self.layers = [n for n, m in model.named_modules() if isinstance(m, COMPRESSIBLE) and m in self.dg.module2node]
        self.kept_in = {n: torch.arange(self._width(model.get_submodule(n), "in")) for n in self.layers}
        self.kept_out = {n: torch.arange(self._width(model.get_submodule(n), "out")) for n in self.layers}
        self.first_layers = self._first_layers()
        self.groups = [self._describe(g) for g in self.dg.get_all_groups(root_module_types=COMPRESSIBLE)]
        self.groups = [g for g in self.groups if g is not None]

    # ------------------------------------------------------------------ reading
    @staticmethod
    def _width(m: nn.Module, side: str) -> int:
        if isinstance(m, nn.Linear):
            return m.in_features if side == "in" else m.out_features
        return m.in_channels if side == "in" else m.out_channels

    def _role(self, dep) -> str:
        """``producer``, ``consumer``, ``passthrough`` or ``other`` for one dependency."""
        m = dep.target.module
        if not isinstance(m, COMPRESSIBLE):
            return "other"
        if is_depthwise(m):
            return "passthrough"
        pruner = self.dg.get_pruner_of_module(m)
        return "consumer" if dep.handler == pruner.prune_in_channels else "producer"

    def _first_layers(self) -> set[str]:
        """Conv2d/Linear layers with no Conv2d/Linear upstream: they read the model's input."""
        first = set()
        for n in self.layers:
            node = self.dg.module2node[self.model.get_submodule(n)]
            stack, seen, upstream = list(node.inputs), set(), False
            while stack and not upstream:
                x = stack.pop()
                if x in seen:
                    continue
                seen.add(x)
                upstream = isinstance(x.module, COMPRESSIBLE)
                stack.extend(x.inputs)
            if not upstream:
                first.add(n)
        return first

    def following_norm(self, name: str) -> nn.Module | None:
        """The BatchNorm that directly follows layer ``name`` (for the activation objective)."""
        node = self.dg.module2node.get(self.model.get_submodule(name))
        if node is not None and len(node.outputs) == 1 and \
                isinstance(node.outputs[0].module, nn.modules.batchnorm._BatchNorm):
            return node.outputs[0].module
        return None

    def _describe(self, group) -> ChannelGroup | None:
        from torch_pruning import ops

        root = group[0].dep.target.module
        if root not in self.names:
            return None
        g = ChannelGroup(self.names[root], len(group[0].idxs))
        nodes = {dep.target for dep, _ in group}
        period, reasons = g.channels, []
        for item in group:
            dep, m = item.dep, item.dep.target.module
            role = self._role(dep)
            name = self.names.get(m, "")
            if role == "producer":
                g.producers.append(name)
                if not dep.target.outputs:
                    reasons.append("feeds the model's output")
                if getattr(m, "groups", 1) > 1:
                    if m.out_channels != g.channels:
                        reasons.append(f"grouped conv {name} writes them at shifted indices")
                    g.blocks = math.lcm(g.blocks, m.groups)
            elif role == "consumer":
                g.consumers.append(name)
                if getattr(m, "groups", 1) > 1:
                    if list(item.idxs) != list(item.root_idxs) or m.in_channels != g.channels:
                        reasons.append(f"grouped conv {name} reads them at shifted indices")
                    else:
                        period = math.gcd(period, g.channels // m.groups)
            elif role == "passthrough":
                g.passthrough.append(name)
            elif isinstance(m, ops._OutputOp):
                reasons.append("feeds the model's output")
            elif isinstance(m, ops._ElementWiseOp):
                op = str(m._grad_fn)
                if op.startswith(_RESIDUAL_OPS) and sum(x in nodes for x in dep.target.inputs) > 1:
                    g.tied = True
                if op.startswith(_ATTENTION_OPS):
                    reasons.append("passes through an attention product (heads unknown to the graph)")
            elif isinstance(m, nn.Module) and not isinstance(m, _NORMS) and \
                    not isinstance(m, (ops._ConcatOp, ops._SplitOp, ops._ReshapeOp, ops._UnbindOp, ops._ExpandOp,
                                       ops._SliceOp)):
                reasons.append(f"holds {type(m).__name__}, which cdfast cannot refit")
        if not g.consumers:
            reasons.append("no Conv2d/Linear reads them")
        g.period = period
        if g.blocks > 1 and (period != g.channels or g.channels % g.blocks):
            reasons.append("grouped convolutions of different group counts")
        g.reason = "; ".join(dict.fromkeys(reasons))
        g.consumers = list(dict.fromkeys(g.consumers))
        return g

    def members(self, group: ChannelGroup, idxs: list[int] | None = None):
        """Torch-Pruning's group for ``group`` now (its indices follow earlier removals)."""
        root = self.model.get_submodule(group.root)
        fn = self.dg.get_pruner_of_module(root).prune_out_channels
        if idxs is None:
            idxs = list(range(self._width(root, "out")))
        return self.dg.get_pruning_group(root, fn, idxs)

    def consumer_columns(self, group: ChannelGroup) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per consumer: ``(its input channel indices now, the group channel of each)``."""
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for item in self.members(group):
            if self._role(item.dep) == "consumer":
                name = self.names[item.dep.target.module]
                idx, root = torch.as_tensor(list(item.idxs)), torch.as_tensor(list(item.root_idxs))
                if name in out:
                    idx, root = torch.cat([out[name][0], idx]), torch.cat([out[name][1], root])
                out[name] = (idx, root)
        return out

    # ------------------------------------------------------------------ pruning
    def prune(self, group: ChannelGroup, remove: list[int]) -> None:
        """Remove the group's channels ``remove`` (indices now) from every member, in place."""
        if not remove:
            return
        tp_group = self.members(group, sorted(int(i) for i in remove))
        for item in tp_group:
            m = item.dep.target.module
            name = self.names.get(m)
            if name not in self.kept_in:
                continue
            role = self._role(item.dep)
            sides = ("in", "out") if role == "passthrough" else (("in",) if role == "consumer" else ("out",))
            for side in sides:
                kept = self.kept_in if side == "in" else self.kept_out
                alive = torch.ones(len(kept[name]), dtype=torch.bool)
                alive[list(item.idxs)] = False
                kept[name] = kept[name][alive]
        tp_group.prune()
