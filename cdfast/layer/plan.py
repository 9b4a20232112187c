r"""How a layer's constraints unfold over an iterative solve (SPEC §3, §4).

:class:`ConstraintPlan` turns the user's constraints into two things:

* a :class:`StepSchedule`, computed once, as plain data: for every step ``i`` the
  learning-rate factor, the number of input channels or weights the budget keeps
  from then on, the step at which an N:M mask is drawn, and the first step whose
  iterate already satisfies the final constraint. Every backend's solver (the
  torch and Triton host loops, the persistent CUDA kernel) reads this one table,
  so the authors' schedule exists in one place;
* the mutable state of the solve: the ``mask`` (True where a weight may be
  non-zero) and the quantization grid ``scale``, with the operations that change
  them (:meth:`ConstraintPlan.update_mask`, :meth:`ConstraintPlan.after_step`,
  :meth:`ConstraintPlan.init_scale`).

The authors' schedule (their released ``chnl_learner.py``), for ``T`` steps and a
ramp fraction ``r`` (1/3): at step ``i ≤ ⌊T·r⌋`` the kept channel count is

    k_i = ⌊(C_in − k)·((T·r − i)/(T·r))⌋ + k          (evaluated in that order)

and the mask shrinks whenever ``k_i`` drops; for ``i > ⌊T·r⌋ + 1`` the learning rate
is ``lr·lr_drop``. Weight budgets fall linearly in density over the same ramp. Where
the ramp is too short for the formula to reach the target (``T`` of a few steps),
the last schedule step projects onto the target itself, so a budget is always met.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .constraints import (ChannelPrune, FixedSupport, GroupLasso, L1, NMSparsity, Quantize, WeightPrune,
                          channel_norms, expand_channels, nm_mask, normalize)
from .geometry import LayerGeometry

__all__ = ["ConstraintPlan", "StepSchedule", "PROJECTION_OPS"]

#: Elements of the weight per chunk of rows when :meth:`ConstraintPlan.init_scale` scores the ratios.
SCALE_CHUNK_ELEMENTS = 1 << 20
#: The projection operators a plan calls, resolved once per solve through the dispatcher.
PROJECTION_OPS = ("soft_threshold", "group_shrink", "topk_mask", "quantize")


@dataclass(frozen=True)
class StepSchedule:
    """The per-step constants of an iterative solve, shared by every backend.

    Attributes:
        steps: number of steps ``T``.
        lr_factor: ``lr_i / lr`` for each step (the drop after a channel ramp).
        channel_k: input channels per group kept after step ``i``'s schedule, or 0
            where the channel budget does not shrink at step ``i``.
        weight_k: weights kept after step ``i``'s top-k selection, or −1 where there
            is no selection at step ``i``.
        nm_step: the step after which the N:M mask is drawn (−1: none).
        final_from: the first step whose iterate (the weight the step's gradient is
            taken at) already carries the final mask: 0 without a budget. Only such
            iterates are candidates for the best projected iterate, and from there on
            the pruned columns never change (the solve can be compacted).
    """

    steps: int
    lr_factor: tuple[float, ...]
    channel_k: tuple[int, ...]
    weight_k: tuple[int, ...]
    nm_step: int
    final_from: int

    def changes_mask(self, step: int) -> bool:
        """Whether step ``step``'s schedule can change the mask."""
        return self.channel_k[step] > 0 or self.weight_k[step] >= 0 or step == self.nm_step

    def optimizer_table(self, lr: float, betas: tuple[float, float]) -> list[tuple[float, float, float]]:
        """Per step ``(lr_i, lr_i/(1−β₁ᵗ), √(1−β₂ᵗ))``, ``t = i + 1``: the learning rate and
        Adam's bias corrections, as ``torch.optim.Adam`` forms them."""
        b1, b2 = betas
        out = []
        for i, f in enumerate(self.lr_factor):
            lr_i, t = lr * f, i + 1
            out.append((lr_i, lr_i / (1 - b1 ** t), (1 - b2 ** t) ** 0.5))
        return out


class ConstraintPlan:
    """A layer's constraints during one solve: the schedule, the mask, the grid scale.

    Args:
        compression: a constraint or a list of them (see :mod:`cdfast.layer.constraints`).
        geometry: the layer's :class:`~cdfast.layer.geometry.LayerGeometry`.
        steps: iterations of the solve (the exact solver passes any positive number).
        cols: columns of the matrix view (``D``, or ``D + 1`` with a fitted bias).
        device, dtype: of the weight being solved.
        backend, strict: how the projection operators are resolved (:mod:`cdfast.dispatch`).

    The solver takes gradients at :meth:`effective` (the quantized weight,
    straight-through) and calls :meth:`after_step` after every optimizer step.
    Masked coordinates are zero in the weight; the solver zeroes them in the
    gradient and the optimizer state too (``plan.mask``).
    """

    def __init__(self, compression, geometry: LayerGeometry, steps: int, cols: int,
                 device, dtype, backend: str | None = "auto", strict: bool | None = None):
        from ..dispatch import resolve

        self.items = normalize(compression)
        self.ops = {name: resolve(name, device, backend, strict)[1] for name in PROJECTION_OPS}
        self.geometry = geometry
        self.steps = steps
        self.cols = cols
        self.channel = next((c for c in self.items if isinstance(c, ChannelPrune)), None)
        self.weight = next((c for c in self.items if isinstance(c, WeightPrune)), None)
        self.nm = next((c for c in self.items if isinstance(c, NMSparsity)), None)
        self.quant = next((c for c in self.items if isinstance(c, Quantize)), None)
        self.penalties = [c for c in self.items if isinstance(c, (GroupLasso, L1))]
        self.mask = torch.ones((geometry.groups, geometry.group_out, cols), dtype=torch.bool, device=device)
        self.fixed = next((c for c in self.items if isinstance(c, FixedSupport)), None)
        if self.fixed is not None:  # the solvers start at A·mask and never leave the support
            self.mask &= self.fixed.matrix_mask(geometry, cols, device)
        self.scale: torch.Tensor | None = None
        g = geometry
        if self.channel is not None:
            self.target_channels = int(self.channel.keep * g.group_in + 1e-9)
            if self.target_channels < 1:
                raise ValueError(f"keep: {self.channel.keep} of {g.group_in} input channels keeps none; "
                                 "expected a ratio that keeps at least one channel")
        if self.weight is not None:
            self.numel = int(self.mask[..., :g.cols].sum()) if self.fixed is not None else g.out_channels * g.cols
            if int(self.weight.density * self.numel + 1e-9) < 1:
                raise ValueError(f"density: {self.weight.density} of {self.numel} weights keeps none")
        if self.nm is not None and g.group_in % self.nm.m:
            raise ValueError(f"NMSparsity: m={self.nm.m} must divide the input channels per group "
                             f"({g.group_in})")
        self.schedule = self._build_schedule()

    # ------------------------------------------------------------ the schedule
    def _build_schedule(self) -> StepSchedule:
        T = self.steps
        budget = self.channel or self.weight
        ramp = budget.ramp if budget is not None else 1 / 3
        # T / (1/r) is T/3 exactly for the default r = 1/3, as the released code forms it.
        ramp_float = T / (1.0 / ramp) if ramp > 0 else 0.0
        ramp_end = min(int(ramp_float), T - 1)
        masked = budget is not None or self.nm is not None
        lr_factor = [self.channel.lr_drop if (self.channel is not None and i > ramp_end + 1) else 1.0
                     for i in range(T)]
        channel_k, weight_k = [0] * T, [-1] * T
        g = self.geometry
        if self.channel is not None:
            prev = g.group_in
            for i in range(ramp_end + 1):
                frac = (ramp_float - i) / ramp_float if ramp_float > 0 else 0.0
                k = int((g.group_in - self.target_channels) * frac) + self.target_channels
                if i == ramp_end:  # a ramp too short for the formula still ends on the budget
                    k = self.target_channels
                if k < prev:
                    channel_k[i], prev = k, k
        if self.weight is not None:
            for i in range(ramp_end + 1):
                frac = (ramp_end - i) / ramp_end if ramp_end > 0 else 0.0
                k = int(self.numel * (self.weight.density + (1 - self.weight.density) * frac) + 1e-9)
                if k < self.numel:  # keeping every weight changes nothing
                    weight_k[i] = k
        return StepSchedule(T, tuple(lr_factor), tuple(channel_k), tuple(weight_k),
                            ramp_end if self.nm is not None else -1, ramp_end + 1 if masked else 0)

    @property
    def compactable(self) -> bool:
        """Whether, once the mask is final, a solver may drop the pruned columns: a channel
        budget (the same columns for every row) and nothing else that moves them."""
        fixed_channels = self.fixed is not None and self.fixed.channels is not None and self.weight is None
        return (self.channel is not None or fixed_channels) and not self.penalties and self.geometry.groups == 1

    def lr_factor(self, step: int) -> float:
        return self.schedule.lr_factor[step]

    def update_mask(self, W: torch.Tensor, step: int,
                    norms_fn: Callable[[], torch.Tensor] | None = None) -> bool:
        """Step ``step``'s budget selection: shrink the mask (not ``W``) to the channels or
        weights of largest magnitude in ``W``. ``norms_fn`` computes the per-group channel
        norms of ``W`` (a backend passes its own kernel); it is only called when the
        channel budget drops. Returns True when the mask changed."""
        sched, g = self.schedule, self.geometry
        changed = False
        k = sched.channel_k[step]
        if k > 0:
            norms = norms_fn() if norms_fn is not None else channel_norms(W, g)
            keep = torch.stack([self.ops["topk_mask"](norms[i], k) for i in range(g.groups)])
            self.mask &= expand_channels(keep, g, self.cols).expand_as(self.mask)
            changed = True
        k = sched.weight_k[step]
        if k >= 0:
            keep = self.ops["topk_mask"](W[..., :g.cols].abs(), k)
            new = self.mask.clone()
            new[..., :g.cols] &= keep
            changed = changed or not torch.equal(new, self.mask)
            self.mask = new
        if step == sched.nm_step:
            self.mask &= nm_mask(W.abs(), g, self.nm.n, self.nm.m)
            changed = True
        return changed

    def after_step(self, W: torch.Tensor, step: int, lr: float) -> bool:
        """The schedule, then the proximal maps, after optimizer step ``step`` (in place on
        ``W``); the torch path of every backend. Returns True when the mask changed."""
        changed = self.update_mask(W, step)
        cols = self.geometry.cols
        for p in self.penalties:
            t = lr * p.strength
            if t == 0:
                continue
            if isinstance(p, L1):
                W[..., :cols] = self.ops["soft_threshold"](W[..., :cols], t)
            else:
                W.copy_(self.ops["group_shrink"](W, self.geometry, t))
        if changed:
            W.mul_(self.mask)
        return changed

    # ------------------------------------------------- the straight-through quantizer
    def init_scale(self, W: torch.Tensor, row_loss=None) -> None:
        """Pick the grid scale: the clipping ratio that minimises ``row_loss(Q(W))``.

        ``row_loss(values, rows) -> (G, len(rows))`` scores the output rows ``rows`` of a
        quantized weight (``values`` holds those rows); without it the plain squared
        rounding error is used. Rows go a chunk at a time (a wide layer's weight is not
        copied per ratio); the first of equally good ratios wins.
        """
        if self.quant is None:
            return
        w = W[..., :self.geometry.cols]
        per_channel = self.quant.per_channel
        amax = torch.linalg.vector_norm(w, float("inf"), dim=-1, keepdim=True)  # max |w|, no |W| formed
        if not per_channel:
            amax = amax.amax().reshape(1, 1, 1)
        amax = amax.clamp_min(torch.finfo(W.dtype).tiny)
        ratios = torch.linspace(0.3, 1.0, 15).tolist()
        G, R, D = W.shape
        losses = W.new_empty(G, R, len(ratios))
        step = max(1, SCALE_CHUNK_ELEMENTS // D)
        for r0 in range(0, R, step):
            rows = slice(r0, r0 + step)
            a = amax[:, rows] if per_channel else amax
            for k, ratio in enumerate(ratios):
                vals = self.project(W[:, rows], a * ratio)
                losses[:, rows, k] = row_loss(vals, rows) if row_loss is not None else \
                    (vals - W[:, rows]).pow(2).sum(-1)
        if per_channel:
            best = losses.argmin(-1, keepdim=True)
        else:
            best = losses.sum(dim=(0, 1)).argmin().reshape(1, 1, 1)
        self.scale = amax * torch.tensor(ratios, dtype=W.dtype, device=W.device)[best]

    def project(self, W: torch.Tensor, scale: torch.Tensor, weight_cols: int | None = None) -> torch.Tensor:
        """``W`` with its first ``weight_cols`` columns (default: the layer's weight columns)
        rounded to the grid of ``scale``; a bias column passes through."""
        c = self.geometry.cols if weight_cols is None else weight_cols
        _, vals = self.ops["quantize"](W[..., :c], scale, self.quant.bits)
        if W.shape[-1] > c:
            vals = torch.cat([vals, W[..., c:]], dim=-1)
        return vals

    def effective(self, W: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """The weight the loss sees: the quantized latent weight (straight-through); ``W`` may
        hold only the output rows ``rows``."""
        if self.quant is None:
            return W
        scale = self.scale[:, rows] if self.scale.shape[1] > 1 else self.scale
        return self.project(W, scale) * self.mask[:, rows]

    def codes(self, W: torch.Tensor, weight_cols: int | None = None, rows: slice = slice(None)) -> torch.Tensor:
        """The grid codes of ``W`` (which holds the output rows ``rows``)."""
        c = self.geometry.cols if weight_cols is None else weight_cols
        scale = self.scale[:, rows] if self.scale.shape[1] > 1 else self.scale
        return self.ops["quantize"](W[..., :c], scale, self.quant.bits)[0]

    # --------------------------------------------------------------- results
    def kept_channels(self) -> torch.Tensor | None:
        """Indices of the input channels that survive (any output row uses them)."""
        g = self.geometry
        used = self.mask[..., :g.cols].reshape(g.groups, -1, g.group_in, g.taps).any(dim=1).any(dim=-1)
        if bool(used.all()) and self.channel is None and self.fixed is None:
            return None
        return torch.nonzero(used.reshape(-1)).flatten()
