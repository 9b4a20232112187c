"""Backend dispatch: which implementation of a cdfast op runs.

Every op is listed once, in :data:`OPS`. Each has a plain PyTorch implementation,
registered under the backend ``"torch"`` (``cdfast/_backends/reference.py``): it is
the fallback on every device and the oracle the tests hold the others to. Kernels
register further implementations with :func:`register` (``"triton"``, ``"cuda"``
for the CUDA C++ extension, ``"cpp"`` for its CPU counterpart); the backends
register themselves when ``import cdfast`` imports :mod:`cdfast._backends`. How to
add one: ``cdfast/_backends/README.md``.

The implementation is chosen in this order (as in Liger-Kernel):

1. the ``backend=`` argument of the call, when it is not ``"auto"``;
2. the environment variable ``CDFAST_BACKEND``;
3. capability: on a CUDA tensor ``cuda``, then ``triton``, then ``torch``; on the
   CPU ``cpp``, then ``torch`` — the first one that is available and implements
   the op.

When an explicitly requested backend cannot run, cdfast warns once and uses the
``torch`` path — unless strict mode is on (``strict=True`` or
``CDFAST_STRICT=1``), in which case it raises :class:`BackendUnavailable`.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

__all__ = ["OPS", "BACKENDS", "BackendUnavailable", "Unsupported", "register", "register_probe", "resolve",
           "call", "backends", "implementations"]

#: Every op a backend can implement, with what it computes. Registering a name that
#: is not here is an error, so a misspelt op cannot register a kernel nobody calls.
OPS: dict[str, str] = {
    "statistics": "(3, G, D, D) Grams [x1x1ᵀ, x2x2ᵀ, x2x1ᵀ] of a layer's two mixed, unfolded inputs",
    "gram_solve": "the iterative (adam/sgd) Gram-form solve of a Quadratic under a ConstraintPlan",
    "data_targets": "the data form's teacher outputs σ(A∗P_t + b) of every loss term",
    "data_loss_grad": "the data form's loss at a student weight and its weight gradient",
    "soft_threshold": "prox of t·‖w‖₁: sign(w)·max(|w| − t, 0)",
    "group_shrink": "prox of t·Σ_i ‖W[:, i]‖₂ over input channels",
    "topk_mask": "boolean mask of the k largest scores",
    "quantize": "(codes, values) of W on the grid scale·{0, ±1/L, …, ±1}",
    "sweep_block": "fix one block of columns of a GPTQ/SparseGPT-style column sweep, in place",
    "coordinate_block": "one block of columns of a coordinate pass over the layer quadratic, in place",
}

BACKENDS = ("torch", "cpp", "triton", "cuda")
_CAPABILITY_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpp", "torch")}

_IMPLS: dict[str, dict[str, Callable]] = {}
_PROBES: dict[str, Callable[[], str | None]] = {"torch": lambda: None}
_WARNED: set[tuple[str, str]] = set()


class BackendUnavailable(RuntimeError):
    """A backend was requested in strict mode and cannot run this op."""


class Unsupported(NotImplementedError):
    """Raised by a backend implementation for arguments it does not handle (a
    constraint combination, a dtype …); :func:`call` then falls back to torch."""


def register(op: str, backend: str):
    """Decorator: register ``fn`` as ``backend``'s implementation of ``op``."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {tuple(OPS)}, got {op!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")

    def deco(fn):
        _IMPLS.setdefault(op, {})[backend] = fn
        return fn

    return deco


def register_probe(backend: str, probe: Callable[[], str | None]) -> None:
    """Set the availability probe of ``backend``: returns ``None`` when usable, else why not."""
    _PROBES[backend] = probe


def implementations() -> dict[str, tuple[str, ...]]:
    """Op → the backends that registered an implementation of it."""
    return {op: tuple(_IMPLS.get(op, {})) for op in OPS}


def unavailable_reason(backend: str) -> str | None:
    """``None`` if ``backend`` can run here, else a sentence saying why not."""
    probe = _PROBES.get(backend)
    if probe is None:
        return f"the {backend} backend is not built into this installation"
    try:
        return probe()
    except Exception as exc:  # a probe must never take the library down
        return f"{type(exc).__name__}: {exc}"


def backends() -> dict[str, str]:
    """Every backend with ``"available"`` or the reason it is not, e.g.::

        >>> cdfast.backends()
        {'torch': 'available', 'cpp': 'available', 'triton': 'no CUDA device ...', ...}
    """
    return {b: (unavailable_reason(b) or "available") for b in BACKENDS}


def _strict(strict: bool | None) -> bool:
    if strict is not None:
        return strict
    return os.environ.get("CDFAST_STRICT", "0").lower() in ("1", "true", "yes")


def resolve(op: str, device: torch.device | str = "cpu", backend: str | None = None,
            strict: bool | None = None) -> tuple[str, Callable]:
    """Pick the implementation of ``op`` for tensors on ``device``.

    Returns ``(backend_name, function)``.
    """
    impls = _IMPLS.get(op)
    if not impls:  # the backends register when ``import cdfast`` imports cdfast._backends
        raise KeyError(f"no implementation registered for op {op!r}")
    device = torch.device(device)
    requested = backend if backend not in (None, "auto") else os.environ.get("CDFAST_BACKEND") or None
    if requested is not None and requested != "auto":
        if requested not in BACKENDS:
            raise ValueError(f"backend: expected 'auto' or one of {BACKENDS}, got {requested!r}")
        why = _why_not(op, requested, device)
        if why is None:
            return requested, impls[requested]
        if _strict(strict):
            raise BackendUnavailable(f"backend {requested!r} cannot run op {op!r}: {why}")
        if (op, requested) not in _WARNED:
            _WARNED.add((op, requested))
            warnings.warn(f"cdfast: backend {requested!r} cannot run {op!r} ({why}); "
                          "using the torch path. Set CDFAST_STRICT=1 to make this an error.",
                          RuntimeWarning, stacklevel=3)
        return "torch", impls["torch"]
    for name in _CAPABILITY_ORDER.get(device.type, ("torch",)):
        if _why_not(op, name, device) is None:
            return name, impls[name]
    return "torch", impls["torch"]


def _why_not(op: str, backend: str, device: torch.device) -> str | None:
    if backend not in _IMPLS.get(op, {}):
        return f"it has no implementation of {op!r}"
    why = unavailable_reason(backend)
    if why is not None:
        return why
    if backend in ("cuda", "triton") and device.type != "cuda":
        if not (backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
            return f"it runs on CUDA tensors, these are on {device.type}"
    if backend == "cpp" and device.type != "cpu":
        return f"it runs on CPU tensors, these are on {device.type}"
    return None


def call(op: str, device, backend: str | None, strict: bool | None, *args, **kwargs):
    """Resolve ``op`` and run it; returns ``(backend_name, result)``.

    An implementation that raises :class:`Unsupported` for these arguments is
    replaced by the torch path (or, in strict mode, the error propagates as
    :class:`BackendUnavailable`).
    """
    name, fn = resolve(op, device, backend, strict)
    if name == "torch":
        return name, fn(*args, **kwargs)
    try:
        return name, fn(*args, **kwargs)
    except Unsupported as exc:
        if _strict(strict):
            raise BackendUnavailable(f"backend {name!r} does not support these arguments of {op!r}: {exc}") from exc
        return "torch", _IMPLS[op]["torch"](*args, **kwargs)
