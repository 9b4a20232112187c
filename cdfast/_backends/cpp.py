"""The ``cpp`` backend: the projection operators in C++ (OpenMP) on CPU tensors.

Same Python signatures and results as the torch oracle in :mod:`cdfast.constraints`
(``soft_threshold``, ``group_shrink``, ``topk_mask``, ``quantize``); the kernels live
in ``csrc/cpu_ops.cpp`` (module ``cdfast._cpu``) and work on raw pointers, so every
argument is checked here first. Bad arguments raise ``TypeError`` / ``ValueError``
naming the argument; dtypes other than float32/float64 (and scale broadcasts the
kernels do not cover) raise :class:`~cdfast.dispatch.Unsupported`, which
:func:`cdfast.dispatch.call` answers with the torch path.

Differences from the oracle, all within its contract: ``topk_mask`` breaks ties by
the lowest index (``torch.topk`` leaves them unspecified), and ``group_shrink``
accumulates the channel norms in float64 (the oracle in the tensor's dtype), so
float32 results can differ in the last bit.
"""
from __future__ import annotations

import math
import numbers

import torch

from .. import dispatch
from ..dispatch import Unsupported, register

_ext = None
_import_error: str | None = None
try:
    from .. import _cpu as _ext  # type: ignore[attr-defined]
except ImportError as exc:  # not built (e.g. a source checkout without build_ext)
    _import_error = f"the C++ extension cdfast._cpu is not built ({exc})"

_DTYPES = {torch.float32: 0, torch.float64: 1}


def _probe() -> str | None:
    return _import_error


dispatch.register_probe("cpp", _probe)


# ----------------------------------------------------------------- argument checks
def _tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: the cpp backend runs on CPU tensors, got device {t.device}")
    if t.dtype not in _DTYPES:
        raise Unsupported(f"{name}: the cpp backend handles float32 and float64, got {t.dtype}")
    return t.contiguous()


def _real(name: str, x) -> float:
    if isinstance(x, torch.Tensor) and x.numel() == 1:
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name}: expected a finite number, got {x}")
    return x


def _int(name: str, x) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    return int(x)


def _nthreads() -> int:
    return max(1, torch.get_num_threads())


# ----------------------------------------------------------------------- the ops
@register("soft_threshold", "cpp")
def soft_threshold(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """Prox of ``t·‖w‖₁``: ``sign(w)·max(|w| − t, 0)`` (see :func:`cdfast.constraints.soft_threshold`)."""
    x = _tensor("w", w)
    t = _real("threshold", threshold)
    out = torch.empty_like(x)
    _ext.soft_threshold(x.data_ptr(), out.data_ptr(), x.numel(), t, _DTYPES[x.dtype], _nthreads())
    return out


@register("group_shrink", "cpp")
def group_shrink(W: torch.Tensor, geometry, threshold: float) -> torch.Tensor:
    """Prox of ``t·Σ_i ‖W[:, i]‖₂`` over input channels (see :func:`cdfast.constraints.group_shrink`)."""
    x = _tensor("W", W)
    for attr in ("groups", "group_in", "taps", "cols"):
        if not hasattr(geometry, attr):
            raise TypeError(f"geometry: expected a LayerGeometry, got {type(geometry).__name__}")
    t = _real("threshold", threshold)
    G, cols = geometry.groups, geometry.cols
    if x.dim() != 3 or x.shape[0] != G or x.shape[-1] not in (cols, cols + 1):
        raise ValueError(f"W: expected the matrix view (groups={G}, C_out/G, {cols}[+1]), "
                         f"got shape {tuple(W.shape)}")
    out = torch.empty_like(x)
    _ext.group_shrink(x.data_ptr(), out.data_ptr(), G, x.shape[1], x.shape[2], geometry.group_in,
                      geometry.taps, t, _DTYPES[x.dtype], _nthreads())
    return out


@register("topk_mask", "cpp")
def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of the ``k`` largest ``scores`` (flattened); ties by lowest index."""
    x = _tensor("scores", scores)
    k = _int("k", k)
    n = x.numel()
    if k > n:
        raise ValueError(f"k: expected at most the number of scores ({n}), got {k}")
    out = torch.empty(x.shape, dtype=torch.bool)
    _ext.topk_mask(x.data_ptr(), out.data_ptr(), n, k, _DTYPES[x.dtype], _nthreads())
    return out


@register("quantize", "cpp")
def quantize(W: torch.Tensor, scale, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, values)`` of ``W`` on ``scale·{0, ±1/L, …, ±1}`` (see :func:`cdfast.constraints.quantize`).

    ``scale`` is a number, or a tensor broadcasting to ``W``: one scale (any shape
    of one element), one per row (``(..., 1)``) or one per element.
    """
    x = _tensor("W", W)
    bits = _int("bits", bits)
    if not 2 <= bits <= 8:
        raise ValueError(f"bits: expected an int in 2..8, got {bits}")
    if isinstance(scale, torch.Tensor):
        if scale.device.type != "cpu":
            raise ValueError(f"scale: expected a CPU tensor like W, got device {scale.device}")
        if scale.dtype != x.dtype:
            raise Unsupported(f"scale: the cpp backend needs the dtype of W ({x.dtype}), got {scale.dtype}")
        try:
            shape = torch.broadcast_shapes(x.shape, scale.shape)
        except RuntimeError as exc:
            raise ValueError(f"scale: shape {tuple(scale.shape)} does not broadcast to W "
                             f"{tuple(x.shape)}") from exc
        if shape != x.shape:
            raise Unsupported(f"scale: broadcasting W {tuple(x.shape)} to {tuple(shape)} is left to torch")
        sdims = (1,) * (x.dim() - scale.dim()) + tuple(scale.shape)
        if scale.numel() == 1:
            mode, s = 0, scale.reshape(1).contiguous()
        elif x.dim() >= 1 and sdims[-1] == 1:
            mode, s = 1, scale.expand(*x.shape[:-1], 1).contiguous()
        else:
            mode, s = 2, scale.expand(x.shape).contiguous()
    else:
        mode, s = 0, torch.tensor([_real("scale", scale)], dtype=x.dtype)
    cols = x.shape[-1] if x.dim() else 1
    rows = x.numel() // cols if cols else 0
    codes = torch.empty(x.shape, dtype=torch.int8)
    values = torch.empty_like(x)
    _ext.quantize(x.data_ptr(), s.data_ptr(), mode, rows, cols, bits, codes.data_ptr(), values.data_ptr(),
                  _DTYPES[x.dtype], _nthreads())
    return codes, values
