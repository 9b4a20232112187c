"""Argument checks shared by the public entry points.

Bad input raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError``
(wrong value or shape), always naming the argument and what was expected.
"""
from __future__ import annotations

import math

import torch

from .layer.geometry import LayerGeometry

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
#: Elements per chunk of :func:`all_finite`.
_FINITE_CHUNK = 1 << 22


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of ``t`` is finite, a chunk at a time: ``torch.isfinite`` of a wide
    layer's whole weight forms ``|t|`` and two masks, temporaries larger than the weight."""
    return all(bool(torch.isfinite(c).all()) for c in t.detach().reshape(-1).split(_FINITE_CHUNK))


def check_tensor(name: str, t, finite: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor (float16/bfloat16/float32/float64), "
                        f"got {t.dtype}")
    if t.device.type == "meta":
        raise ValueError(f"{name}: expected a tensor with data (on cpu or cuda), got a meta tensor")
    if t.numel() == 0:
        raise ValueError(f"{name}: expected a non-empty batch, got shape {tuple(t.shape)}")
    if finite and not all_finite(t):
        raise ValueError(f"{name}: contains NaN or Inf")
    return t


def check_pair(geometry: LayerGeometry, h_teacher, h_student) -> None:
    """The two inputs of one layer: same shape, dtype and device, matching the layer."""
    check_tensor("h_teacher", h_teacher)
    check_tensor("h_student", h_student, finite=h_student is not h_teacher)  # one tensor: checked once
    if h_teacher.shape != h_student.shape:
        raise ValueError(f"h_student: expected the shape of h_teacher {tuple(h_teacher.shape)}, "
                         f"got {tuple(h_student.shape)}")
    if h_teacher.dtype != h_student.dtype:
        raise TypeError(f"h_student: expected dtype {h_teacher.dtype} like h_teacher, got {h_student.dtype}")
    if h_teacher.device != h_student.device:
        raise ValueError(f"h_student: expected device {h_teacher.device} like h_teacher, got {h_student.device}")
    if geometry.kind == "conv2d":
        if h_teacher.dim() != 4 or h_teacher.shape[1] != geometry.in_channels:
            raise ValueError(f"h_teacher: expected N×{geometry.in_channels}×H×W for this Conv2d, "
                             f"got shape {tuple(h_teacher.shape)}")
        # output_hw counts the padding: a 7×7 conv padded by 3 takes a 1×1 input.
        ho, wo = geometry.output_hw(h_teacher.shape[2], h_teacher.shape[3])
        if ho < 1 or wo < 1:
            padded = tuple(s + 2 * p for s, p in zip(h_teacher.shape[2:], geometry.padding))
            span = tuple(d * (k - 1) + 1 for d, k in zip(geometry.dilation, geometry.kernel_size))
            raise ValueError(f"h_teacher: spatial size {tuple(h_teacher.shape[2:])} (padded by "
                             f"{geometry.padding}: {padded}) is smaller than the layer's receptive field {span}")
    else:
        if h_teacher.dim() < 2 or h_teacher.shape[-1] != geometry.in_channels:
            raise ValueError(f"h_teacher: expected N×{geometry.in_channels} for this Linear, "
                             f"got shape {tuple(h_teacher.shape)}")


def check_positive_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v}")
    return v


def check_fraction(name: str, v, low_open: bool = True) -> float:
    """A number in (0, 1] (or [0, 1] when ``low_open`` is False)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a float in (0, 1], got {type(v).__name__}")
    v = float(v)
    ok = (0.0 < v <= 1.0) if low_open else (0.0 <= v <= 1.0)
    if not ok or math.isnan(v):
        raise ValueError(f"{name}: expected a value in {'(0, 1]' if low_open else '[0, 1]'}, got {v}")
    return v


def check_nonneg_float(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a non-negative float, got {type(v).__name__}")
    v = float(v)
    if not (v >= 0.0) or math.isinf(v):
        raise ValueError(f"{name}: expected a finite value >= 0, got {v}")
    return v


def check_positive_float(name: str, v) -> float:
    v = check_nonneg_float(name, v)
    if v == 0.0:
        raise ValueError(f"{name}: expected a value > 0, got 0")
    return v


def check_bool(name: str, v, allow_none: bool = False):
    if v is None and allow_none:
        return v
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected True or False, got {v!r}")
    return v


def check_unit_interval(name: str, v, upper_open: bool = True) -> float:
    """A number in [0, 1) (or [0, 1] when ``upper_open`` is False)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a float in [0, 1), got {type(v).__name__}")
    v = float(v)
    ok = (0.0 <= v < 1.0) if upper_open else (0.0 <= v <= 1.0)
    if not ok:
        raise ValueError(f"{name}: expected a value in {'[0, 1)' if upper_open else '[0, 1]'}, got {v}")
    return v


def check_dtype(name: str, v, allowed=(torch.float32, torch.float64)) -> torch.dtype:
    if v not in allowed:
        raise TypeError(f"{name}: expected one of {', '.join(str(d) for d in allowed)}, got {v!r}")
    return v


def check_finite_module(name: str, module) -> None:
    """The teacher layer's parameters: NaN or Inf would make every result NaN."""
    for pname, p in module.named_parameters(recurse=False):
        if not all_finite(p):
            raise ValueError(f"{name}: its {pname} contains NaN or Inf")


def check_finite_model(name: str, model) -> None:
    """Every parameter of a whole network (a NaN anywhere makes every layer's result NaN)."""
    for pname, p in model.named_parameters():
        if not all_finite(p):
            raise ValueError(f"{name}: its parameter {pname!r} contains NaN or Inf")
