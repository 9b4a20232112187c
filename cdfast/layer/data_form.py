r"""The data form of the loss (SPEC §2.2) as a differentiable function of the weight.

Each step of a data-form solve needs the loss at the student weight ``W`` and its
gradient. The ``data_loss_grad`` op computes both in one pass (on the Triton
backend: the dual-path convolution with the loss in its epilogue, then one
weight-gradient kernel), so :func:`data_loss` wraps it in an autograd function
whose backward only scales the gradient the forward already has.
"""
from __future__ import annotations

import torch

from .. import dispatch
from .geometry import LayerGeometry
from .losses import LossSpec

__all__ = ["data_loss"]


class _DataLoss(torch.autograd.Function):
    """``loss(W)`` whose forward also computes ``dL/dW`` in the same fused pass."""

    @staticmethod
    def forward(ctx, W, h_teacher, h_student, targets, geometry, spec, bias, backend, strict, used):
        need = ctx.needs_input_grad[0]
        name, (value, grad) = dispatch.call("data_loss_grad", W.device, backend, strict, W, h_teacher,
                                            h_student, targets, geometry, spec, bias, need)
        used.append(name)
        if need:
            ctx.save_for_backward(grad)
        return value

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        return (grad_out * grad,) + (None,) * 9


def data_loss(W: torch.Tensor, h_teacher: torch.Tensor, h_student: torch.Tensor, targets: torch.Tensor,
              geometry: LayerGeometry, spec: LossSpec, bias: torch.Tensor | None = None,
              backend: str = "auto", strict: bool | None = None, used: list | None = None) -> torch.Tensor:
    """The data-form loss at ``W`` (matrix view), differentiable in ``W``.

    ``targets`` stacks the teacher outputs of the terms (``(T, *output_shape)``);
    ``bias`` is the constant bias when ``W`` has no bias column. The name of the
    backend that ran is appended to ``used`` when given.
    """
    return _DataLoss.apply(W, h_teacher, h_student, targets, geometry, spec, bias, backend, strict,
                           used if used is not None else [])
