r"""Compression constraints (SPEC §3): budgets, penalties and quantization.

A user describes *what* to compress with the small frozen objects below and
passes one (or a list, to prune and quantize together) as ``compression=``:

==================  =================================================================
``ChannelPrune``     keep the top-``keep`` fraction of input channels by ``‖W[:, i]‖₂``
``WeightPrune``      keep the top-``density`` fraction of weights by ``|w|``
``NMSparsity``       keep ``n`` of every ``m`` consecutive input channels per tap
``GroupLasso``       penalty ``λ·Σ_i ‖W[:, i]‖₂`` over input channels (proximal step)
``L1``               penalty ``λ·‖W‖₁`` (soft threshold)
``Quantize``         ``bits``-bit weights ``s·{0, ±1/L, …, ±1}``, ``L = 2^(bits−1) − 1``
==================  =================================================================

The pure functions (``soft_threshold``, ``group_shrink``, ``topk_mask`` …) are the
proximal maps and projections themselves; :class:`ConstraintPlan` sequences them
during a solve (the authors' linear schedules, the mask, the lr drop).
All functions work on the matrix view ``(G, C_out/G, D[+1])`` of
:mod:`cdfast.geometry`; a fitted bias column is never pruned or quantized.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ._validation import check_fraction, check_nonneg_float, check_positive_int
from .geometry import LayerGeometry

__all__ = ["ChannelPrune", "WeightPrune", "NMSparsity", "GroupLasso", "L1", "Quantize",
           "soft_threshold", "group_shrink", "channel_norms", "topk_mask", "nm_mask",
           "quantize", "ConstraintPlan"]


# ---------------------------------------------------------------- user-facing
@dataclass(frozen=True)
class ChannelPrune:
    """Structured pruning of input channels to a budget (the authors' procedure).

    Args:
        keep: fraction of input channels kept, in (0, 1]; ``int(keep·C_in)`` channels
            (per group for grouped convolutions) must be at least 1.
        ramp: fraction of the steps over which the kept count falls linearly from
            ``C_in`` to the target; then the mask is fixed.
        lr_drop: learning-rate factor after the ramp (the authors divide by 10).
    """

    keep: float
    ramp: float = 1 / 3
    lr_drop: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "keep", check_fraction("keep", self.keep))
        object.__setattr__(self, "ramp", check_fraction("ramp", self.ramp, low_open=False))
        object.__setattr__(self, "lr_drop", check_fraction("lr_drop", self.lr_drop))


@dataclass(frozen=True)
class WeightPrune:
    """Unstructured pruning to a budget: keep the top ``density`` fraction of ``|w|``."""

    density: float
    ramp: float = 1 / 3

    def __post_init__(self):
        object.__setattr__(self, "density", check_fraction("density", self.density))
        object.__setattr__(self, "ramp", check_fraction("ramp", self.ramp, low_open=False))


@dataclass(frozen=True)
class NMSparsity:
    """``n:m`` sparsity along input channels (for each output channel and kernel tap)."""

    n: int = 2
    m: int = 4

    def __post_init__(self):
        check_positive_int("m", self.m)
        check_positive_int("n", self.n)
        if self.n > self.m:
            raise ValueError(f"n: expected n <= m={self.m}, got {self.n}")


@dataclass(frozen=True)
class GroupLasso:
    """Penalty ``λ·Σ_i ‖W[:, i]‖₂``; prox ``W_i ← max(1 − lr·λ/‖W_i‖₂, 0)·W_i``."""

    strength: float

    def __post_init__(self):
        object.__setattr__(self, "strength", check_nonneg_float("strength", self.strength))


@dataclass(frozen=True)
class L1:
    """Penalty ``λ·‖W‖₁``; prox ``w ← sign(w)·max(|w| − lr·λ, 0)``."""

    strength: float

    def __post_init__(self):
        object.__setattr__(self, "strength", check_nonneg_float("strength", self.strength))


@dataclass(frozen=True)
class Quantize:
    """``bits``-bit weights on the grid ``s·{0, ±1/L, …, ±1}``, ``L = 2^(bits−1) − 1``.

    Args:
        bits: 2…8.
        per_channel: one scale per output channel (default) or one per layer.
    """

    bits: int
    per_channel: bool = True

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"bits: expected an int in 2..8, got {type(self.bits).__name__}")
        if not 2 <= self.bits <= 8:
            raise ValueError(f"bits: expected an int in 2..8, got {self.bits}")

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1


CONSTRAINT_TYPES = (ChannelPrune, WeightPrune, NMSparsity, GroupLasso, L1, Quantize)


def normalize(compression) -> tuple:
    """``None``, one constraint or a sequence → a validated tuple of constraints."""
    if compression is None:
        return ()
    items = tuple(compression) if isinstance(compression, (list, tuple)) else (compression,)
    for c in items:
        if not isinstance(c, CONSTRAINT_TYPES):
            raise TypeError("compression: expected ChannelPrune, WeightPrune, NMSparsity, GroupLasso, "
                            f"L1, Quantize or a list of them, got {type(c).__name__}")
    masks = [c for c in items if isinstance(c, (ChannelPrune, WeightPrune, NMSparsity))]
    if len(masks) > 1:
        raise ValueError("compression: at most one of ChannelPrune, WeightPrune, NMSparsity per layer")
    if sum(isinstance(c, Quantize) for c in items) > 1:
        raise ValueError("compression: at most one Quantize per layer")
    return items


# ------------------------------------------------------------ pure operators
def soft_threshold(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """Prox of ``t·‖w‖₁``: ``sign(w)·max(|w| − t, 0)``."""
    return torch.sign(w) * torch.clamp(w.abs() - threshold, min=0.0)


def channel_norms(W: torch.Tensor, geometry: LayerGeometry) -> torch.Tensor:
    """``‖W[:, i]‖₂`` per input channel, shape ``(G, C_in/G)``."""
    g = geometry
    w = W[..., :g.cols].reshape(g.groups, -1, g.group_in, g.taps)
    return w.pow(2).sum(dim=(1, 3)).sqrt()


def expand_channels(channel_values: torch.Tensor, geometry: LayerGeometry, cols: int) -> torch.Tensor:
    """``(G, C_in/G)`` per-channel values → ``(G, 1, cols)`` per-column (bias column → 1)."""
    per_col = channel_values.repeat_interleave(geometry.taps, dim=1)
    if cols > geometry.cols:
        per_col = torch.cat([per_col, torch.ones_like(per_col[:, :1])], dim=1)
    return per_col.unsqueeze(1)


def group_shrink(W: torch.Tensor, geometry: LayerGeometry, threshold: float) -> torch.Tensor:
    """Prox of ``t·Σ_i ‖W[:, i]‖₂``: ``W_i ← max(1 − t/‖W_i‖₂, 0)·W_i``."""
    norms = channel_norms(W, geometry)
    factor = torch.clamp(1.0 - threshold / norms.clamp_min(torch.finfo(W.dtype).tiny), min=0.0)
    return W * expand_channels(factor, geometry, W.shape[-1]).to(W.dtype)


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest entries of ``scores`` (flattened); ties by index."""
    flat = scores.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if k > 0:
        mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view_as(scores)


def nm_mask(scores: torch.Tensor, geometry: LayerGeometry, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive input channels, per row and tap."""
    g = geometry
    s = scores[..., :g.cols].reshape(g.groups, -1, g.group_in // m, m, g.taps)
    idx = torch.topk(s, n, dim=3).indices
    keep = torch.zeros_like(s, dtype=torch.bool).scatter_(3, idx, True)
    keep = keep.reshape(g.groups, -1, g.cols)
    if scores.shape[-1] > g.cols:
        keep = torch.cat([keep, torch.ones_like(keep[..., :1])], dim=-1)
    return keep


def quantize(W: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round ``W`` to the grid ``scale·{0, ±1/L, …, ±1}``: returns ``(codes, values)``.

    ``codes`` are integers in ``[−L, L]`` (int8), ``values = codes·scale/L``.
    """
    L = 2 ** (bits - 1) - 1
    codes = torch.clamp(torch.round(W / scale * L), -L, L)
    return codes.to(torch.int8), codes * (scale / L)


# ------------------------------------------------------------ the schedule
class ConstraintPlan:
    """Applies a layer's constraints during an iterative solve.

    The solver calls :meth:`effective` to get the weight at which the gradient is
    taken (the quantized weight, straight-through), and :meth:`after_step` after
    every optimizer step (schedules, masks, proximal maps). Masked coordinates are
    zero in the weight and must be zeroed in the gradient and optimizer state by
    the solver (``plan.mask``).
    """

    def __init__(self, compression, geometry: LayerGeometry, steps: int, cols: int,
                 device, dtype, backend: str | None = "auto", strict: bool | None = None):
        from .dispatch import resolve

        self.items = normalize(compression)
        # The projection operators, resolved once (torch, or the C++/CUDA kernels).
        self.ops = {name: resolve(name, device, backend, strict)[1]
                    for name in ("soft_threshold", "group_shrink", "topk_mask", "quantize")}
        self.geometry = geometry
        self.steps = steps
        self.cols = cols
        self.channel = next((c for c in self.items if isinstance(c, ChannelPrune)), None)
        self.weight = next((c for c in self.items if isinstance(c, WeightPrune)), None)
        self.nm = next((c for c in self.items if isinstance(c, NMSparsity)), None)
        self.quant = next((c for c in self.items if isinstance(c, Quantize)), None)
        self.penalties = [c for c in self.items if isinstance(c, (GroupLasso, L1))]
        shape = (geometry.groups, geometry.group_out, cols)
        self.mask = torch.ones(shape, dtype=torch.bool, device=device)
        self.scale: torch.Tensor | None = None
        self.mask_fixed = self.channel is None and self.weight is None and self.nm is None
        g = geometry
        if self.channel is not None:
            self.target_channels = int(self.channel.keep * g.group_in + 1e-9)
            if self.target_channels < 1:
                raise ValueError(f"keep: {self.channel.keep} of {g.group_in} input channels keeps none; "
                                 "expected a ratio that keeps at least one channel")
            self._channels_prev = g.group_in
        if self.weight is not None:
            self.numel = g.out_channels * g.cols
            if int(self.weight.density * self.numel + 1e-9) < 1:
                raise ValueError(f"density: {self.weight.density} of {self.numel} weights keeps none")
        if self.nm is not None and g.group_in % self.nm.m:
            raise ValueError(f"NMSparsity: m={self.nm.m} must divide the input channels per group "
                             f"({g.group_in})")
        ramp = (self.channel or self.weight).ramp if (self.channel or self.weight) else 1 / 3
        self.ramp_float = steps * ramp
        self.ramp_end = int(self.ramp_float)

    # -- the straight-through quantizer
    def init_scale(self, W: torch.Tensor, row_loss=None) -> None:
        """Pick the grid scale: the clipping ratio that minimises ``row_loss(Q(W))``.

        ``row_loss(values) -> (G, C_out/G)`` scores a quantized weight per row;
        without it the plain squared rounding error is used.
        """
        if self.quant is None:
            return
        w = W[..., :self.geometry.cols]
        if self.quant.per_channel:
            amax = w.abs().amax(dim=-1, keepdim=True)
        else:
            amax = w.abs().amax().reshape(1, 1, 1)
        amax = amax.clamp_min(torch.finfo(W.dtype).tiny)
        best, best_loss = None, None
        for ratio in torch.linspace(0.3, 1.0, 15).tolist():
            scale = amax * ratio
            vals = self._project(W, scale)
            loss = row_loss(vals) if row_loss is not None else (vals - W).pow(2).sum(-1)
            if not self.quant.per_channel:
                loss = loss.sum().reshape(1, 1)
            loss = loss.unsqueeze(-1)
            if best is None:
                best, best_loss = scale.expand_as(loss).clone(), loss
            else:
                better = loss < best_loss
                best = torch.where(better, scale.expand_as(loss), best)
                best_loss = torch.where(better, loss, best_loss)
        self.scale = best if self.quant.per_channel else best.reshape(1, 1, 1)

    def _project(self, W: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        c = self.geometry.cols
        _, vals = self.ops["quantize"](W[..., :c], scale, self.quant.bits)
        if W.shape[-1] > c:
            vals = torch.cat([vals, W[..., c:]], dim=-1)
        return vals

    def effective(self, W: torch.Tensor) -> torch.Tensor:
        """The weight the loss sees: the quantized latent weight (straight-through)."""
        if self.quant is None:
            return W
        return self._project(W, self.scale) * self.mask

    def codes(self, W: torch.Tensor) -> torch.Tensor:
        return self.ops["quantize"](W[..., :self.geometry.cols], self.scale, self.quant.bits)[0]

    # -- schedules
    def lr_factor(self, step: int) -> float:
        """Learning-rate factor for ``step`` (the authors drop it after the channel ramp)."""
        if self.channel is not None and step > self.ramp_end + 1:
            return self.channel.lr_drop
        return 1.0

    def after_step(self, W: torch.Tensor, step: int, lr: float) -> bool:
        """Schedules and proximal maps after optimizer step ``step`` (in place on ``W``).

        Returns True when the mask changed.
        """
        changed = self.update_mask(W, step)
        for p in self.penalties:
            t = lr * p.strength
            if t == 0:
                continue
            if isinstance(p, L1):
                W[..., :self.geometry.cols] = self.ops["soft_threshold"](W[..., :self.geometry.cols], t)
            else:
                W.copy_(self.ops["group_shrink"](W, self.geometry, t))
        if changed:
            W.mul_(self.mask)
        return changed

    def channel_budget(self, step: int) -> int:
        """Input channels kept per group at ``step ≤ ramp_end``: linear from all of them
        down to the target (the authors' top-k schedule)."""
        frac = (self.ramp_float - step) / self.ramp_float if self.ramp_float > 0 else 0.0
        return int((self.geometry.group_in - self.target_channels) * frac) + self.target_channels

    def weight_budget(self, step: int) -> int:
        """Weights kept at ``step ≤ ramp_end``: density linear from 1 down to the target."""
        frac = (self.ramp_end - step) / self.ramp_end if self.ramp_end > 0 else 0.0
        ratio = self.weight.density + (1 - self.weight.density) * frac
        return int(self.numel * ratio + 1e-9)

    def schedule_active(self, step: int) -> bool:
        """Whether :meth:`update_mask` can still change the mask at ``step``."""
        return ((self.channel is not None or self.weight is not None) and step <= self.ramp_end) or (
            self.nm is not None and step == self.ramp_end)

    def update_mask(self, W: torch.Tensor, step: int,
                    norms_fn: Callable[[], torch.Tensor] | None = None) -> bool:
        """The budget schedules at step ``step``: shrink the mask (not ``W``) to the
        channels / weights of largest magnitude in ``W``. ``norms_fn`` computes the
        per-group channel norms of ``W`` (a backend passes its own kernel); it is only
        called when the channel budget drops. Returns True when the mask changed."""
        changed = False
        g = self.geometry
        if self.channel is not None and step <= self.ramp_end:
            k = self.channel_budget(step)
            if k < self._channels_prev:
                norms = norms_fn() if norms_fn is not None else channel_norms(W, g)
                keep = torch.stack([self.ops["topk_mask"](norms[i], k) for i in range(g.groups)])
                self.mask &= expand_channels(keep, g, self.cols).expand_as(self.mask)
                self._channels_prev = k
                changed = True
        if self.weight is not None and step <= self.ramp_end:
            keep = self.ops["topk_mask"](W[..., :g.cols].abs(), self.weight_budget(step))
            new = self.mask.clone()
            new[..., :g.cols] &= keep
            changed = not torch.equal(new, self.mask)
            self.mask = new
        if self.nm is not None and step == self.ramp_end:
            self.mask &= nm_mask(W.abs(), g, self.nm.n, self.nm.m)
            changed = True
        if step >= self.ramp_end:
            self.mask_fixed = True
        return changed

    # -- results
    def kept_channels(self) -> torch.Tensor | None:
        """Indices of the input channels that survive (any output row uses them)."""
        g = self.geometry
        used = self.mask[..., :g.cols].reshape(g.groups, -1, g.group_in, g.taps).any(dim=1).any(dim=-1)
        if bool(used.all()) and self.channel is None:
            return None
        return torch.nonzero(used.reshape(-1)).flatten()
