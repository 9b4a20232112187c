"""The ``cpp`` backend: C++ (OpenMP) kernels on CPU tensors, where they pay.

* ``topk_mask``: the budget schedules select the largest weights or channels at every
  ramp step; on a large layer that selection costs as much as the solver step itself,
  and the radix select is about 5× faster than ``torch.topk`` (a whole ``distill_layer``
  call with a weight budget: 1.1–1.2×, ``bench/``).
* ``sweep_block``, ``coordinate_block``: the column loops of the exact solver
  (:mod:`cdfast.layer.solvers.sweep`), a block of columns per call instead of a
  handful of torch calls per column.

The kernels live in ``csrc/cpu_ops.cpp`` (module ``cdfast._cpu``) and work on raw
pointers, so every argument is checked here first. Bad arguments raise ``TypeError`` / ``ValueError``
naming the argument; dtypes other than float32/float64 raise
:class:`~cdfast.dispatch.Unsupported`, which :func:`cdfast.dispatch.call` answers
with the torch path. Ties are broken by the lowest index (``torch.topk`` leaves
them unspecified).
"""
from __future__ import annotations

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


def _int(name: str, x) -> int:
    if isinstance(x, bool) or not isinstance(x, numbers.Integral):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__}")
    return int(x)


def _nthreads() -> int:
    return max(1, torch.get_num_threads())


# ----------------------------------------------------------------------- the ops
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


# --------------------------------------------------------------- column blocks
def _rows(name: str, t, G: int, n: int, R: int, dtype) -> tuple[int, int]:
    """``(pointer, group stride)`` of a ``(G, n, R)`` block with contiguous rows (None: 0, 0).
    Written in place, so never copied: another layout runs on torch."""
    if t is None:
        return 0, 0
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise ValueError(f"{name}: the cpp backend runs on CPU tensors, got device {t.device}")
    if tuple(t.shape) != (G, n, R) or t.dtype != dtype:
        raise ValueError(f"{name}: expected shape {(G, n, R)} and dtype {dtype}, got {tuple(t.shape)}, {t.dtype}")
    if t.stride(2) != 1 or (n > 1 and t.stride(1) != R):
        raise Unsupported(f"{name}: the block's rows must be contiguous, got strides {t.stride()}")
    return t.data_ptr(), t.stride(0)


def _square(name: str, t, G: int, n: int, dtype) -> tuple[int, int, int]:
    """``(pointer, group stride, row stride)`` of a ``(G, n, n)`` block with contiguous rows."""
    if t is None:
        return 0, 0, 0
    if tuple(t.shape) != (G, n, n) or t.dtype != dtype or t.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor of shape {(G, n, n)}, dtype {dtype}")
    if t.stride(2) != 1:
        raise Unsupported(f"{name}: rows must be contiguous, got strides {t.stride()}")
    return t.data_ptr(), t.stride(0), t.stride(1)


def _vector(name: str, t, G: int, k: int, dtype) -> tuple[int, int]:
    """``(pointer, group stride)`` of a ``(G, k)`` array with contiguous rows (None: 0, 0)."""
    if t is None:
        return 0, 0
    if tuple(t.shape) != (G, k) or t.dtype != dtype or t.device.type != "cpu":
        raise ValueError(f"{name}: expected a CPU tensor of shape {(G, k)}, dtype {dtype}")
    if t.stride(1) != 1:
        raise Unsupported(f"{name}: expected contiguous rows, got strides {t.stride()}")
    return t.data_ptr(), t.stride(0)


def _block_shape(W) -> tuple[int, int, int]:
    if not isinstance(W, torch.Tensor) or W.dim() != 3:
        raise ValueError(f"W: expected a (G, n, R) tensor, got {getattr(W, 'shape', type(W).__name__)}")
    if W.dtype not in _DTYPES:
        raise Unsupported(f"W: the cpp backend handles float32 and float64, got {W.dtype}")
    return tuple(W.shape)


@register("sweep_block", "cpp")
def sweep_block(W, T, V, D, Y, mask, inv, step, levels, grid, nm=None) -> None:
    """:func:`cdfast.layer.solvers.sweep.sweep_block` in C++ (rows split over threads)."""
    G, n, R = _block_shape(W)
    dt = W.dtype
    w, gw = _rows("W", W, G, n, R, dt)
    t, gt = _rows("T", T, G, n, R, dt)
    d, gd = _rows("D", D, G, n, R, dt)
    y, gy = _rows("Y", Y, G, n, R, dt)
    mk, gm = _rows("mask", mask, G, n, R, dt)
    v, gv, ld = _square("V", V, G, n, dt)
    i, gr = _vector("inv", inv, G, R, dt)
    s, _ = _vector("step", step, G, R, dt)
    m = keep = cols = 0
    u = gu = p = gp = 0
    if nm is not None:
        m, keep, U, piv, cols = nm
        if mask is None:
            raise ValueError("mask: an N:M sweep writes its mask")
        u, gu, ldu = _square("U", U, G, n, dt)
        if ldu != ld:
            raise Unsupported("U: expected the row stride of V")
        p, gp = _vector("pivots", piv, G, n, dt)
    _ext.sweep_block(w, gw, t, gt, v, gv, d, gd, y, gy, mk, gm, i, s, gr, float(levels), _int("grid", grid),
                     _int("m", m), _int("keep", keep), u, gu, p, gp, _int("cols", cols), G, n, R, ld,
                     _DTYPES[dt], _nthreads())


@register("coordinate_block", "cpp")
def coordinate_block(W, g, H, neg_inv, D, mask, inv, step, levels, grid) -> None:
    """:func:`cdfast.layer.solvers.sweep.coordinate_block` in C++ (rows split over threads)."""
    G, n, R = _block_shape(W)
    dt = W.dtype
    w, gw = _rows("W", W, G, n, R, dt)
    gg, gs = _rows("g", g, G, n, R, dt)
    d, gd = _rows("D", D, G, n, R, dt)
    mk, gm = _rows("mask", mask, G, n, R, dt)
    h, gh, ld = _square("H", H, G, n, dt)
    ni, gp = _vector("neg_inv", neg_inv, G, n, dt)
    i, gr = _vector("inv", inv, G, R, dt)
    s, _ = _vector("step", step, G, R, dt)
    _ext.coordinate_block(w, gw, gg, gs, h, gh, ni, gp, d, gd, mk, gm, i, s, gr, float(levels), _int("grid", grid),
                          G, n, R, ld, _DTYPES[dt], _nthreads())
