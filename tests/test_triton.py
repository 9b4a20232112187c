"""The Triton backend against the torch path and a float64 reference.

Without a GPU the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
set here before triton is imported); with one they run on it. Every kernel test
uses fresh random inputs, sizes that are not multiples of the tiles, strided /
padded / dilated / grouped convolutions, and outputs poisoned with NaN (int8
outputs with −128) so that an element a kernel forgets to write fails the test.

Error-ratio rule (as FlashAttention's tests): the kernel's error against a
float64 computation is at most twice the float32 torch path's error against it,
plus a floor of a few float32 ulps of the result's magnitude.
"""
from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed: the Triton backend cannot be tested")

import cdfast  # noqa: E402
from cdfast import ChannelPrune, GroupLasso, L1, NMSparsity, Quantize, WeightPrune, dispatch  # noqa: E402
from cdfast.layer import constraints as C  # noqa: E402
from cdfast._backends import reference as ref  # noqa: E402
from cdfast._backends import triton as tb  # noqa: E402
from cdfast.layer.plan import ConstraintPlan  # noqa: E402
from cdfast.layer.geometry import LayerGeometry  # noqa: E402
from cdfast.layer.losses import LOSSES, ActivationSpec, LossSpec, Quadratic  # noqa: E402
from cdfast.layer.solvers import SolverConfig  # noqa: E402
from cdfast.layer.statistics import ERROR_BASIS  # noqa: E402
from helpers import PRUNE_AND_QUANTIZE, prune_quantize_ratio  # noqa: E402

if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1", allow_module_level=True)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(autouse=True)
def poisoned(monkeypatch):
    """Every kernel output starts as NaN (float) or −128 (int8)."""
    def empty(*shape, dtype=torch.float32, device=None):
        t = torch.empty(*shape, dtype=dtype, device=device)
        return t.fill_(float("nan") if dtype.is_floating_point else -128)

    monkeypatch.setattr(tb, "_empty", empty)


def _seed(n: int) -> None:
    torch.manual_seed(n)


def assert_ratio(kernel: torch.Tensor, torch32: torch.Tensor, ref64: torch.Tensor, floor_ulps: float = 8.0):
    """``|kernel − ref64| ≤ 2·|torch32 − ref64| + floor`` in max norm, everything finite."""
    assert torch.isfinite(kernel).all(), "the kernel left unwritten (NaN) or non-finite elements"
    ref64 = ref64.double().cpu()
    err_k = (kernel.double().cpu() - ref64).abs().max().item()
    err_t = (torch32.double().cpu() - ref64).abs().max().item()
    floor = floor_ulps * EPS32 * max(ref64.abs().max().item(), 1e-30)
    assert err_k <= 2 * err_t + floor, f"kernel error {err_k:.3e} > 2 × torch error {err_t:.3e} + {floor:.1e}"


def assert_close_or_ratio(kernel, torch32, ref64_fn, rtol=1e-5):
    """Iterates of a solver: equal to the torch path's to ``rtol``, or else (Adam turns
    rounding differences of near-zero gradients into visible ones) no further from
    the float64 run than twice the torch path is."""
    scale = torch32.abs().max().item()
    if torch.allclose(kernel.double(), torch32.double(), rtol=rtol, atol=rtol * scale):
        return
    assert_ratio(kernel, torch32, ref64_fn())


def test_probe_and_registration():
    assert dispatch.unavailable_reason("triton") is None
    for op in ("statistics", "data_targets", "data_loss_grad", "gram_solve", "soft_threshold",
               "group_shrink", "topk_mask", "quantize"):
        assert dispatch.resolve(op, DEV, "triton", strict=True)[0] == "triton"


# ------------------------------------------------------------------ statistics
STAT_CASES = [
    # geometry, input shape, fit_bias, mix, forced split, input dtype
    (LayerGeometry("conv2d", 6, 8, (3, 3), (2, 1), (1, 2), (1, 2), 2), (3, 6, 9, 11), False, ERROR_BASIS,
     None, torch.float32),
    (LayerGeometry("conv2d", 9, 5, (3, 3), (1, 1), (1, 1), (1, 1), 1, True), (2, 9, 7, 5), True,
     (0.3, 0.7, 0.6, -0.4), 3, torch.float32),
    (LayerGeometry("linear", 37, 5, has_bias=True), (2, 3, 37), True, ERROR_BASIS, None, torch.float32),
    (LayerGeometry("conv2d", 5, 4, (1, 2), (2, 2), (0, 1), (1, 1), 1), (2, 5, 6, 7), False, ERROR_BASIS,
     None, torch.float16),
]


@pytest.mark.parametrize("case", range(len(STAT_CASES)))
def test_statistics_kernel(case):
    geo, shape, fit_bias, mix, split, dtype = STAT_CASES[case]
    _seed(100 + case)
    ht = torch.randn(shape, device=DEV)
    hs = (ht + 0.1 * torch.randn_like(ht)).to(dtype)
    ht = ht.to(dtype)
    out = tb.statistics(ht, hs, geo, fit_bias, torch.float32, mix, split=split)
    t32 = ref.statistics(ht, hs, geo, fit_bias, torch.float32, mix)
    r64 = ref.statistics(ht.double(), hs.double(), geo, fit_bias, torch.float64, mix)
    assert out.shape == t32.shape and out.dtype == torch.float32
    for p in range(3):
        assert_ratio(out[p], t32[p], r64[p])


def test_statistics_float64_is_unsupported():
    geo = LayerGeometry("linear", 7, 3)
    h = torch.randn(5, 7, device=DEV)
    with pytest.raises(dispatch.Unsupported):
        tb.statistics(h, h, geo, False, torch.float64, ERROR_BASIS)
    name, out = dispatch.call("statistics", DEV, "triton", False, h, h, geo, False, torch.float64, ERROR_BASIS)
    assert name == "torch" and out.dtype == torch.float64
    with pytest.raises(dispatch.BackendUnavailable):
        dispatch.call("statistics", DEV, "triton", True, h, h, geo, False, torch.float64, ERROR_BASIS)


def test_layer_statistics_on_triton():
    conv = torch.nn.Conv2d(4, 6, 3, padding=1).to(DEV)
    _seed(7)
    st = cdfast.LayerStatistics(conv, backend="triton")
    ss = cdfast.LayerStatistics(conv, backend="torch")
    for _ in range(2):
        ht = torch.randn(2, 4, 5, 6, device=DEV)
        hs = ht + 0.05 * torch.randn_like(ht)
        st.update(ht, hs)
        ss.update(ht, hs)
    assert st.backend_used == "triton" and st.rows == ss.rows
    torch.testing.assert_close(st.G_SS, ss.G_SS, rtol=1e-5, atol=1e-4)


# ------------------------------------------------------------------ data form
DATA_CASES = [
    # geometry, input shape, loss, objective, fit the bias
    (LayerGeometry("conv2d", 6, 10, (3, 3), (2, 1), (1, 2), (1, 2), 2, True), (2, 6, 9, 8), "cross",
     "activation", False),
    (LayerGeometry("conv2d", 5, 37, (3, 2), (1, 2), (1, 0), (2, 1), 1, True), (2, 5, 8, 9), "soft",
     "linear", True),
    (LayerGeometry("linear", 37, 5, has_bias=True), (13, 37), "nc", "activation", True),
    (LayerGeometry("conv2d", 4, 7, (1, 1), (1, 1), (0, 0), (1, 1), 1), (3, 4, 5, 5), "imitation",
     "activation", False),
]


def _layer_weights(geo: LayerGeometry, seed: int):
    _seed(seed)
    shape = (geo.out_channels, geo.in_channels) if geo.kind == "linear" else \
        (geo.out_channels, geo.group_in, *geo.kernel_size)
    A = torch.randn(shape, device=DEV) / geo.cols ** 0.5
    Ab = 0.1 * torch.randn(geo.out_channels, device=DEV) if geo.has_bias else None
    return A, Ab


@pytest.mark.parametrize("case", range(len(DATA_CASES)))
def test_data_form_kernels(case):
    geo, shape, loss, objective, fit = DATA_CASES[case]
    A, Ab = _layer_weights(geo, 200 + case)
    ht = torch.randn(shape, device=DEV)
    hs = ht + 0.2 * torch.randn_like(ht)
    act = ActivationSpec(torch.rand(geo.out_channels, device=DEV) + 0.5,
                         0.1 * torch.randn(geo.out_channels, device=DEV)) if objective == "activation" else None
    spec = LossSpec(loss, 0.6, 0.3, 0.8, objective, act)
    Am = geo.weight_matrix(A, Ab if fit else None)
    bias = None if fit else Ab
    W = Am + 0.05 * torch.randn_like(Am)

    def as64(t):
        return None if t is None else t.double()

    # teacher outputs
    y_k = tb.data_targets(Am, ht, hs, geo, spec, bias)
    y_t = ref.data_targets(Am, ht, hs, geo, spec, bias)
    y_r = ref.data_targets(Am.double(), ht.double(), hs.double(), geo, spec, as64(bias))
    assert y_k.shape == y_t.shape
    assert_ratio(y_k, y_t, y_r)
    # loss and gradient (weight gradient reduction split in 2 to test the partial sums)
    l_k, g_k = tb.data_loss_grad(W, ht, hs, y_t, geo, spec, bias, split=2)
    l_t, g_t = ref.data_loss_grad(W, ht, hs, y_t, geo, spec, bias)
    l_r, g_r = ref.data_loss_grad(W.double(), ht.double(), hs.double(), y_t.double(), geo, spec,
                                  as64(bias))
    assert g_k.shape == W.shape
    assert_ratio(l_k, l_t, l_r)
    assert_ratio(g_k, g_t, g_r)
    l_k2, none = tb.data_loss_grad(W, ht, hs, y_t, geo, spec, bias, need_grad=False)
    assert none is None and torch.equal(l_k2, l_k)


def test_data_form_zero_residual_at_the_teacher():
    """Same weights on the same input: the kernel's student and teacher outputs agree
    bit for bit, so the loss and the gradient are exactly zero (Adam would otherwise
    amplify rounding noise into full-size steps)."""
    geo = LayerGeometry("conv2d", 5, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1, True)
    A, Ab = _layer_weights(geo, 300)
    ht = torch.randn(2, 5, 6, 7, device=DEV)
    hs = ht + 0.2 * torch.randn_like(ht)
    for fit in (False, True):
        spec = LossSpec("cross", 0.6, objective="activation")
        Am = geo.weight_matrix(A, Ab if fit else None)
        bias = None if fit else Ab
        y = tb.data_targets(Am, ht, hs, geo, spec, bias)
        loss, grad = tb.data_loss_grad(Am, ht, hs, y, geo, spec, bias)
        assert loss.item() == 0.0 and not grad.any()


# ----------------------------------------------------------- projection operators
def test_quantize_is_bitwise_torch():
    _seed(400)
    W = torch.randn(3, 7, 29, device=DEV)
    scale = W.abs().amax(-1, keepdim=True) * 0.8
    L = 3
    # exact ties: half-way between grid points, rounded to even like torch.round
    W[0, 0, :10] = (torch.arange(10, device=DEV) - 4.5) * (scale[0, 0] / L)
    def same_values(vals, v_t):
        if DEV.type == "cuda":  # torch divides by the scalar L as a multiply by 1/L there
            torch.testing.assert_close(vals, v_t, rtol=EPS32, atol=0)
        else:
            assert torch.equal(vals, v_t)

    for s in (scale, scale[:1, :1]):
        codes, vals = tb.quantize(W, s, 3)
        c_t, v_t = C.quantize(W, s, 3)
        assert codes.dtype == torch.int8 and torch.equal(codes, c_t.to(torch.int8))
        same_values(vals, v_t)
    codes, vals = tb.quantize(W[..., :17], scale, 4)  # a non-contiguous view
    c_t, v_t = C.quantize(W[..., :17], scale, 4)
    assert torch.equal(codes, c_t)
    same_values(vals, v_t)


def test_soft_threshold_and_group_shrink():
    _seed(401)
    geo = LayerGeometry("conv2d", 6, 4, (3, 3), groups=2)
    W = torch.randn(2, 2, geo.cols + 1, device=DEV)  # with a bias column
    W[0, :, 9:18] *= 0.01  # a channel the group lasso removes entirely
    out = tb.soft_threshold(W[..., :geo.cols], 0.3)
    assert torch.equal(out, C.soft_threshold(W[..., :geo.cols], 0.3))
    gs = tb.group_shrink(W, geo, 0.5)
    assert_ratio(gs, C.group_shrink(W, geo, 0.5), C.group_shrink(W.double(), geo, 0.5))
    assert torch.equal(gs[..., -1], W[..., -1]) and not gs[0, :, 9:18].any()


# ------------------------------------------------------------ Gram-form solver
def _quadratic(geo: LayerGeometry, fit_bias: bool, seed: int, loss: str = "cross"):
    A, Ab = _layer_weights(geo, seed)
    shape = (3, geo.in_channels, 6, 6) if geo.kind == "conv2d" else (24, geo.in_channels)
    ht = torch.randn(shape, device=DEV)
    hs = ht + 0.3 * torch.randn_like(ht)
    stats = cdfast.LayerStatistics(geo, fit_bias=fit_bias, backend="torch").update(ht, hs)
    anchor = geo.weight_matrix(A, Ab if fit_bias else None)
    if fit_bias and Ab is None:
        anchor = torch.cat([anchor, torch.zeros_like(anchor[..., :1])], -1)
    return Quadratic.from_statistics(stats, LossSpec(loss), anchor)


GEO = LayerGeometry("conv2d", 8, 10, (3, 3), padding=(1, 1), has_bias=True)
GEO_G = LayerGeometry("conv2d", 8, 6, (3, 3), padding=(1, 1), groups=2)
SOLVE_CASES = [
    # compression, solver, geometry, fit_bias
    (None, "adam", GEO, False),
    (ChannelPrune(0.5), "adam", GEO, False),
    (ChannelPrune(0.5), "sgd", GEO_G, False),
    (WeightPrune(0.3), "adam", GEO, True),
    (NMSparsity(2, 4), "adam", GEO, False),
    (GroupLasso(0.05), "adam", GEO_G, False),
    (L1(0.02), "sgd", GEO, True),
    ([L1(0.01), GroupLasso(0.05)], "adam", GEO, False),
    ([ChannelPrune(0.5), GroupLasso(0.02), L1(0.01)], "adam", GEO, False),
    (Quantize(3), "adam", GEO, True),
    ([ChannelPrune(0.5), Quantize(4, per_channel=False)], "adam", GEO, False),
    ([WeightPrune(0.5), Quantize(2)], "sgd", GEO_G, False),
]


def _solve(backend_fn, quad, comp, geo, solver, steps, lr=1e-2):
    dtype = quad.H.dtype
    plan = ConstraintPlan(comp, geo, steps, quad.anchor.shape[-1], DEV, dtype, "torch")
    cfg = SolverConfig(solver=solver, steps=steps, lr=lr, log_every=5)
    W, hist = backend_fn(quad, plan, cfg)
    return W, hist, plan


def _quad64(quad):
    return Quadratic(quad.H.double(), quad.F.double(), quad.anchor.double(), quad.f0.double(), quad.scale)


def _assert_same_solve(a, b, ref64=None):
    """``b`` (Triton) against ``a`` (torch): masks, history steps and grid codes equal;
    weights, scales and losses close (or within the error ratio of ``ref64()``)."""
    (W0, h0, p0), (W1, h1, p1) = a, b
    assert torch.isfinite(W1).all()
    assert torch.equal(p1.mask, p0.mask)
    assert [s for s, _ in h1] == [s for s, _ in h0] and all(isinstance(v, float) for _, v in h1)
    v0 = torch.tensor([v for _, v in h0], dtype=torch.float64)
    v1 = torch.tensor([v for _, v in h1], dtype=torch.float64)
    run64 = None

    def r64():
        nonlocal run64
        if run64 is None:
            run64 = ref64()
        return run64

    assert_close_or_ratio(W1, W0, lambda: r64()[0])
    assert_close_or_ratio(v1, v0, lambda: torch.tensor([v for _, v in r64()[1]], dtype=torch.float64),
                          rtol=1e-4)
    if p0.scale is not None:
        assert_close_or_ratio(p1.scale, p0.scale, lambda: r64()[2].scale)


@pytest.mark.parametrize("case", range(len(SOLVE_CASES)))
def test_gram_solve_matches_torch(case):
    comp, solver, geo, fit_bias = SOLVE_CASES[case]
    quad = _quadratic(geo, fit_bias, 500 + case)
    steps = 15
    a = _solve(ref.gram_iterative, quad, comp, geo, solver, steps)
    b = _solve(tb.gram_solve, quad, comp, geo, solver, steps)
    _assert_same_solve(a, b, lambda: _solve(ref.gram_iterative, _quad64(quad), comp, geo, solver, steps))


@pytest.mark.parametrize("comp", [None, [GroupLasso(0.05), L1(0.01)], ChannelPrune(0.5)],
                         ids=["none", "penalties", "channel"])
def test_gram_solve_graph_segments(monkeypatch, comp):
    """The steady phase as on CUDA (captured runs of steps, per-step scalars through the
    device counter, losses read back afterwards), with the launches replayed eagerly."""
    monkeypatch.setattr(tb, "_EMULATE_GRAPHS", True)
    monkeypatch.setattr(tb, "_GRAPH_STEPS", 8)  # shorter runs of steps, same logic
    geo = LayerGeometry("conv2d", 4, 6, (3, 3), padding=(1, 1))
    quad = _quadratic(geo, False, 600)
    steps = 3 * tb._GRAPH_STEPS + 9
    a = _solve(ref.gram_iterative, quad, comp, geo, "adam", steps)
    b = _solve(tb.gram_solve, quad, comp, geo, "adam", steps)
    _assert_same_solve(a, b, lambda: _solve(ref.gram_iterative, _quad64(quad), comp, geo, "adam", steps))


def test_gram_solve_float64_falls_back():
    quad = _quadratic(GEO, False, 700)
    quad = Quadratic(quad.H.double(), quad.F.double(), quad.anchor.double(), quad.f0.double(), quad.scale)
    plan = ConstraintPlan(None, GEO, 3, quad.anchor.shape[-1], DEV, torch.float64, "torch")
    with pytest.raises(dispatch.Unsupported):
        tb.gram_solve(quad, plan, SolverConfig(steps=3))
    name, (W, _) = dispatch.call("gram_solve", DEV, "triton", False, quad, plan, SolverConfig(steps=3))
    assert name == "torch" and W.dtype == torch.float64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs_match_eager(monkeypatch):
    quad = _quadratic(GEO, False, 800)
    steps = 4 * tb._GRAPH_STEPS + 7
    for comp in (None, [GroupLasso(0.05), L1(0.01)], ChannelPrune(0.5)):
        a = _solve(ref.gram_iterative, quad, comp, GEO, "adam", steps)
        b = _solve(tb.gram_solve, quad, comp, GEO, "adam", steps)
        monkeypatch.setenv("CDFAST_CUDA_GRAPHS", "0")
        c = _solve(tb.gram_solve, quad, comp, GEO, "adam", steps)
        monkeypatch.delenv("CDFAST_CUDA_GRAPHS")
        r64 = lambda: _solve(ref.gram_iterative, _quad64(quad), comp, GEO, "adam", steps)  # noqa: E731
        _assert_same_solve(a, b, r64)
        _assert_same_solve(a, c, r64)


# ------------------------------------------------------------ end to end
_KINDS = [None, ChannelPrune(0.5), WeightPrune(0.4), NMSparsity(2, 4), GroupLasso(0.05), L1(0.01),
          Quantize(3)]
E2E = [(loss, objective, _KINDS[(2 * i + j) % len(_KINDS)])
       for i, loss in enumerate(LOSSES) for j, objective in enumerate(("linear", "activation"))]
E2E += [("cross", "linear", k) for k in (WeightPrune(0.4), GroupLasso(0.05), [ChannelPrune(0.5), Quantize(4)])]


@pytest.mark.parametrize("loss,objective,comp", E2E,
                         ids=[f"{lo}-{ob}-{type(c).__name__ if not isinstance(c, list) else 'combo'}"
                              for lo, ob, c in E2E])
def test_distill_layer_triton_equals_torch(loss, objective, comp):
    _seed(900 + LOSSES.index(loss))
    conv = torch.nn.Conv2d(8, 6, 3, padding=1, bias=True).to(DEV)
    bn = torch.nn.BatchNorm2d(6).to(DEV).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    ht = torch.randn(2, 8, 5, 5, device=DEV)
    hs = ht + 0.2 * torch.randn_like(ht)
    # the Gram form, where the Triton engine runs (50 rows for 73 columns: form="auto" would
    # choose the low-rank form, torch products, on the torch backend)
    kw = dict(loss=loss, objective=objective, compression=comp, solver="adam", lr=1e-2, log_every=2,
              form="gram" if objective == "linear" else "auto",
              activation=bn if objective == "activation" else None,
              steps=12 if objective == "linear" else 6)
    _assert_same_result(conv, ht, hs, kw)


def _assert_same_result(layer, ht, hs, kw):
    """distill_layer on Triton against torch (and, where they differ, a float64 run)."""
    r0 = cdfast.distill_layer(layer, ht, hs, backend="torch", **kw)
    r1 = cdfast.distill_layer(layer, ht, hs, backend="triton", strict=True, **kw)
    assert r1.backend == "triton" and r1.form == r0.form
    assert torch.equal(r1.mask, r0.mask)
    assert [s for s, _ in r1.history] == [s for s, _ in r0.history]
    if r0.codes is not None:
        assert torch.equal(r1.codes, r0.codes)
    run64 = []

    def r64():
        if not run64:
            run64.append(cdfast.distill_layer(layer, ht, hs, backend="torch", stats_dtype=torch.float64, **kw))
        return run64[0]

    assert_close_or_ratio(r1.weight, r0.weight, lambda: r64().weight)
    if r0.bias is not None:
        assert_close_or_ratio(r1.bias, r0.bias, lambda: r64().bias)
    if r0.scale is not None:
        assert_close_or_ratio(r1.scale, r0.scale, lambda: r64().scale)
    losses = lambda r: torch.tensor([r.loss_after, r.loss_before, *(v for _, v in r.history)],  # noqa: E731
                                    dtype=torch.float64)
    assert_close_or_ratio(losses(r1), losses(r0), lambda: losses(r64()), rtol=1e-4)


def test_distill_layer_fit_bias():
    _seed(950)
    lin = torch.nn.Linear(19, 7).to(DEV)
    ht = torch.randn(11, 19, device=DEV)
    hs = ht + 0.2 * torch.randn_like(ht)
    # ``nc``: the loss is not zero at the teacher, where the torch path's fitted-bias
    # student and teacher products differ by rounding (and Adam would follow the noise)
    kw = dict(form="data", loss="nc", fit_bias=True, compression=ChannelPrune(0.6), steps=6, lr=1e-2)
    _assert_same_result(lin, ht, hs, kw)
    kw = dict(fit_bias=True, compression=[L1(0.01), Quantize(3)], solver="adam", steps=12, lr=1e-2)
    _assert_same_result(lin, ht, hs, kw)


@pytest.mark.parametrize("compression", PRUNE_AND_QUANTIZE, ids=str)
def test_prune_and_quantize_ends_clearly_below_naive(compression):
    """The Triton engine shares the loop's best-iterate rule (final-mask iterates only)."""
    assert prune_quantize_ratio(tb.gram_solve, compression, steps=120) < 0.3
