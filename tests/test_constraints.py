"""Each proximal map and projection against its closed form."""
import math

import numpy as np
import pytest
import torch

import cdfast
from cdfast.layer.constraints import (channel_norms, group_shrink, nm_mask, quantize, soft_threshold,
                                topk_mask)
from cdfast.layer.geometry import LayerGeometry

GEO = LayerGeometry("conv2d", 6, 5, (3, 3))


def test_soft_threshold_closed_form():
    w = torch.randn(4, 7, dtype=torch.float64)
    t = 0.3
    expected = np.sign(w.numpy()) * np.maximum(np.abs(w.numpy()) - t, 0)
    assert np.array_equal(soft_threshold(w, t).numpy(), expected)


def test_group_shrink_closed_form():
    W = torch.randn(1, 5, 6 * 9, dtype=torch.float64)
    W[..., 9:18] *= 0.01  # one channel with a small norm: shrinks to exactly zero
    out = group_shrink(W, GEO, 0.5)
    for i in range(6):
        g = W[..., i * 9:(i + 1) * 9]
        n = float(g.norm())
        expected = max(1 - 0.5 / n, 0.0) * g
        assert torch.allclose(out[..., i * 9:(i + 1) * 9], expected, atol=1e-15)
    assert (out[..., 9:18] == 0).all()
    assert torch.allclose(channel_norms(W, GEO)[0], W.view(5, 6, 9).pow(2).sum((0, 2)).sqrt())


def test_topk_and_nm_masks():
    s = torch.rand(3, 11)
    m = topk_mask(s, 7)
    assert m.sum() == 7 and s[m].min() > s[~m].max()
    geo = LayerGeometry("conv2d", 8, 3, (1, 2))
    scores = torch.rand(1, 3, 16)
    keep = nm_mask(scores, geo, 2, 4)
    # columns are (channel, tap): groups of 4 consecutive channels for each tap
    k = keep.view(3, 2, 4, 2)
    assert (k.sum(2) == 2).all()
    sv = scores.view(3, 2, 4, 2)
    assert (torch.where(k, sv, 2.0).amin(2) >= torch.where(k, -1.0, sv).amax(2)).all()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_projects_to_the_nearest_grid_point(bits):
    W = torch.randn(2, 4, 10, dtype=torch.float64)
    scale = W.abs().amax(-1, keepdim=True) * 0.8
    codes, vals = quantize(W, scale, bits)
    L = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and int(codes.abs().max()) <= L
    grid = torch.arange(-L, L + 1, dtype=torch.float64) / L  # {0, ±1/L, …, ±1}
    full = scale * grid  # (2, 4, 2L+1): scale is (2, 4, 1)
    nearest = torch.stack([full[i, j][(W[i, j][:, None] - full[i, j]).abs().argmin(-1)] for i in range(2) for j in range(4)]).view_as(W)
    assert torch.allclose(vals, nearest, atol=1e-12)
    assert torch.allclose(vals, codes.double() * scale / L)


@pytest.mark.parametrize("bad, match", [
    (lambda: cdfast.ChannelPrune(keep=0.0), "keep"),
    (lambda: cdfast.ChannelPrune(keep=1.5), "keep"),
    (lambda: cdfast.WeightPrune(density=-0.1), "density"),
    (lambda: cdfast.WeightPrune(density=float("nan")), "density"),
    (lambda: cdfast.Quantize(bits=1), "bits"),
    (lambda: cdfast.Quantize(bits=9), "bits"),
    (lambda: cdfast.NMSparsity(n=5, m=4), "n"),
    (lambda: cdfast.L1(strength=-1.0), "strength"),
    (lambda: cdfast.GroupLasso(strength=math.inf), "strength"),
])
def test_bad_constraint_values(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_bad_constraint_types():
    with pytest.raises(TypeError, match="bits"):
        cdfast.Quantize(bits=4.0)
    with pytest.raises(TypeError, match="keep"):
        cdfast.ChannelPrune(keep="half")
