"""The exact solver's engine: column sweeps, coordinate passes, exchanges, channel rounds.

Every piece against a float64 reference on fresh random problems (sizes that are not
block multiples): the sweep against the papers' formulation with the factor of ``H⁻¹``,
the whitened residual against its definition, coordinate passes against per-row solves,
the window values against explicit optimal-brain-surgeon solves.
"""
import math

import pytest
import torch
import torch.nn as nn

import cdfast
from cdfast.layer.constraints import topk_mask
from cdfast.layer.geometry import LayerGeometry
from cdfast.layer.losses import LossSpec, Quadratic
from cdfast.layer.plan import ConstraintPlan
from cdfast.layer.solvers import exact as E
from cdfast.layer.solvers import exact_solve
from cdfast.layer.solvers.sweep import (ColumnRule, WindowBudget, act_order, coordinate_pass, exchange_rounds,
                                        nm_order, obs_values, refit_scale, reverse_cholesky, sweep, transposed,
                                        upper_t_mul)

F64 = torch.float64


def spd(G, D, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(G, D, rows, generator=g, dtype=F64)
    X[:, 1::3] += 0.8 * X[:, ::3][:, : X[:, 1::3].shape[1]]  # correlated columns
    return X @ X.transpose(1, 2) + 0.1 * torch.eye(D, dtype=F64)


def papers_sweep(W, H, fix):
    """GPTQ/SparseGPT column by column (row form, one group): U = chol(H⁻¹) upper, the error
    of column j divided by U_jj fed into the later columns along U_j,:."""
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    W = W.clone()
    for j in range(W.shape[1]):
        q = fix(j, W[:, j])
        e = (W[:, j] - q) / U[j, j]
        W[:, j] = q
        W[:, j + 1:] -= e[:, None] * U[j, j + 1:][None, :]
    return W


def objective(W, T, H):
    return float(((W - T) * torch.bmm(H, W - T)).sum())


@pytest.mark.parametrize("block", [1, 5, 32])
def test_sweep_is_the_papers_sweep_with_one_factorisation(block):
    G, D, R = 2, 45, 7
    H = spd(G, D, 3 * D)
    T = torch.randn(G, D, R, dtype=F64)
    mask = torch.rand(G, D, R) > 0.4
    scale = T.abs().amax(1, keepdim=True) * 0.6
    U = reverse_cholesky(H)
    assert torch.allclose(U @ U.transpose(1, 2), H, atol=1e-9) and torch.equal(U, U.triu())
    for rule in (ColumnRule(mask=mask), ColumnRule(mask, scale, 3, D - 2)):
        Q, Y = sweep(T, U, rule, block=block, residual=True)
        assert torch.allclose(Y, upper_t_mul(U, Q - T), atol=1e-9)  # the whitened residual
        assert torch.allclose(upper_t_mul(U, Q), U.transpose(1, 2) @ Q, atol=1e-9)
        for g in range(G):
            L = 3.0

            def fix(j, w):
                q = w.clone()
                if rule.scale is not None and j < D - 2:
                    s = scale[g, 0]
                    q = torch.clamp(torch.round(w / s * L), -L, L) * s / L
                return q * mask[g, j]
            ref = papers_sweep(T[g].t(), H[g], fix)
            assert torch.allclose(Q[g].t(), ref, atol=1e-9), float((Q[g].t() - ref).abs().max())
        assert not Q[~mask].any()


def test_obs_values_are_the_optimum_given_the_fixed_columns():
    G, D, R = 1, 30, 4
    H = spd(G, D, 90)
    T = torch.randn(G, D, R, dtype=F64)
    U = reverse_cholesky(H)
    mask = torch.rand(G, D, R) > 0.5
    seen = {}

    class Spy(WindowBudget):
        def choose(self, maskf, j0, W, T_, U_):
            seen[j0] = obs_values(W, T_, U_)

    rule = ColumnRule(mask=mask, budget=Spy(U, 10, topk_mask, keep=torch.full((1, 3), 10 * R)))
    Q = sweep(T, U, rule, block=10)
    for j0, values in seen.items():
        # columns < j0 fixed at Q, the rest free: the optimum of the free block, row by row
        F_ = slice(j0, D)
        for r in range(R):
            d = Q[0, :j0, r] - T[0, :j0, r]
            free = T[0, F_, r] - torch.linalg.solve(H[0][F_, F_], H[0][F_, :j0] @ d)
            assert torch.allclose(values[0, :, r], free[:10], atol=1e-9)


def test_coordinate_passes_descend_to_the_optimum_on_the_mask():
    G, D, R = 2, 37, 5
    H = spd(G, D, 2 * D, seed=1)
    T = torch.randn(G, D, R, dtype=F64)
    mask = torch.rand(G, D, R) > 0.5
    U = reverse_cholesky(H)
    rule = ColumnRule(mask=mask)
    W, Y = sweep(T, U, rule, residual=True)
    prev = objective(W, T, H)
    for _ in range(150):
        W, Y = coordinate_pass(W, Y, U, H, rule, block=8)
        value = objective(W, T, H)
        assert value <= prev * (1 + 1e-12)
        prev = value
    assert torch.allclose(Y, upper_t_mul(U, W - T), atol=1e-8)  # kept up to date
    best = torch.zeros_like(T)
    for g in range(G):
        for r in range(R):
            s = mask[g, :, r]
            best[g, s, r] = torch.linalg.solve(H[g][s][:, s], (H[g] @ T[g, :, r])[s])
    assert prev <= objective(best, T, H) * (1 + 1e-8)


def test_grid_refit_and_passes_stay_on_the_grid_and_descend():
    G, D, R = 1, 29, 6
    H = spd(G, D, 60, seed=2)
    T = torch.randn(G, D, R, dtype=F64)
    U = reverse_cholesky(H)
    rule = ColumnRule(None, T.abs().amax(1, keepdim=True) * 0.8, 3, D - 1)
    Q = sweep(T, U, rule)
    UT = upper_t_mul(U, T)
    prev = objective(Q, T, H)
    for _ in range(3):
        old = rule.scale.clone()
        scale, Y = refit_scale(Q, rule, U, UT, per_channel=True)
        after = objective(Q, T, H)
        assert after <= prev * (1 + 1e-12) and torch.allclose(Y, upper_t_mul(U, Q - T), atol=1e-9)
        for f in (0.97, 1.03):  # the refit is the optimum along the scale of each row
            Qf = Q.clone()
            Qf[:, :D - 1] *= f
            assert objective(Qf, T, H) >= after
        Q, Y = coordinate_pass(Q, Y, U, H, rule)
        prev = objective(Q, T, H)
        assert prev <= after * (1 + 1e-12)
        codes = Q[:, :D - 1] / scale * 3
        assert torch.allclose(codes, codes.round(), atol=1e-9) and codes.abs().max() <= 3 + 1e-9
        assert not torch.equal(scale, old)


def test_exchanges_keep_the_budget_and_never_raise_the_loss():
    G, D, R = 1, 40, 8
    H = spd(G, D, 50, seed=3)
    T = torch.randn(G, D, R, dtype=F64)
    U = reverse_cholesky(H)
    mask = torch.zeros(G, D, R, dtype=torch.bool)
    mask.view(-1)[torch.randperm(D * R)[: D * R // 3]] = True  # a poor mask
    rule = ColumnRule(mask=mask)
    W, Y = sweep(T, U, rule, residual=True)
    W, Y = coordinate_pass(W, Y, U, H, rule)
    before = objective(W, T, H)
    W, Y = exchange_rounds(W, Y, U, H, rule, D, rounds=10)
    assert int(rule.mask.sum()) == D * R // 3 and not W[~rule.mask].any()
    assert objective(W, T, H) < 0.9 * before


def test_orders():
    H = spd(2, 12, 30)
    order = act_order(H, free=1, first=torch.tensor([[True] + [False] * 10] * 2))
    assert order[:, 0].tolist() == [0, 0] and order[:, -1].tolist() == [11, 11]
    d = torch.diagonal(H, dim1=-2, dim2=-1)
    for g in range(2):
        assert (d[g, order[g, 1:-1]].diff() <= 0).all()
    o = nm_order(12, 3, 2, 13)  # 4 channels × 3 taps, m = 2, a bias column
    assert o.tolist() == [0, 3, 1, 4, 2, 5, 6, 9, 7, 10, 8, 11, 12]


# ------------------------------------------------------------------- exact_solve
def _quad(conv, h_t, h_s, fit_bias=False, loss="cross"):
    g = LayerGeometry.of(conv)
    st = cdfast.LayerStatistics(conv, dtype=F64, fit_bias=fit_bias).update(h_t, h_s)
    A = g.weight_matrix(conv.weight.detach(), conv.bias.detach() if fit_bias else None)
    return g, Quadratic.from_statistics(st, LossSpec(loss, mu=0.6), A)


@pytest.mark.parametrize("comp", [cdfast.WeightPrune(0.4), cdfast.NMSparsity(2, 4), cdfast.Quantize(3),
                                  cdfast.Quantize(2, per_channel=False),
                                  [cdfast.WeightPrune(0.5), cdfast.Quantize(4)],
                                  [cdfast.ChannelPrune(0.5), cdfast.Quantize(4)]], ids=str)
@pytest.mark.parametrize("fit_bias", [False, True])
def test_exact_history_is_the_loss_and_constraints_hold(comp, fit_bias):
    torch.manual_seed(4)
    conv = nn.Conv2d(8, 6, 3, padding=1, groups=2).double()
    h_t = torch.randn(5, 8, 7, 7, dtype=F64)
    g, q = _quad(conv, h_t, h_t + 0.3 * torch.randn_like(h_t), fit_bias)
    plan = ConstraintPlan(comp, g, 1, q.anchor.shape[-1], "cpu", F64)
    W, hist = exact_solve(q, plan)
    assert abs(hist[-1][1] - float(q.loss(W))) <= 1e-9 * float(q.loss(W))  # from the residual, no product
    assert not W[~plan.mask].any()
    if plan.weight is not None:
        assert int(plan.mask[..., :g.cols].sum()) == int(plan.weight.density * g.out_channels * g.cols + 1e-9)
    if plan.nm is not None:
        kept = plan.mask[..., :g.cols].reshape(2, 3, 1, 4, 9).sum(3)  # groups, rows, channel blocks, taps
        assert (kept == 2).all()
    if plan.quant is not None:
        L = 2 ** (plan.quant.bits - 1) - 1
        codes = W[..., :g.cols] / plan.scale * L
        assert torch.allclose(codes, codes.round(), atol=1e-9) and codes.abs().max() <= L


@pytest.mark.parametrize("comp", [cdfast.WeightPrune(0.5), cdfast.NMSparsity(2, 4)], ids=str)
def test_float32_history_is_the_float64_loss(comp):
    """The loss the sweep reports from its float32 residual (row dot products in float32, their
    sum in float64) against the float64 quadratic at the same weights."""
    torch.manual_seed(5)
    conv = nn.Conv2d(8, 12, 3, padding=1).double()
    h_t = torch.randn(6, 8, 7, 7, dtype=F64)
    g, q64 = _quad(conv, h_t, h_t + 0.3 * torch.randn_like(h_t))
    q = q64.to(torch.float32)
    plan = ConstraintPlan(comp, g, 1, q.anchor.shape[-1], "cpu", torch.float32)
    W, hist = exact_solve(q, plan)
    assert W.dtype == torch.float32
    ref = float(q64.loss(W.double()))
    assert abs(hist[-1][1] - ref) <= 1e-5 * ref
    assert abs(float(q.loss(W)) - ref) <= 1e-5 * ref  # the float32 quadratic's own value


@pytest.mark.parametrize("extra", [cdfast.WeightPrune(0.5), cdfast.Quantize(3)], ids=str)
def test_sweeps_stay_inside_a_fixed_support(extra):
    """The budget's mask, its exchanges and the rounding sweep never use a weight a FixedSupport removed;
    the weight budget counts the supported weights."""
    torch.manual_seed(8)
    conv = nn.Conv2d(8, 6, 3, padding=1).double()
    h = torch.randn(6, 8, 6, 6, dtype=F64)
    fixed = torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(1)) < 0.6
    res = cdfast.distill_layer(conv, h, h + 0.2 * torch.randn_like(h), solver="exact", stats_dtype=F64,
                               compression=[cdfast.FixedSupport(mask=fixed), extra])
    assert not res.mask[~fixed].any() and not res.weight[~fixed].any()
    if isinstance(extra, cdfast.WeightPrune):
        assert int(res.mask.sum()) == int(0.5 * int(fixed.sum()))
    else:
        assert torch.equal(res.mask, fixed) and res.loss_after < res.loss_before


def test_sweeps_damp_by_the_unseen_energy_with_few_rows():
    lin = nn.Linear(64, 8, bias=False).double()
    x = torch.randn(20, 64, dtype=F64) @ torch.randn(64, 64, dtype=F64)
    g, q = _quad(lin, x, x)
    assert q.unseen > E.GPTQ_DAMPING and E.sweep_damping(q) == q.unseen
    prob = E._sweep_problem(q.dense(), None)
    d = torch.diagonal(q.dense().H, dim1=-2, dim2=-1)
    assert torch.allclose(torch.diagonal(prob.H, dim1=-2, dim2=-1) - d, q.unseen * d.mean(-1, keepdim=True))


def greedy_channels(W, Hinv, taps, keep):
    """One channel at a time, the least group-OBS cost first (the plain greedy order)."""
    W, Hinv = W.clone(), Hinv.clone()
    alive = list(range(W.shape[1] // taps))
    while len(alive) > keep:
        costs = []
        for c in alive:
            J = slice(c * taps, (c + 1) * taps)
            costs.append(float(torch.trace(W[:, J] @ torch.linalg.inv(Hinv[J, J]) @ W[:, J].t())))
        c = alive.pop(min(range(len(alive)), key=costs.__getitem__))
        J = list(range(c * taps, (c + 1) * taps))
        coef = torch.linalg.inv(Hinv[J][:, J])
        W -= (W[:, J] @ coef) @ Hinv[J, :]
        Hinv -= Hinv[:, J] @ coef @ Hinv[J, :]
        W[:, J] = 0
    return sorted(alive)


def test_channel_rounds_are_the_greedy_order_below_the_round_count():
    torch.manual_seed(5)
    conv = nn.Conv2d(12, 5, 3, padding=1).double()
    h_t = torch.randn(4, 12, 6, 6, dtype=F64)
    g, q = _quad(conv, h_t, h_t + 0.2 * torch.randn_like(h_t))
    plan = ConstraintPlan(cdfast.ChannelPrune(0.5), g, 1, q.anchor.shape[-1], "cpu", F64)
    keep = E._select_channels(q, plan)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(q.damped_H()))[0]
    assert torch.nonzero(keep[0]).flatten().tolist() == greedy_channels(q.minimizer()[0], Hinv, 9, 6)


def test_channel_rounds_meet_the_budget_with_many_channels():
    torch.manual_seed(6)
    lin = nn.Linear(200, 16).double()
    x = torch.randn(300, 200, dtype=F64)
    res = cdfast.distill_layer(lin, x, x + 0.1 * torch.randn_like(x), compression=cdfast.ChannelPrune(0.3),
                               solver="exact", stats_dtype=F64)
    assert res.kept_channels.numel() == 60 and res.loss_after < res.loss_before


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("comp", [cdfast.WeightPrune(0.5), cdfast.NMSparsity(2, 4), cdfast.Quantize(4)], ids=str)
def test_exact_solver_runs_on_cuda_tensors(comp):
    torch.manual_seed(7)
    conv = nn.Conv2d(16, 24, 3, padding=1).double()
    h = torch.randn(6, 16, 8, 8, dtype=F64)
    cpu = cdfast.distill_layer(conv, h, h, compression=comp, solver="exact", stats_dtype=F64)
    gpu = cdfast.distill_layer(conv.cuda(), h.cuda(), h.cuda(), compression=comp, solver="exact", stats_dtype=F64)
    assert gpu.weight.is_cuda
    assert math.isclose(gpu.loss_after, cpu.loss_after, rel_tol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bool])
def test_transposed_copies_in_tiles_exactly(dtype):
    X = torch.randn(2, 300, 517, dtype=torch.float64)  # above one tile, not a multiple of it
    X = X > 0 if dtype == torch.bool else X
    Y = transposed(X)
    assert Y.is_contiguous() and Y.dtype == dtype and torch.equal(Y, X.transpose(1, 2))
    assert torch.equal(transposed(X[:, :7, :9]), X[:, :7, :9].transpose(1, 2))
