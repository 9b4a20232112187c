"""The exact solver on the low-rank form (cdfast.layer.solvers.woodbury) against the dense one."""
import pytest
import torch
import torch.nn as nn

import cdfast
from cdfast.layer import losses
from cdfast.layer.geometry import LayerGeometry
from cdfast.layer.losses import LossSpec, Quadratic
from cdfast.layer.solvers import woodbury
from cdfast.layer.statistics import LayerStatistics
from conftest import rel_err

F64 = torch.float64


def _layer_and_inputs(kind: str, seed: int):
    torch.manual_seed(seed)
    if kind == "linear":  # 41 rows < 91 columns
        return nn.Linear(91, 23).double(), torch.randn(41, 91, dtype=F64)
    if kind == "conv":  # 25 rows < 117 columns, 3×3 taps per channel
        return nn.Conv2d(13, 7, 3, padding=1).double(), torch.randn(1, 13, 5, 5, dtype=F64)
    return nn.Conv2d(12, 6, 3, padding=1, groups=2).double(), torch.randn(1, 12, 4, 4, dtype=F64)


@pytest.mark.parametrize("kind", ["linear", "conv", "grouped"])
@pytest.mark.parametrize("compression", [cdfast.ChannelPrune(0.45), cdfast.FixedSupport(channels=(0, 2, 3, 5, 7)),
                                         [cdfast.ChannelPrune(0.3, ramp=0.5)], None])
@pytest.mark.parametrize("fit_bias", [False, True])
def test_lowrank_exact_solve_is_the_dense_one(kind, compression, fit_bias, monkeypatch):
    monkeypatch.setattr(woodbury, "CHUNK_ELEMENTS", 300)  # several chunks of rows
    layer, h_t = _layer_and_inputs(kind, 3)
    h_s = h_t + 0.2 * torch.randn_like(h_t)
    kw = dict(compression=compression, stats_dtype=F64, fit_bias=fit_bias, solver="exact",
              loss="cross" if compression is not None else "nc", mu=0.4)  # cross leaves nothing to fit unpruned
    low = cdfast.distill_layer(layer, h_t, h_s, form="lowrank", **kw)
    dense = cdfast.distill_layer(layer, h_t, h_s, form="gram", **kw)
    assert (low.solver, low.form, dense.form) == ("exact", "lowrank", "gram")
    assert torch.equal(low.mask, dense.mask) and low.loss_after < 0.9 * low.loss_before
    if compression is not None:
        assert torch.equal(low.kept_channels, dense.kept_channels)
    assert rel_err(low.weight, dense.weight) < 1e-8 and rel_err(low.bias, dense.bias) < 1e-8
    assert abs(low.loss_after - dense.loss_after) <= 1e-8 * dense.loss_before
    assert abs(low.loss_before - dense.loss_before) <= 1e-12 * dense.loss_before


def test_lowrank_float32_solve_matches_the_dense_one_and_equal_inputs_work():
    layer, h_t = _layer_and_inputs("conv", 4)
    layer = layer.float()
    h_t = h_t.float()
    for h_s in (h_t + 0.2 * torch.randn_like(h_t), h_t):  # F ≠ 0, then F = 0
        kw = dict(compression=cdfast.ChannelPrune(0.5), solver="exact")
        low = cdfast.distill_layer(layer, h_t, h_s, form="lowrank", **kw)
        dense = cdfast.distill_layer(layer, h_t, h_s, form="gram", **kw)
        assert torch.equal(low.mask, dense.mask) and low.weight.dtype == torch.float32
        assert low.loss_after < 0.5 * low.loss_before
        assert abs(low.loss_after - dense.loss_after) <= 1e-4 * dense.loss_before


@pytest.mark.filterwarnings("ignore:.*adam solve ended above naive:RuntimeWarning")  # two Adam steps
def test_auto_picks_the_lowrank_exact_solver_where_the_dense_one_does_not_fit():
    torch.manual_seed(0)
    wide = nn.Linear(12000, 3)  # 4·8·D² bytes above EXACT_MAX_BYTES
    h_t = torch.randn(3, 12000)
    res = cdfast.distill_layer(wide, h_t, h_t + 0.1 * torch.randn_like(h_t), compression=cdfast.ChannelPrune(0.5))
    assert (res.solver, res.form) == ("exact", "lowrank") and res.loss_after < res.loss_before
    assert int(res.mask[0].sum()) == 6000 and bool((res.weight[:, ~res.mask[0]] == 0).all())
    budget = cdfast.distill_layer(wide, h_t, h_t, compression=cdfast.WeightPrune(0.5), steps=2)
    assert budget.solver == "adam"  # weight budgets stay with Adam on the factor
    small = nn.Linear(40, 4)
    res = cdfast.distill_layer(small, torch.randn(8, 40), torch.randn(8, 40), compression=cdfast.ChannelPrune(0.5))
    assert (res.solver, res.form) == ("exact", "gram")  # where H fits, the dense exact solver as before


def test_lowrank_exact_solver_refuses_what_it_cannot_solve():
    layer, h_t = _layer_and_inputs("linear", 5)
    for comp in (cdfast.WeightPrune(0.5), cdfast.Quantize(4), [cdfast.ChannelPrune(0.5), cdfast.L1(1e-3)],
                 cdfast.FixedSupport(mask=torch.rand(23, 91) < 0.5)):
        with pytest.raises(ValueError, match="solver: 'exact'"):
            cdfast.distill_layer(layer, h_t, h_t, compression=comp, solver="exact", form="lowrank")
    with pytest.raises(ValueError, match="fewer sampled rows"):
        cdfast.distill_layer(layer, torch.randn(200, 91, dtype=F64), torch.randn(200, 91, dtype=F64),
                             compression=cdfast.ChannelPrune(0.5), solver="exact", form="lowrank")


def test_lowrank_loss_and_naive_loss_in_chunks_of_rows(monkeypatch):
    from cdfast.layer import distill
    from cdfast.layer.plan import ConstraintPlan

    monkeypatch.setattr(losses, "LOSS_CHUNK_ELEMENTS", 200)
    monkeypatch.setattr(distill, "LOSS_CHUNK_ELEMENTS", 200)
    layer, h_t = _layer_and_inputs("linear", 6)
    h_s = h_t + 0.3 * torch.randn_like(h_t)
    A = LayerGeometry.of(layer).weight_matrix(layer.weight.detach())
    st = LayerStatistics(layer, dtype=F64).update(h_t, h_s)
    low = Quadratic.from_statistics(st, LossSpec("cross"), A, lowrank=True)
    dense = low.dense()
    W = A + 0.3 * torch.randn_like(A)
    ref = Quadratic.from_statistics(LayerStatistics(layer, dtype=F64, lowrank=False).update(h_t, h_s),
                                    LossSpec("cross"), A)
    assert abs(float(low.loss(W) - ref.loss(W))) < 1e-12 * float(ref.loss(W))
    for comp in (cdfast.WeightPrune(0.4), cdfast.Quantize(3), [cdfast.WeightPrune(0.5), cdfast.Quantize(4, False)]):
        plan = ConstraintPlan(comp, LayerGeometry.of(layer), 10, 91, "cpu", F64)
        plan.mask = torch.rand_like(A) < 0.6
        plan.init_scale(A)
        naive = distill._naive(A, plan)
        assert abs(distill._naive_loss(low, A, plan) - float(ref.loss(naive))) < 1e-12 * float(ref.loss(naive))
        assert abs(distill._naive_loss(dense, A, plan) - float(ref.loss(naive))) < 1e-12 * float(ref.loss(naive))


@pytest.mark.parametrize("compression", [[cdfast.ChannelPrune(0.5), cdfast.Quantize(4)], cdfast.WeightPrune(0.4),
                                         cdfast.Quantize(3, per_channel=False)])
def test_adam_on_the_factor_in_chunks_of_rows_takes_the_gram_forms_steps(compression, monkeypatch):
    from cdfast.layer import plan as plan_module
    from cdfast.layer.solvers import iterative

    monkeypatch.setattr(iterative, "LOSS_CHUNK_ELEMENTS", 150)  # 2 rows of 75 columns a chunk
    monkeypatch.setattr(plan_module, "SCALE_CHUNK_ELEMENTS", 200)
    torch.manual_seed(7)
    layer = nn.Linear(75, 9).double()
    h_t = torch.randn(30, 75, dtype=F64)
    h_s = h_t + 0.2 * torch.randn_like(h_t)
    kw = dict(compression=compression, solver="adam", steps=30, lr=1e-2, stats_dtype=F64, log_every=1)
    low = cdfast.distill_layer(layer, h_t, h_s, form="lowrank", **kw)
    gram = cdfast.distill_layer(layer, h_t, h_s, form="gram", **kw)
    assert low.form == "lowrank" and gram.form == "gram"
    for (_, a), (_, b) in zip(low.history, gram.history, strict=True):
        assert abs(a - b) <= 1e-9 * max(1.0, abs(b))
    assert torch.equal(low.mask, gram.mask) and rel_err(low.weight, gram.weight) < 1e-9
    assert low.loss_after < low.loss_before
