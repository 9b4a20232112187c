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
``FixedSupport``     a support given in advance: kept input channels, or a weight mask
==================  =================================================================

The pure functions (``soft_threshold``, ``group_shrink``, ``topk_mask`` …) are the
proximal maps and projections themselves, in plain PyTorch: the ``torch`` backend
registers them, and they are the oracle the kernels are tested against.
:class:`~cdfast.layer.plan.ConstraintPlan` sequences them during a solve.
All functions work on the matrix view ``(G, C_out/G, D[+1])`` of
:mod:`cdfast.layer.geometry`; a fitted bias column is never pruned or quantized.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from .._validation import check_fraction, check_nonneg_float, check_positive_int
from .geometry import LayerGeometry

__all__ = ["ChannelPrune", "WeightPrune", "NMSparsity", "GroupLasso", "L1", "Quantize", "FixedSupport",
           "soft_threshold", "group_shrink", "channel_norms", "topk_mask", "nm_mask",
           "quantize"]


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
        if not isinstance(self.per_channel, bool):
            raise TypeError(f"per_channel: expected True or False, got {self.per_channel!r}")

    @property
    def levels(self) -> int:
        return 2 ** (self.bits - 1) - 1


@dataclass(frozen=True, eq=False)
class FixedSupport:
    """A support fixed in advance: the weights outside it are zero from the first step on.

    Either ``channels``, the input channels that remain (indices over all input
    channels; the others were removed upstream, e.g. by :func:`cdfast.compress`'s group
    pruning or by another pruning tool), or ``mask``, a boolean tensor of the weight's
    shape (the mask of an unstructured pruning). The layer's inputs keep the teacher's
    width (what ``h^S`` holds in a removed channel only reaches the teacher-side terms;
    :func:`cdfast.compress` puts ``h^T``'s value there). Combines with ``WeightPrune``
    (whose density then counts the supported weights) and ``Quantize``.
    """

    channels: tuple[int, ...] | None = None
    mask: torch.Tensor | None = None

    def __post_init__(self):
        if (self.channels is None) == (self.mask is None):
            raise ValueError("FixedSupport: expected exactly one of channels= or mask=")
        if self.channels is not None:
            ch = self.channels.tolist() if isinstance(self.channels, torch.Tensor) else list(self.channels)
            if not ch or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in ch) \
                    or len(set(ch)) != len(ch):
                raise ValueError(f"channels: expected distinct non-negative channel indices, got {ch!r}")
            object.__setattr__(self, "channels", tuple(sorted(ch)))
        elif not isinstance(self.mask, torch.Tensor) or self.mask.dtype != torch.bool:
            raise TypeError(f"mask: expected a boolean tensor of the weight's shape, got {type(self.mask).__name__}")

    def matrix_mask(self, geometry: LayerGeometry, cols: int, device) -> torch.Tensor:
        """The support in the matrix view, ``(G, C_out/G or 1, cols)`` (a bias column is kept)."""
        g = geometry
        if self.mask is not None:
            shape = (g.out_channels, g.in_channels) if g.kind == "linear" else \
                (g.out_channels, g.group_in, *g.kernel_size)
            if tuple(self.mask.shape) != shape:
                raise ValueError(f"mask: expected the weight's shape {shape}, got {tuple(self.mask.shape)}")
            m = g.weight_matrix(self.mask.to(device))
            return torch.cat([m, torch.ones_like(m[..., :1])], -1) if cols > g.cols else m
        if max(self.channels) >= g.in_channels:
            raise ValueError(f"channels: index {max(self.channels)} out of range for {g.in_channels} input channels")
        keep = torch.zeros(g.in_channels, dtype=torch.bool, device=device)
        keep[list(self.channels)] = True
        return expand_channels(keep.view(g.groups, g.group_in), g, cols)


CONSTRAINT_TYPES = (ChannelPrune, WeightPrune, NMSparsity, GroupLasso, L1, Quantize, FixedSupport)


def normalize(compression) -> tuple:
    """``None``, one constraint or a sequence → a validated tuple of constraints."""
    if compression is None:
        return ()
    items = tuple(compression) if isinstance(compression, (list, tuple)) else (compression,)
    for c in items:
        if not isinstance(c, CONSTRAINT_TYPES):
            raise TypeError("compression: expected ChannelPrune, WeightPrune, NMSparsity, GroupLasso, "
                            f"L1, Quantize, FixedSupport or a list of them, got {type(c).__name__}")
    masks = [c for c in items if isinstance(c, (ChannelPrune, WeightPrune, NMSparsity))]
    if len(masks) > 1:
        raise ValueError("compression: at most one of ChannelPrune, WeightPrune, NMSparsity per layer")
    if sum(isinstance(c, Quantize) for c in items) > 1:
        raise ValueError("compression: at most one Quantize per layer")
    if any(isinstance(c, FixedSupport) for c in items) and \
            sum(isinstance(c, (FixedSupport, ChannelPrune, NMSparsity)) for c in items) > 1:
        raise ValueError("compression: a FixedSupport combines only with WeightPrune, penalties and Quantize")
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
