"""LayerStatistics' economies (one Gram for equal inputs, the unfolded inputs while M < D,
symmetric Grams) and the quadratic's low-rank form, each against the plain formulas."""
import pytest
import torch
import torch.nn as nn

import cdfast
from cdfast.layer.constraints import ChannelPrune, Quantize, WeightPrune
from cdfast.layer.forms import choose_form, exact_fits, form_costs
from cdfast.layer.geometry import LayerGeometry
from cdfast.layer.losses import LossSpec, Quadratic
from cdfast.layer.plan import ConstraintPlan
from cdfast.layer.solvers import SolverConfig, gram_iterative
from cdfast.layer.statistics import GRAM_BLOCK, LayerStatistics, symmetric_gram
from conftest import rel_err

F64 = torch.float64


def test_symmetric_gram_is_x_xt():
    for D in (7, GRAM_BLOCK, GRAM_BLOCK + 3, 2 * GRAM_BLOCK + 17):
        X = torch.randn(2, D, 40, dtype=F64)
        out = torch.randn(2, D, D, dtype=F64)
        ref = out + X @ X.transpose(1, 2)
        assert rel_err(symmetric_gram(X, out), ref) < 1e-13
        assert rel_err(symmetric_gram(X), X @ X.transpose(1, 2)) < 1e-13


@pytest.mark.parametrize("rows", [3, 40], ids=["lowrank", "gram"])  # D = 4·9 = 36 columns
def test_equal_inputs_build_one_gram(rows):
    conv = nn.Conv2d(4, 5, 3, padding=1)
    h = torch.randn(rows // 3 + 1, 4, 3, 3, dtype=F64)
    g = LayerGeometry.of(conv)
    st = LayerStatistics(conv, dtype=F64).update(h, h)
    X = g.unfold(h)
    assert not st.has_error
    assert st.representation == ("lowrank" if X.shape[-1] < g.cols else "gram")
    if st.representation == "gram":
        assert st._grams.shape[0] == 1  # one Gram, not three
    assert rel_err(st.G_TT, X @ X.transpose(1, 2)) < 1e-13
    assert not st.G_EE.any() and not st.G_ET.any()
    h_s = h + 0.1 * torch.randn_like(h)
    st.update(h, h_s)  # a second batch with E ≠ 0 brings the other two Grams
    full = LayerStatistics(conv, dtype=F64, lowrank=False)
    full.update(h, h + 0 * h)
    full.update(h, h_s)
    assert st.has_error and full.has_error
    for name in ("G_TT", "G_EE", "G_ET", "G_SS", "G_ST"):
        assert rel_err(getattr(st, name), getattr(full, name)) < 1e-12, name


def test_few_rows_keep_the_unfolded_inputs_until_they_reach_the_columns():
    lin = nn.Linear(50, 6, bias=False)
    x = torch.randn(60, 50, dtype=F64)
    e = 0.1 * torch.randn_like(x)
    st = LayerStatistics(lin, dtype=F64, fit_bias=True)
    ref = LayerStatistics(lin, dtype=F64, fit_bias=True, lowrank=False)
    for s in (slice(0, 20), slice(20, 45)):
        st.update(x[s], x[s] + e[s])
        ref.update(x[s], x[s] + e[s])
        assert st.representation == "lowrank"  # 20, then 45 rows for 51 columns
        Xt, E = st.factors()
        assert Xt.shape == (1, 51, st.rows) and not E[:, -1].any()  # the ones row does not differ
    for name in ("G_TT", "G_EE", "G_ET"):
        assert rel_err(getattr(st, name), getattr(ref, name)) < 1e-12
    state = st.state_dict()
    st.update(x[45:], x[45:] + e[45:])  # 60 rows ≥ 51 columns: the Grams
    ref.update(x[45:], x[45:] + e[45:])
    assert st.representation == "gram" and st.rows == 60
    for name in ("G_TT", "G_EE", "G_ET"):
        assert rel_err(getattr(st, name), getattr(ref, name)) < 1e-12
    back = LayerStatistics(lin, dtype=F64, fit_bias=True)
    back.load_state_dict(state)
    assert back.representation == "lowrank" and back.rows == 45
    assert rel_err(back.G_ET, torch.bmm(state["factors"][1], state["factors"][0].transpose(1, 2))) < 1e-13
    with pytest.raises(ValueError, match="factors"):
        st.factors()


def test_unseen_energy_is_the_leave_one_out_energy_per_unseen_direction():
    lin = nn.Linear(40, 3)
    x = torch.randn(15, 40, dtype=F64) * torch.linspace(2, 0.1, 40, dtype=F64)
    st = LayerStatistics(lin, dtype=F64).update(x, x)
    loo = []
    for m in range(15):
        others = torch.cat([x[:m], x[m + 1:]]).t()
        r = x[m] - others @ torch.linalg.lstsq(others, x[m]).solution
        loo.append(float(r @ r))
    nu = sum(loo) / 15 / (40 - 15 + 1)
    expect = 15 * nu / float(torch.diagonal(x.t() @ x).mean())
    assert abs(st.unseen_energy() - expect) < 1e-6 * expect
    st.update(torch.randn(30, 40, dtype=F64), torch.randn(30, 40, dtype=F64))
    assert st.unseen_energy() == 0.0  # the rows span every column


def test_unseen_energy_with_more_rows_than_a_gram_block():
    # K = XᵀX is formed from its upper blocks (statistics.GRAM_BLOCK): several blocks here
    lin = nn.Linear(333, 3)
    x = torch.randn(301, 333, dtype=F64) * torch.linspace(2, 0.1, 333, dtype=F64) + 0.3
    st = LayerStatistics(lin, dtype=F64).update(x[:170], x[:170]).update(x[170:], x[170:])
    loo = 1.0 / torch.diagonal(torch.linalg.inv(x @ x.t()))
    expect = 301 * float(loo.mean()) / (333 - 301 + 1) / float(torch.diagonal(x.t() @ x).mean())
    assert abs(st.unseen_energy() - expect) < 1e-6 * expect


@pytest.mark.parametrize("loss", ["nc", "cross", "soft"])
@pytest.mark.parametrize("fit_bias", [False, True])
def test_lowrank_quadratic_equals_the_dense_one(loss, fit_bias):
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 4, 3, padding=1, groups=2).double()
    h_t = torch.randn(1, 6, 4, 4, dtype=F64)  # 16 rows < 28 columns per group
    h_s = h_t + 0.2 * torch.randn_like(h_t)
    g = LayerGeometry.of(conv)
    st = LayerStatistics(conv, dtype=F64, fit_bias=fit_bias).update(h_t, h_s)
    assert st.representation == "lowrank"
    A = g.weight_matrix(conv.weight.detach(), conv.bias.detach() if fit_bias else None)
    spec = LossSpec(loss, mu=0.3, alpha=0.7, beta=0.4)
    low = Quadratic.from_statistics(st, spec, A, lowrank=True)
    dense = Quadratic.from_statistics(st, spec, A)
    ref = Quadratic.from_statistics(LayerStatistics(conv, dtype=F64, fit_bias=fit_bias, lowrank=False)
                                    .update(h_t, h_s), spec, A)
    assert low.representation == "lowrank" and dense.representation == "gram"
    assert rel_err(dense.H, ref.H) < 1e-12 and rel_err(low.dense().H, ref.H) < 1e-12
    assert rel_err(low.F, ref.F) < 1e-12 and abs(float(low.f0 - ref.f0)) < 1e-10 * max(1, abs(float(ref.f0)))
    W = A + 0.3 * torch.randn_like(A)
    assert abs(float(low.loss(W) - ref.loss(W))) < 1e-12 * float(ref.loss(W))
    assert rel_err(low.grad(W), ref.grad(W)) < 1e-12
    (g_low, v_low), (g_ref, v_ref) = low.step_terms(W - A, 0.7, True), ref.step_terms(W - A, 0.7, True)
    assert rel_err(g_low, 0.7 * (ref.hmul(W - A) + ref.F)) < 1e-12 and rel_err(g_ref, g_low) < 1e-12
    assert abs(float(v_low - v_ref)) < 1e-12 * abs(float(v_ref)) and low.step_terms(W - A, 0.7, False)[1] is None
    assert abs(float(low.scale * (v_low + low.f0) - low.loss(W))) < 1e-12 * float(low.loss(W))
    assert rel_err(low.row_values(W), ref.row_values(W)) < 1e-12
    cols = torch.tensor([0, 2, 3, 5, 8, 9, 13])
    assert rel_err(low.restrict(cols).loss(W[..., cols]), ref.restrict(cols).loss(W[..., cols])) < 1e-12
    codes = torch.randint(-3, 4, W[..., :g.cols].shape)
    s_low, u_low = low.refit_grid(codes, 3, True, torch.ones(2, 2, 1, dtype=F64), W)
    s_ref, u_ref = ref.refit_grid(codes, 3, True, torch.ones(2, 2, 1, dtype=F64), W)
    assert rel_err(s_low, s_ref) < 1e-10 and (not fit_bias or rel_err(u_low, u_ref) < 1e-10)


def test_adam_takes_the_same_steps_on_both_forms():
    torch.manual_seed(2)
    conv = nn.Conv2d(8, 6, 3, padding=1).double()
    h_t = torch.randn(1, 8, 5, 5, dtype=F64)  # 25 rows < 72 columns
    h_s = h_t + 0.2 * torch.randn_like(h_t)
    kw = dict(compression=[ChannelPrune(0.5), Quantize(4)], solver="adam", steps=40, lr=1e-2,
              stats_dtype=F64, log_every=1)
    low = cdfast.distill_layer(conv, h_t, h_s, form="lowrank", **kw)
    gram = cdfast.distill_layer(conv, h_t, h_s, form="gram", **kw)
    assert low.form == "lowrank" and gram.form == "gram"
    assert [s for s, _ in low.history] == [s for s, _ in gram.history]
    for (_, a), (_, b) in zip(low.history, gram.history):
        assert abs(a - b) <= 1e-9 * max(1.0, abs(b))
    assert torch.equal(low.mask, gram.mask) and float((low.weight - gram.weight).abs().max()) < 1e-9
    with pytest.raises(ValueError, match="fewer sampled rows"):
        cdfast.distill_layer(conv, torch.randn(4, 8, 5, 5), torch.randn(4, 8, 5, 5), form="lowrank", solver="adam",
                             steps=2)


def test_cross_loss_with_fewer_rows_than_columns_follows_the_authors_procedure():
    """M = 16 rows < D = 108 columns, the cross loss (two terms on distinct inputs, F = 0):
    the low-rank form takes the authors' steps in float64, and at T = 21 both keep the budget."""
    from authors_reference import authors_channel_prune

    torch.manual_seed(3)
    conv = nn.Conv2d(12, 5, 3, padding=1).double()
    h_t = torch.randn(1, 12, 4, 4, dtype=F64)
    h_s = h_t + 0.3 * torch.randn_like(h_t)
    steps, lr = 21, 1e-2
    w_ref, mask_ref, losses = authors_channel_prune(conv, h_t, h_s, 0.5, steps, lr, 0.6, record=True)
    res = cdfast.distill_layer(conv, h_t, h_s, loss="cross", mu=0.6, compression=ChannelPrune(0.5), solver="adam",
                               steps=steps, lr=lr, stats_dtype=F64, log_every=1)
    assert res.form == "lowrank" and res.kept_channels.numel() == 6 == int(mask_ref[0, :, 0, 0].sum())
    for (step, ours), theirs in zip(res.history, losses):
        assert abs(ours - theirs) <= 1e-9 * max(1.0, abs(theirs)), step
    assert torch.equal(res.mask, mask_ref) and float((res.weight - w_ref).abs().max()) < 1e-10


def test_form_auto_counts_the_work():
    geo = LayerGeometry("conv2d", 512, 512, (3, 3), padding=(1, 1))
    plan = ConstraintPlan(ChannelPrune(0.5), geo, 20, geo.cols, "cpu", torch.float32)
    c = form_costs(plan, 512, 2 * 784)  # ImageNet-style 7×7 maps, 16 samples, the cross loss
    assert c["lowrank"] < c["gram"]
    c = form_costs(plan, 512, 2 * 8000)
    assert c["gram"] < c["lowrank"]
    conv = nn.Conv2d(32, 8, 3, padding=1)
    few = LayerStatistics(conv).update(torch.randn(1, 32, 4, 4), torch.randn(1, 32, 4, 4))
    small = ConstraintPlan(WeightPrune(0.5), LayerGeometry.of(conv), 3000, 288, "cpu", torch.float32)
    assert choose_form(few, LossSpec("cross"), small, 8) == "lowrank"  # 32 rows of 288 columns, two terms
    res = cdfast.distill_layer(conv, torch.randn(1, 32, 4, 4), torch.randn(1, 32, 4, 4),
                               compression=WeightPrune(0.5), steps=5)
    assert res.form == "lowrank" and res.solver == "adam"
    pinned = cdfast.distill_layer(conv, torch.randn(1, 32, 4, 4), torch.randn(1, 32, 4, 4),
                                  compression=WeightPrune(0.5), steps=5, backend="triton", strict=True)
    assert pinned.form == "gram" and pinned.backend == "triton"  # the low-rank form has no Triton engine
    assert exact_fits(LayerGeometry("linear", 4096, 10), 4096) and not exact_fits(LayerGeometry("linear", 25088, 10),
                                                                                  25088)
    wide = nn.Linear(25088, 4)
    res = cdfast.distill_layer(wide, torch.randn(3, 25088), torch.randn(3, 25088),
                               compression=ChannelPrune(0.5), steps=2)
    assert res.solver == "exact" and res.form == "lowrank"  # the exact solver's D×D work would not fit: on the factor
