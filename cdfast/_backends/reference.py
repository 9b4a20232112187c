"""The plain PyTorch backend: fallback everywhere and the oracle for the kernels."""
from __future__ import annotations

import torch

from ..dispatch import register
from .. import constraints
from ..geometry import LayerGeometry

# Unfold at most this many elements at once, so a large calibration batch
# streams through bounded memory.
_UNFOLD_BUDGET = 1 << 25


@register("statistics", "torch")
def statistics(h_teacher: torch.Tensor, h_student: torch.Tensor, geometry: LayerGeometry,
               fit_bias: bool, dtype: torch.dtype, mix=(1.0, 0.0, 0.0, 1.0)) -> torch.Tensor:
    """``(3, G, D, D)``: ``[x1 x1ᵀ, x2 x2ᵀ, x2 x1ᵀ]`` with ``x1 = a·X^T + b·X^S``,
    ``x2 = c·X^T + d·X^S`` (unfolded inputs, accumulated in ``dtype``)."""
    a, b, c, d = mix
    n = h_teacher.shape[0]
    per_sample = max(1, geometry.cols * geometry.groups * max(1, geometry.rows(h_teacher[:1])))
    chunk = max(1, _UNFOLD_BUDGET // per_sample)
    D = geometry.cols + int(fit_bias)
    out = torch.zeros(3, geometry.groups, D, D, dtype=dtype, device=h_teacher.device)
    for s in range(0, n, chunk):
        t = h_teacher[s:s + chunk].to(dtype)
        st = h_student[s:s + chunk].to(dtype)
        x1 = a * t + b * st if (a, b) != (1.0, 0.0) else t
        x2 = c * t + d * st
        X1 = geometry.unfold(x1, fit_bias)
        X2 = geometry.unfold(x2, fit_bias)
        if fit_bias:  # the ones row mixes as (a+b) and (c+d)
            X1[:, -1] = a + b
            X2[:, -1] = c + d
        out[0] += torch.bmm(X1, X1.transpose(1, 2))
        out[1] += torch.bmm(X2, X2.transpose(1, 2))
        out[2] += torch.bmm(X2, X1.transpose(1, 2))
    return out


@register("gram_solve", "torch")
def gram_solve(quad, plan, cfg):
    from ..solvers import gram_iterative

    return gram_iterative(quad, plan, cfg)


# The projection operators: the pure functions of cdfast.constraints are the oracle.
register("soft_threshold", "torch")(constraints.soft_threshold)
register("group_shrink", "torch")(constraints.group_shrink)
register("topk_mask", "torch")(constraints.topk_mask)
register("quantize", "torch")(constraints.quantize)
