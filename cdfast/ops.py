r"""cdfast's ops as ``torch.library`` custom ops, and the data-form loss for autograd.

Each op is declared with primitive arguments (tensors, ints, floats, strings), so
that ``torch.compile``, ``torch.export`` and ``opcheck`` can see through it, with a
fake (meta) implementation that gives the output shapes without computing. The
real implementation rebuilds cdfast's objects and runs :func:`cdfast.dispatch.call`,
so the backend is chosen exactly as everywhere else (``backend`` argument, then
``CDFAST_BACKEND``, then capability).

==========================  =====================================================
``cdfast::statistics``       ``(3, G, D, D)`` Grams ``[x1x1ᵀ, x2x2ᵀ, x2x1ᵀ]`` of a layer's two inputs
``cdfast::data_loss_grad``   data-form loss and ``dL/dW`` (differentiable in ``W``)
``cdfast::gram_solve``       the iterative Gram-form solver: ``(W, mask, scale, steps, losses)``
==========================  =====================================================

Geometry arguments: ``kind`` (``"conv2d"``/``"linear"``), ``in_channels``,
``out_channels``, ``kernel_size``, ``stride``, ``padding``, ``dilation`` (pairs),
``groups``, ``has_bias``.

:func:`data_loss` is what :func:`cdfast.distill_layer` uses in the data form: an
autograd function whose forward runs the ``data_loss_grad`` op (one fused pass
computes the loss and the gradient) and whose backward scales that gradient.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Sequence

import torch

from . import dispatch
from .constraints import L1, ChannelPrune, GroupLasso, NMSparsity, Quantize, WeightPrune
from .geometry import LayerGeometry
from .losses import ActivationSpec, LossSpec

__all__ = ["data_loss", "geometry_args", "statistics", "data_loss_grad", "gram_solve"]


# ------------------------------------------------------------- primitives
def geometry_args(g: LayerGeometry) -> dict:
    """A :class:`LayerGeometry` as the primitive keyword arguments of the ops."""
    return dict(kind=g.kind, in_channels=g.in_channels, out_channels=g.out_channels,
                kernel_size=list(g.kernel_size), stride=list(g.stride), padding=list(g.padding),
                dilation=list(g.dilation), groups=g.groups, has_bias=g.has_bias)


def _geometry(kind, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
              has_bias) -> LayerGeometry:
    return LayerGeometry(kind, int(in_channels), int(out_channels), tuple(int(k) for k in kernel_size),
                         tuple(int(s) for s in stride), tuple(int(p) for p in padding),
                         tuple(int(d) for d in dilation), int(groups), bool(has_bias))


def _dtype_from_flag(float64: bool) -> torch.dtype:
    return torch.float64 if float64 else torch.float32


# ------------------------------------------------------------- statistics
@torch.library.custom_op("cdfast::statistics", mutates_args=())
def statistics(h_teacher: torch.Tensor, h_student: torch.Tensor, kind: str, in_channels: int,
               out_channels: int, kernel_size: Sequence[int], stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int], groups: int, has_bias: bool,
               fit_bias: bool, float64: bool, mix: Sequence[float], backend: str) -> torch.Tensor:
    """``(3, G, D, D)``: ``[x1x1ᵀ, x2x2ᵀ, x2x1ᵀ]``, ``x1 = a·X^T + b·X^S``, ``x2 = c·X^T + d·X^S``."""
    geo = _geometry(kind, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                    has_bias)
    _, out = dispatch.call("statistics", h_teacher.device, backend, None, h_teacher, h_student, geo,
                           bool(fit_bias), _dtype_from_flag(float64), tuple(float(x) for x in mix))
    return out.contiguous()


@statistics.register_fake
def _statistics_fake(h_teacher, h_student, kind, in_channels, out_channels, kernel_size, stride,
                     padding, dilation, groups, has_bias, fit_bias, float64, mix, backend):
    d = (in_channels // groups) * kernel_size[0] * kernel_size[1] + int(fit_bias)
    return h_teacher.new_empty((3, groups, d, d), dtype=_dtype_from_flag(float64))


# ------------------------------------------------------------- data form
def _spec(loss: str, mu: float, alpha: float, beta: float, objective: str,
          act_scale: Optional[torch.Tensor], act_shift: Optional[torch.Tensor]) -> LossSpec:
    act = ActivationSpec(act_scale, act_shift) if act_scale is not None else None
    return LossSpec(loss, mu, alpha, beta, objective, act)


@torch.library.custom_op("cdfast::data_loss_grad", mutates_args=())
def data_loss_grad(W: torch.Tensor, h_teacher: torch.Tensor, h_student: torch.Tensor,
                   targets: torch.Tensor, bias: Optional[torch.Tensor], act_scale: Optional[torch.Tensor],
                   act_shift: Optional[torch.Tensor], kind: str, in_channels: int, out_channels: int,
                   kernel_size: Sequence[int], stride: Sequence[int], padding: Sequence[int],
                   dilation: Sequence[int], groups: int, has_bias: bool, loss: str, mu: float,
                   alpha: float, beta: float, objective: str, backend: str
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Data-form loss at the matrix-view weight ``W`` and ``dL/dW`` (see the torch reference
    ``cdfast._backends.reference.data_loss_grad``). ``act_scale``/``act_shift``: the folded
    BatchNorm of the activation objective, or None for a plain ReLU."""
    geo = _geometry(kind, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                    has_bias)
    spec = _spec(loss, mu, alpha, beta, objective, act_scale, act_shift)
    with _autograd_readmitted():
        _, (value, grad) = dispatch.call("data_loss_grad", W.device, backend, None, W, h_teacher,
                                         h_student, targets, geo, spec, bias, True)
    return value.clone(), grad.contiguous().clone()


def _autograd_readmitted():
    """A custom op's kernel runs below the Autograd dispatch key, but the torch
    reference of ``data_loss_grad`` differentiates with autograd: re-admit it there."""
    guard = getattr(torch._C, "_SetExcludeDispatchKeyGuard", None)
    if guard is None:  # pragma: no cover - an older torch
        return contextlib.nullcontext()
    return guard(torch._C.DispatchKey.AutogradFunctionality, False)


@data_loss_grad.register_fake
def _data_loss_grad_fake(W, h_teacher, h_student, targets, bias, act_scale, act_shift, *args):
    return W.new_empty(()), torch.empty_like(W, memory_format=torch.contiguous_format)


def _dlg_setup_context(ctx, inputs, output):
    ctx.save_for_backward(output[1])


def _dlg_backward(ctx, grad_loss, grad_grad):
    (grad,) = ctx.saved_tensors
    return (grad_loss * grad,) + (None,) * 21


data_loss_grad.register_autograd(_dlg_backward, setup_context=_dlg_setup_context)


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


# ------------------------------------------------------------- Gram solver
def compression_args(compression) -> dict:
    """Constraints (see :mod:`cdfast.constraints`) as the primitive arguments of ``gram_solve``.

    Penalties are ``penalty_kinds`` (1: L1, 2: GroupLasso) with ``penalty_strengths``,
    in order; an absent budget has ``channel_keep``/``weight_density`` 0, ``nm`` ``[]``.
    """
    from .constraints import normalize

    out = dict(channel_keep=0.0, channel_ramp=1 / 3, channel_lr_drop=0.1, weight_density=0.0,
               weight_ramp=1 / 3, nm=[], penalty_kinds=[], penalty_strengths=[], quant_bits=0,
               quant_per_channel=True)
    for c in normalize(compression):
        if isinstance(c, ChannelPrune):
            out.update(channel_keep=c.keep, channel_ramp=c.ramp, channel_lr_drop=c.lr_drop)
        elif isinstance(c, WeightPrune):
            out.update(weight_density=c.density, weight_ramp=c.ramp)
        elif isinstance(c, NMSparsity):
            out.update(nm=[c.n, c.m])
        elif isinstance(c, Quantize):
            out.update(quant_bits=c.bits, quant_per_channel=c.per_channel)
        else:
            out["penalty_kinds"].append(1 if isinstance(c, L1) else 2)
            out["penalty_strengths"].append(c.strength)
    return out


def _compression(channel_keep, channel_ramp, channel_lr_drop, weight_density, weight_ramp, nm,
                 penalty_kinds, penalty_strengths, quant_bits, quant_per_channel) -> list:
    items = []
    if channel_keep > 0:
        items.append(ChannelPrune(channel_keep, channel_ramp, channel_lr_drop))
    if weight_density > 0:
        items.append(WeightPrune(weight_density, weight_ramp))
    if len(nm):
        items.append(NMSparsity(int(nm[0]), int(nm[1])))
    for kind, strength in zip(penalty_kinds, penalty_strengths):
        items.append(L1(strength) if int(kind) == 1 else GroupLasso(strength))
    if quant_bits:
        items.append(Quantize(int(quant_bits), bool(quant_per_channel)))
    return items


def _history_len(steps: int, log_every: int) -> int:
    every = log_every if log_every > 0 else max(1, steps // 100)
    return len([i for i in range(steps) if i % every == 0 or i == steps - 1])


@torch.library.custom_op("cdfast::gram_solve", mutates_args=())
def gram_solve(H: torch.Tensor, F: torch.Tensor, anchor: torch.Tensor, f0: torch.Tensor, scale: float,
               kind: str, in_channels: int, out_channels: int, kernel_size: Sequence[int],
               stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
               has_bias: bool, channel_keep: float, channel_ramp: float, channel_lr_drop: float,
               weight_density: float, weight_ramp: float, nm: Sequence[int], penalty_kinds: Sequence[int],
               penalty_strengths: Sequence[float], quant_bits: int, quant_per_channel: bool, solver: str,
               steps: int, lr: float, beta1: float, beta2: float, eps: float, momentum: float,
               log_every: int, backend: str
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Iterative Gram-form solve of the quadratic ``(H, F, anchor, f0, scale)``.

    Returns ``(W, mask, grid_scale, history_steps, history_losses)``: the latent weight,
    the final mask, the grid scale (``(G, C_out/G, 1)`` per channel, ``(1, 1, 1)`` per
    layer, empty without quantization) and the ``(step, loss)`` history as two tensors.
    """
    from .constraints import ConstraintPlan
    from .losses import Quadratic
    from .solvers import SolverConfig

    geo = _geometry(kind, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                    has_bias)
    comp = _compression(channel_keep, channel_ramp, channel_lr_drop, weight_density, weight_ramp, nm,
                        penalty_kinds, penalty_strengths, quant_bits, quant_per_channel)
    quad = Quadratic(H, F, anchor, f0, float(scale))
    plan = ConstraintPlan(comp, geo, int(steps), anchor.shape[-1], anchor.device, anchor.dtype, backend)
    cfg = SolverConfig(solver=solver, steps=int(steps), lr=float(lr), betas=(float(beta1), float(beta2)),
                       eps=float(eps), momentum=float(momentum), log_every=int(log_every))
    _, (W, history) = dispatch.call("gram_solve", anchor.device, backend, None, quad, plan, cfg)
    grid = plan.scale.clone() if plan.scale is not None else anchor.new_empty((0,))
    hs = torch.tensor([s for s, _ in history], dtype=torch.int64, device=anchor.device)
    hv = torch.tensor([v for _, v in history], dtype=torch.float64, device=anchor.device)
    return W.contiguous().clone(), plan.mask.clone().contiguous(), grid.contiguous(), hs, hv


@gram_solve.register_fake
def _gram_solve_fake(H, F, anchor, f0, scale, kind, in_channels, out_channels, kernel_size, stride,
                     padding, dilation, groups, has_bias, channel_keep, channel_ramp, channel_lr_drop,
                     weight_density, weight_ramp, nm, penalty_kinds, penalty_strengths, quant_bits,
                     quant_per_channel, solver, steps, lr, beta1, beta2, eps, momentum, log_every, backend):
    G, R = anchor.shape[0], anchor.shape[1]
    if quant_bits:
        grid = anchor.new_empty((G, R, 1) if quant_per_channel else (1, 1, 1))
    else:
        grid = anchor.new_empty((0,))
    n = _history_len(int(steps), int(log_every))
    return (torch.empty_like(anchor, memory_format=torch.contiguous_format),
            anchor.new_empty(anchor.shape, dtype=torch.bool),
            grid,
            anchor.new_empty((n,), dtype=torch.int64),
            anchor.new_empty((n,), dtype=torch.float64))
