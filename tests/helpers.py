"""Helpers shared by the tests of every backend, so each meets the same rule."""
from __future__ import annotations

import torch

import cdfast
from cdfast.layer.distill import _finalize, _naive
from cdfast.layer.geometry import LayerGeometry
from cdfast.layer.losses import LossSpec, Quadratic
from cdfast.layer.plan import ConstraintPlan
from cdfast.layer.solvers import SolverConfig

#: Prune + quantize combinations whose solve must end clearly below naive compression.
PRUNE_AND_QUANTIZE = [[cdfast.ChannelPrune(0.5), cdfast.Quantize(4)],
                      [cdfast.WeightPrune(0.5), cdfast.Quantize(4)]]


def correlated_features(n: int, channels: int, latent: int, size: int, seed: int) -> torch.Tensor:
    """Conv inputs whose channels mix ``latent`` sources (plus a little noise), as real
    feature maps are: a pruned channel can then be compensated by the others, so a
    refit has much to gain over naive pruning."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, latent, size, size, generator=g)
    mix = torch.randn(channels, latent, generator=g)
    return torch.einsum("ck,nkhw->nchw", mix, z) + 0.1 * torch.randn(n, channels, size, size, generator=g)


def prune_quantize_ratio(solve, compression, steps: int = 200, dtype=torch.float32, seed: int = 0) -> float:
    """``loss_after / loss_before`` of ``solve(quad, plan, cfg) -> (W_latent, history)`` on
    a 16→16 3×3 layer, finalised as :func:`cdfast.distill_layer` finalises (mask, codes,
    closed-form scale); ``loss_before`` is the teacher compressed naively on the same
    mask and grid."""
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(16, 16, 3, padding=1).to(dtype)
    h_t = correlated_features(24, 16, 5, 8, seed).to(dtype)
    h_s = h_t + 0.05 * torch.randn_like(h_t)
    geo = LayerGeometry.of(conv)
    stats = cdfast.LayerStatistics(conv, dtype=dtype).update(h_t, h_s)
    anchor = geo.weight_matrix(conv.weight.detach())
    quad = Quadratic.from_statistics(stats, LossSpec("cross", mu=0.6), anchor)
    plan = ConstraintPlan(compression, geo, steps, anchor.shape[-1], "cpu", dtype, backend="torch")
    W, _ = solve(quad, plan, SolverConfig(steps=steps, lr=1e-3))
    W_final, _, _ = _finalize(W, plan, quad)
    return float(quad.loss(W_final)) / float(quad.loss(_naive(anchor, plan)))
