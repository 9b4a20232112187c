"""The bench's GPTQ and SparseGPT (``bench/peers.py``) against their definitions, in float64.

The peers are what the exact solver is measured against, so they must be the papers'
algorithms: the blocked lazy updates equal the column-by-column sweep written with the
explicit inverse of ``H`` (the optimal-brain-surgeon update of the remaining columns),
the results lie on the grid or the mask, and act-order and the clipping search do what
they say.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import peers  # noqa: E402
from cdfast.layer.constraints import quantize  # noqa: E402

F64 = torch.float64


def problem(R=9, D=45, rows=150, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(D, rows, generator=g, dtype=F64)
    X[1::2] += 0.7 * X[::2][: X[1::2].shape[0]]  # correlated inputs
    return torch.randn(R, D, generator=g, dtype=F64), X @ X.t()


def obs_sweep(W, H, fix):
    """Fix the columns in order; after each, the remaining ones take their optimum given the
    fixed ones (an explicit solve on the remaining block of ``H``)."""
    W = W.clone()
    D = W.shape[1]
    for j in range(D):
        q = fix(j, W[:, j:])
        d = W[:, j] - q
        W[:, j] = q
        if j + 1 < D:
            rest = slice(j + 1, D)
            Hinv = torch.linalg.inv(H[j:, j:])  # OBS: δw_rest = −d·[H⁻¹]_{j,rest}/[H⁻¹]_jj
            W[:, rest] -= d[:, None] * (Hinv[0, 1:] / Hinv[0, 0])[None, :]
    return W


@pytest.mark.parametrize("block", [1, 7, 128])
def test_gptq_is_the_obs_sweep(block):
    W0, H = problem()
    Hd, W = peers.prepare_hessian(H, W0)
    scale = W.abs().amax(1, keepdim=True)
    ref = obs_sweep(W, Hd, lambda j, rest: quantize(rest[:, :1], scale, 3)[1][:, 0])
    Q, s = peers.gptq(W0, H, 3, block=block)
    assert torch.allclose(Q, ref, atol=1e-10) and torch.equal(s, scale)
    codes = Q / s * 3
    assert torch.allclose(codes, codes.round(), atol=1e-9)


def test_gptq_options():
    W0, H = problem(seed=1)
    Hd, W = peers.prepare_hessian(H, W0)
    Qa, s = peers.gptq(W0, H, 2, act_order=True)
    perm = torch.argsort(torch.diagonal(Hd), descending=True)
    ref = obs_sweep(W[:, perm], Hd[perm][:, perm], lambda j, rest: quantize(rest[:, :1], s, 2)[1][:, 0])
    assert torch.allclose(Qa[:, perm], ref, atol=1e-10)
    Qc, sc = peers.gptq(W0, H, 2, clip_search=True)
    amax = W.abs().amax(1, keepdim=True)
    assert (sc <= amax).all() and (sc < amax).any()  # it clips some rows
    err = lambda s_: (W - quantize(W, s_, 2)[1]).abs().pow(2.4).sum(1)  # noqa: E731
    assert (err(sc) <= err(amax) + 1e-12).all()


def test_sparsegpt_masks_and_sweep():
    W0, H = problem(R=6, D=40, seed=2)
    out = peers.sparsegpt(W0, H, density=0.5, block=16)
    assert int((out != 0).sum()) == 6 * 40 // 2  # half of each 16-column block (and of the last 8)
    assert [int((out[:, b:b + 16] != 0).sum()) for b in (0, 16, 32)] == [48, 48, 24]
    # with the mask it chose given, the sweep is the OBS sweep on that mask
    Hd, W = peers.prepare_hessian(H, W0)
    mask = out != 0
    ref = obs_sweep(W, Hd, lambda j, rest: rest[:, 0] * mask[:, j])
    assert torch.allclose(out, ref, atol=1e-10)
    nm = peers.sparsegpt(W0, H, nm=(2, 4))
    assert ((nm != 0).reshape(6, 10, 4).sum(-1) == 2).all()
    conv = peers.sparsegpt(W0[:, :36], H[:36, :36], nm=(2, 4), taps=9)  # 4 channels × 9 taps
    assert ((conv != 0).reshape(6, 4, 9).sum(1) == 2).all()  # 2 of the 4 channels at every tap
