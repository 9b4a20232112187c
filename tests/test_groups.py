"""Channel groups: the shared channel selection and the FixedSupport constraint.

* ``select_shared_channels`` with one consumer is the exact solver's own greedy OBS
  selection; consumers' costs add (a consumer counted twice, or with weight 0, changes
  nothing; a consumer that needs a channel keeps it); block quotas hold.
* ``FixedSupport`` keeps the weights off its support at exactly zero with every solver
  and form, and the exact solve on it is the minimiser of the restricted quadratic.
"""
import itertools

import pytest
import torch

import cdfast
from cdfast.layer.geometry import LayerGeometry
from cdfast.layer.losses import LossSpec, Quadratic
from cdfast.layer.plan import ConstraintPlan
from cdfast.layer.solvers.exact import _select_channels
from cdfast.layer.solvers.shared import pieces_of, select_shared_channels
from helpers import correlated_features


def _quad(c_in=8, c_out=6, k=3, seed=0, n=20):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(c_in, c_out, k, padding=k // 2)
    h = correlated_features(n, c_in, 4, 6, seed)
    stats = cdfast.LayerStatistics(conv, dtype=torch.float64).update(h.double(), (h + 0.2 * torch.randn_like(h)).double())
    geo = LayerGeometry.of(conv)
    quad = Quadratic.from_statistics(stats, LossSpec("cross", mu=0.6), geo.weight_matrix(conv.weight.detach().double()))
    quad.stats = stats
    return conv, geo, quad


def _units(c, taps):
    return torch.arange(c), torch.arange(c * taps).view(c, taps)


def test_one_consumer_is_the_exact_solvers_selection():
    conv, geo, quad = _quad()
    plan = ConstraintPlan(cdfast.ChannelPrune(0.5), geo, 1, geo.cols, "cpu", torch.float64)
    ref = _select_channels(quad, plan)[0]
    got = select_shared_channels([pieces_of(quad, *_units(8, 9))], 8, 4)
    assert torch.equal(ref, got)


def test_consumer_costs_add():
    _, _, qa = _quad(seed=1)
    _, _, qb = _quad(seed=2)
    one = select_shared_channels([pieces_of(qa, *_units(8, 9))], 8, 4)
    twice = select_shared_channels([pieces_of(qa, *_units(8, 9)), pieces_of(qa, *_units(8, 9))], 8, 4)
    silent = select_shared_channels([pieces_of(qa, *_units(8, 9)), pieces_of(qb, *_units(8, 9), weight=0.0)], 8, 4)
    assert torch.equal(one, twice) and torch.equal(one, silent)
    # a second consumer reading only channel u, heavily weighted, keeps u whatever the first prefers
    u = int(torch.nonzero(~one)[0])
    _, _, qc = _quad(c_in=1, seed=3)
    need_u = pieces_of(qc, torch.tensor([u]), torch.arange(9).view(1, 9), weight=1e6)
    both = select_shared_channels([pieces_of(qa, *_units(8, 9)), need_u], 8, 4)
    assert bool(both[u]) and int(both.sum()) == 4


def test_greedy_selection_is_near_the_best_subset():
    _, _, qa = _quad(c_in=6, seed=4)
    _, _, qb = _quad(c_in=6, seed=5)
    pieces = [pieces_of(qa, *_units(6, 9)), pieces_of(qb, *_units(6, 9))]

    def cost(keep):
        cols = torch.cat([torch.arange(c * 9, c * 9 + 9) for c in keep])
        return sum(float(q.restrict(cols).canonical()[1]) / float((q.anchor.pow(2)).sum()) for q in (qa, qb))

    best = min(cost(s) for s in itertools.combinations(range(6), 3))
    worst = max(cost(s) for s in itertools.combinations(range(6), 3))
    got = cost(torch.nonzero(select_shared_channels(pieces, 6, 3)).flatten().tolist())
    assert got <= best + 0.25 * (worst - best)


def test_block_quotas():
    _, _, q = _quad()
    keep = select_shared_channels([pieces_of(q, *_units(8, 9))], 8, 4, blocks=torch.arange(8) // 2)
    assert keep.view(4, 2).sum(1).tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="blocks"):
        select_shared_channels([pieces_of(q, *_units(8, 9))], 8, 3, blocks=torch.arange(8) // 2)


@pytest.mark.parametrize("solver, form", [("exact", "gram"), ("adam", "gram"), ("adam", "data"), ("sgd", "gram")])
def test_fixed_support_stays_fixed(solver, form):
    conv = torch.nn.Conv2d(8, 6, 3, padding=1)
    h = correlated_features(12, 8, 4, 6, 0)
    hs = h + 0.2 * torch.randn_like(h)
    kept = [0, 2, 3, 7]
    hs[:, [1, 4, 5, 6]] = 0
    res = cdfast.distill_layer(conv, h, hs, compression=[cdfast.FixedSupport(channels=kept), cdfast.Quantize(4)],
                               solver=solver, form=form, steps=60, lr=1e-3)
    off = torch.ones(8, dtype=torch.bool)
    off[kept] = False
    assert bool((res.weight[:, off] == 0).all()) and res.kept_channels.tolist() == kept
    assert res.loss_after < res.loss_before
    mask = torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(0)) < 0.5
    res = cdfast.distill_layer(conv, h, hs, compression=cdfast.FixedSupport(mask=mask), solver=solver, form=form,
                               steps=60, lr=1e-3)
    assert bool((res.weight[~mask] == 0).all())


def test_fixed_support_exact_is_the_restricted_minimiser():
    conv, geo, quad = _quad()
    kept = [1, 2, 5, 6]
    cols = torch.cat([torch.arange(c * 9, c * 9 + 9) for c in kept])
    ref = quad.restrict(cols).minimizer()
    res = cdfast.distill_layer(conv, statistics=quad.stats, loss="cross", mu=0.6, solver="exact",
                               compression=cdfast.FixedSupport(channels=kept))
    got = geo.weight_matrix(res.weight.double())[..., cols]  # the float32 weight of the layer
    assert float((got - ref).norm() / ref.norm()) < 1e-5


def test_fixed_support_bad_arguments():
    with pytest.raises(ValueError, match="exactly one"):
        cdfast.FixedSupport()
    with pytest.raises(ValueError, match="channels"):
        cdfast.FixedSupport(channels=[1, 1])
    with pytest.raises(TypeError, match="mask"):
        cdfast.FixedSupport(mask=torch.ones(3))
    with pytest.raises(ValueError, match="FixedSupport"):
        cdfast.distill_layer(torch.nn.Linear(4, 2), torch.randn(8, 4), torch.randn(8, 4),
                             compression=[cdfast.FixedSupport(channels=[0]), cdfast.ChannelPrune(0.5)])
    with pytest.raises(ValueError, match="out of range"):
        cdfast.distill_layer(torch.nn.Linear(4, 2), torch.randn(8, 4), torch.randn(8, 4),
                             compression=cdfast.FixedSupport(channels=[5]))


def test_row_weights_weigh_each_output_rows_obs_cost():
    """With ``row_weight`` the greedy removes, at each step, the unit whose removal leaves the
    smallest row-weighted OBS cost ``Σ_r w_r x*_{r,Z} [(H_δ⁻¹)_ZZ]⁻¹ x*_{r,Z}ᵀ`` (float64 reference)."""
    _, _, quad = _quad(c_in=7, c_out=5, seed=6)
    w = torch.tensor([100.0, 1e-3, 1e-3, 1e-3, 1e-3], dtype=torch.float64)  # row 0 decides
    x_star = quad.minimizer()[0]
    hinv = torch.linalg.inv(quad.damped_H()[0])

    def total(removed):
        Z = torch.cat([torch.arange(c * 9, c * 9 + 9) for c in removed])
        xz = x_star[:, Z]
        return float((w * ((xz @ torch.linalg.inv(hinv[Z][:, Z])) * xz).sum(1)).sum())

    removed: list[int] = []
    for _ in range(4):
        removed.append(min((u for u in range(7) if u not in removed), key=lambda u: total(removed + [u])))
    got = select_shared_channels([pieces_of(quad, *_units(7, 9), row_weight=w)], 7, 3)
    assert sorted(torch.nonzero(~got).flatten().tolist()) == sorted(removed)
    unweighted = select_shared_channels([pieces_of(quad, *_units(7, 9))], 7, 3)
    assert not torch.equal(got, unweighted)  # the weights change the choice on this layer
