"""The torch.library custom ops of :mod:`cdfast.ops`: schemas, fake kernels, autograd.

``torch.library.opcheck`` runs each op (CPU, torch path) under the schema check,
fake tensors, autograd registration and AOT dispatch with dynamic shapes. The
results are also held to the direct backend calls.
"""
from __future__ import annotations

import pytest
import torch

from cdfast import ChannelPrune, GroupLasso, L1, Quantize, WeightPrune, ops
from cdfast._backends import reference as ref
from cdfast.constraints import ConstraintPlan
from cdfast.geometry import LayerGeometry
from cdfast.losses import ActivationSpec, LossSpec, Quadratic
from cdfast.solvers import SolverConfig
from cdfast.statistics import ERROR_BASIS, LayerStatistics

GEO = LayerGeometry("conv2d", 6, 8, (3, 3), (2, 1), (1, 2), (1, 2), 2, True)
LIN = LayerGeometry("linear", 11, 5, has_bias=True)


def _inputs(geo: LayerGeometry, seed: int):
    torch.manual_seed(seed)
    shape = (2, geo.in_channels, 7, 6) if geo.kind == "conv2d" else (9, geo.in_channels)
    ht = torch.randn(shape)
    return ht, ht + 0.1 * torch.randn(shape)


@pytest.mark.parametrize("geo,fit_bias,float64", [(GEO, False, False), (LIN, True, True)])
def test_statistics_op(geo, fit_bias, float64):
    ht, hs = _inputs(geo, 0)
    args = (ht, hs)
    kwargs = dict(**ops.geometry_args(geo), fit_bias=fit_bias, float64=float64, mix=list(ERROR_BASIS),
                  backend="torch")
    torch.library.opcheck(ops.statistics, args, kwargs)
    out = ops.statistics(*args, **kwargs)
    expected = ref.statistics(ht, hs, geo, fit_bias, torch.float64 if float64 else torch.float32, ERROR_BASIS)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("geo,objective,fit_bias", [(GEO, "activation", False), (LIN, "linear", True)])
def test_data_loss_grad_op(geo, objective, fit_bias):
    ht, hs = _inputs(geo, 1)
    torch.manual_seed(2)
    A = torch.randn(geo.out_channels, geo.cols) * 0.3
    b = torch.randn(geo.out_channels) * 0.1
    Am = geo.weight_matrix(A, b if fit_bias else None)
    scale = torch.rand(geo.out_channels) + 0.5 if objective == "activation" else None
    shift = torch.randn(geo.out_channels) * 0.1 if objective == "activation" else None
    spec = LossSpec("cross", 0.6, objective=objective,
                    activation=ActivationSpec(scale, shift) if scale is not None else None)
    bias = None if fit_bias else b
    targets = ref.data_targets(Am, ht, hs, geo, spec, bias)
    W = (Am + 0.05 * torch.randn_like(Am)).requires_grad_(True)
    args = (W, ht, hs, targets, bias, scale, shift)
    kwargs = dict(**ops.geometry_args(geo), loss="cross", mu=0.6, alpha=0.5, beta=0.5, objective=objective,
                  backend="torch")
    torch.library.opcheck(ops.data_loss_grad, args, kwargs)
    loss, grad = ops.data_loss_grad(*args, **kwargs)
    l_ref, g_ref = ref.data_loss_grad(W.detach(), ht, hs, targets, geo, spec, bias)
    assert torch.equal(loss, l_ref) and torch.equal(grad, g_ref)
    (dW,) = torch.autograd.grad(3.0 * loss, W)  # the op is differentiable in W
    torch.testing.assert_close(dW, 3.0 * g_ref)
    # the autograd function distill_layer uses
    used = []
    value = ops.data_loss(W, ht, hs, targets, geo, spec, bias, "torch", None, used)
    (dW,) = torch.autograd.grad(value, W)
    assert used == ["torch"] and torch.equal(value, l_ref) and torch.equal(dW, g_ref)


def _quad(geo: LayerGeometry, fit_bias: bool):
    ht, hs = _inputs(geo, 3)
    stats = LayerStatistics(geo, fit_bias=fit_bias, backend="torch").update(ht, hs)
    torch.manual_seed(4)
    anchor = torch.randn(geo.groups, geo.group_out, geo.cols + int(fit_bias)) * 0.3
    return Quadratic.from_statistics(stats, LossSpec("cross"), anchor)


@pytest.mark.parametrize("geo,fit_bias,comp,solver", [
    (GEO, False, [ChannelPrune(0.5), GroupLasso(0.01)], "adam"),
    (LIN, True, [WeightPrune(0.5), L1(0.01), Quantize(3)], "sgd"),
    (LIN, False, Quantize(4, per_channel=False), "adam"),
])
def test_gram_solve_op(geo, fit_bias, comp, solver):
    quad = _quad(geo, fit_bias)
    steps = 9
    args = (quad.H, quad.F, quad.anchor, quad.f0, quad.scale)
    kwargs = dict(**ops.geometry_args(geo), **ops.compression_args(comp), solver=solver, steps=steps,
                  lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, momentum=0.9, log_every=2, backend="torch")
    torch.library.opcheck(ops.gram_solve, args, kwargs)
    W, mask, scale, hs, hv = ops.gram_solve(*args, **kwargs)
    plan = ConstraintPlan(comp, geo, steps, quad.anchor.shape[-1], "cpu", torch.float32, "torch")
    W_ref, hist = ref.gram_solve(quad, plan, SolverConfig(solver=solver, steps=steps, lr=1e-2, log_every=2))
    assert torch.equal(W, W_ref) and torch.equal(mask, plan.mask)
    assert hs.tolist() == [s for s, _ in hist] and hv.tolist() == [v for _, v in hist]
    if plan.scale is not None:
        assert torch.equal(scale, plan.scale)
    else:
        assert scale.numel() == 0


def test_fake_shapes_under_compile():
    """The ops trace (fake tensors) inside torch.compile without running."""
    ht, hs = _inputs(GEO, 5)

    def f(a, b):
        return ops.statistics(a, b, **ops.geometry_args(GEO), fit_bias=True, float64=False,
                              mix=list(ERROR_BASIS), backend="torch").sum(0)

    out = torch.compile(f, backend="eager", fullgraph=True)(ht, hs)
    assert out.shape == (GEO.groups, GEO.cols + 1, GEO.cols + 1)
