"""The ``cpp`` backend: ``topk_mask`` in C++ (OpenMP radix select) on CPU tensors.

The budget schedules select the largest weights or channels at every ramp step;
on a large layer that selection costs as much as the solver step itself, and the
radix select is about 5× faster than ``torch.topk`` (a whole ``distill_layer``
call with a weight budget: 1.1–1.2×, ``bench/``). The kernel lives in
``csrc/cpu_ops.cpp`` (module ``cdfast._cpu``) and works on raw pointers, so every
argument is checked here first. Bad arguments raise ``TypeError`` / ``ValueError``
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
