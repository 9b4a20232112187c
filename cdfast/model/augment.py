"""More sampled rows from the same few images: label-free views of the calibration set.

A layer's statistics have ``M = N·H_out·W_out`` rows for ``D = C_in·k²`` weight
columns; with one image per class the late, small feature maps have ``M < D`` and
the fit is underdetermined (``docs/RESULTS.md``). Horizontally flipped and slightly
shifted copies of the images are new inputs to every layer, from the same images:
``augment="flip"`` doubles ``M``, ``"shift"`` multiplies it by 5 (the image and its
shifts by ``SHIFT`` pixels left, right, up and down, the border pixel repeated) and
``"flip+shift"`` by 10. ``"mix"`` adds ``MIXES`` blends ``0.6·x_i + 0.4·x_{i+m}`` of
each image with another (``m = 1 … MIXES``, cyclically): inputs between the samples,
which the teacher's features follow as well (``"flip+shift+mix"``: 18 views).

:func:`views` returns the views *view-major*: all ``N`` images, then all their
flips, … so that view ``v`` of image ``i`` is sample ``v·N + i``. ``loss="auto"``
deals its held-out folds by ``i`` (:class:`~cdfast.layer.selection.FoldedStatistics`
with ``period=N``): the views of one image always fall in the same fold, and a
held-out fold never holds a view of an image the candidate was fit on.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

__all__ = ["AUGMENTS", "SHIFT", "MIXES", "views", "check_augment"]

AUGMENTS = ("flip", "shift", "flip+shift", "mix", "flip+mix", "shift+mix", "flip+shift+mix")
#: Pixels of each shift of ``augment="shift"``.
SHIFT = 2
#: Blends per image of ``augment="mix"``, and the weight of the image itself.
MIXES, MIX_WEIGHT = 4, 0.6


def check_augment(augment) -> None:
    if augment is None or callable(augment):
        return
    if not isinstance(augment, str) or augment not in AUGMENTS:
        raise ValueError(f"augment: expected None, one of {AUGMENTS} or a callable x -> list of views, "
                         f"got {augment!r}")


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` moved by ``(dy, dx)`` pixels, the border pixel repeated into the gap."""
    s = SHIFT
    padded = F.pad(x, (s, s, s, s), mode="replicate")
    H, W = x.shape[-2:]
    return padded[..., s - dy:s - dy + H, s - dx:s - dx + W]


def views(x: torch.Tensor, augment: str | Callable | None) -> torch.Tensor:
    """The images ``x`` (N×C×H×W) and their views, view-major (``V·N`` images, the
    originals first). A callable ``augment(x)`` returns a list of tensors shaped like
    ``x`` (the originals are prepended)."""
    check_augment(augment)
    if augment is None:
        return x
    if callable(augment):
        extra = list(augment(x))
        for i, v in enumerate(extra):
            if not isinstance(v, torch.Tensor) or v.shape != x.shape:
                raise ValueError(f"augment: view {i} should be a tensor of shape {tuple(x.shape)}, "
                                 f"got {getattr(v, 'shape', type(v).__name__)}")
        return torch.cat([x, *extra])
    if x.dim() != 4:
        raise ValueError(f"augment: {augment!r} needs image batches N×C×H×W, got shape {tuple(x.shape)}")
    out = [x]
    if "shift" in augment:
        out += [_shift(x, dy, dx) for dy, dx in ((0, SHIFT), (0, -SHIFT), (SHIFT, 0), (-SHIFT, 0))]
    if "mix" in augment:
        out += [MIX_WEIGHT * x + (1 - MIX_WEIGHT) * x.roll(-m, 0) for m in range(1, MIXES + 1)]
    if "flip" in augment:
        out += [v.flip(-1) for v in out]
    return torch.cat(out)
