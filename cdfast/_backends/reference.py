"""The plain PyTorch backend: fallback everywhere and the oracle for the kernels."""
from __future__ import annotations

import torch

from ..dispatch import register
from ..layer import constraints
from ..layer.geometry import LayerGeometry
from ..layer.statistics import symmetric_gram
from ..layer.solvers import gram_iterative
from ..layer.solvers import sweep as _sweep

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
        symmetric_gram(X1, out[0])
        symmetric_gram(X2, out[1])
        out[2] += torch.bmm(X2, X1.transpose(1, 2))
    return out


# The solvers' own torch paths.
register("gram_solve", "torch")(gram_iterative)
register("sweep_block", "torch")(_sweep.sweep_block)
register("coordinate_block", "torch")(_sweep.coordinate_block)

# The projection operators: the pure functions of cdfast.layer.constraints are the oracle.
register("soft_threshold", "torch")(constraints.soft_threshold)
register("group_shrink", "torch")(constraints.group_shrink)
register("topk_mask", "torch")(constraints.topk_mask)
register("quantize", "torch")(constraints.quantize)


@register("data_loss_grad", "torch")
def data_loss_grad(W: torch.Tensor, h_teacher: torch.Tensor, h_student: torch.Tensor,
                   targets: torch.Tensor, geometry: LayerGeometry, spec, bias: torch.Tensor | None = None,
                   need_grad: bool = True):
    """Data-form loss (SPEC §2.2) at the matrix-view weight ``W`` and its gradient.

    ``W`` is ``(G, C_out/G, D[+1])`` (a last column is the fitted bias); ``bias`` is the
    constant bias used when ``W`` has none; ``targets`` stacks the teacher outputs
    ``σ(A∗P_t + b)`` of the ``T`` terms, ``(T, *output_shape)``. Returns
    ``(loss, dL/dW or None)``: :meth:`LossSpec.data_loss` differentiated by autograd.
    """
    with torch.enable_grad():
        Wg = W.detach().requires_grad_(need_grad)
        w, b = geometry.weight_tensor(Wg)
        loss = spec.data_loss(geometry, w, b if b is not None else bias, list(targets.unbind(0)),
                              h_teacher, h_student)
        grad = torch.autograd.grad(loss, Wg)[0] if need_grad else None
    return loss.detach(), grad


@register("data_targets", "torch")
def data_targets(A: torch.Tensor, h_teacher: torch.Tensor, h_student: torch.Tensor,
                 geometry: LayerGeometry, spec, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher outputs ``σ(A∗P_t + b)`` of the data form's terms, stacked ``(T, *output_shape)``.

    ``A`` is the teacher's matrix-view weight (a last column is its bias), ``bias`` the
    bias when ``A`` has none; constant during a solve (:meth:`LossSpec.teacher_outputs`).
    """
    w, b = geometry.weight_tensor(A)
    return torch.stack(spec.teacher_outputs(geometry, w, b if b is not None else bias,
                                            h_teacher, h_student))
