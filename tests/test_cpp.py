"""The C++ CPU backend (cdfast._cpu via cdfast._backends.cpp): ``topk_mask`` and the exact solver's
column blocks against the torch oracle."""

import pytest
import torch
import torch.nn as nn

import cdfast
from cdfast.layer import constraints as C
from cdfast import dispatch
from cdfast.layer.geometry import LayerGeometry

cpp = pytest.importorskip("cdfast._backends.cpp")
pytestmark = pytest.mark.skipif(cpp._ext is None, reason=f"cdfast._cpu is not built: {cpp._import_error}")

DTYPES = [torch.float32, torch.float64]
CODE = {torch.float32: 0, torch.float64: 1}
# (in, out, kernel, groups, bias column): odd sizes, grouped, 1x1 and linear-like
GEOMETRIES = [(7, 5, (3, 3), 1, False), (6, 9, (1, 2), 3, True), (13, 4, (1, 1), 1, True),
              (12, 8, (3, 1), 4, False)]


def _geo(cin, cout, k, groups):
    return LayerGeometry("conv2d", cin, cout, k, groups=groups)


def _matrix(geo, bias, dtype):
    return torch.randn(geo.groups, geo.group_out, geo.cols + int(bias), dtype=dtype)


def test_backend_is_registered_and_available():
    assert cdfast.backends()["cpp"] == "available"
    assert "cpp" in dispatch.implementations()["topk_mask"]
    name, fn = dispatch.resolve("topk_mask", "cpu")
    assert name == "cpp" and fn is cpp.topk_mask
    for op in ("soft_threshold", "group_shrink", "quantize"):  # no measurable gain: torch runs them
        assert dispatch.resolve(op, "cpu")[0] == "torch"


@pytest.mark.parametrize("dtype", DTYPES)
def test_raw_kernel_writes_every_element(dtype):
    """A poisoned (all True) output buffer: every element must be written."""
    n = 40003
    w = torch.randn(n, dtype=dtype)
    mask = torch.full((n,), True)
    cpp._ext.topk_mask(w.data_ptr(), mask.data_ptr(), n, 123, CODE[dtype], 2)
    assert int(mask.sum()) == 123
    assert torch.equal(mask, C.topk_mask(w, 123))



# ------------------------------------------------------------------ topk_mask
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 2, 17, 1000, 100003])
def test_topk_mask_matches_oracle(dtype, n):
    s = torch.randn(n, dtype=dtype)
    for k in sorted({0, 1, n // 3, n - 1, n}):
        ours, ref = cpp.topk_mask(s, k), C.topk_mask(s, k)
        assert ours.dtype == torch.bool and ours.shape == s.shape
        assert torch.equal(ours, ref), (n, k)  # distinct values: one answer


@pytest.mark.parametrize("dtype", DTYPES)
def test_topk_mask_ties_nan_and_shape(dtype):
    s = torch.tensor([[1.0, 3.0, 3.0, 2.0], [3.0, 0.0, -0.0, float("nan")]], dtype=dtype)
    m = cpp.topk_mask(s, 3)
    assert m.shape == s.shape
    # NaN is the largest (as torch.topk), then the lowest-index 3.0
    assert m.tolist() == [[False, True, True, False], [False, False, False, True]]
    zeros = torch.zeros(50, dtype=dtype)
    m = cpp.topk_mask(zeros, 20)
    assert m[:20].all() and not m[20:].any()  # ties by lowest index
    # many ties across the threads' chunks
    s = torch.randint(0, 4, (200001,)).to(dtype)
    m = cpp.topk_mask(s, 77777)
    assert int(m.sum()) == 77777 and s[m].min() >= s[~m].max()


def test_topk_mask_on_abs_weights_like_the_plan():
    W = torch.randn(2, 5, 28)
    scores = W[..., :27].abs()  # non-contiguous, as ConstraintPlan passes it
    assert torch.equal(cpp.topk_mask(scores, 100), C.topk_mask(scores, 100))


# ------------------------------------------------------------------ quantize
# ------------------------------------------------------------------ bad arguments
def test_bad_arguments_raise_naming_the_argument():
    w = torch.randn(4, 5)
    with pytest.raises(TypeError, match="scores:"):
        cpp.topk_mask(w.numpy(), 2)
    with pytest.raises(dispatch.Unsupported):
        cpp.topk_mask(torch.arange(5), 2)
    with pytest.raises(dispatch.Unsupported):
        cpp.topk_mask(w.half(), 2)
    with pytest.raises(TypeError, match="k:"):
        cpp.topk_mask(w, 2.0)
    with pytest.raises(ValueError, match="k:"):
        cpp.topk_mask(w, 21)
    # the raw binding checks its own arguments too
    with pytest.raises(ValueError, match="dtype"):
        cpp._ext.topk_mask(w.data_ptr(), w.data_ptr(), 20, 2, 5, 1)
    with pytest.raises(ValueError, match="null"):
        cpp._ext.topk_mask(0, w.data_ptr(), 20, 2, 0, 1)
    with pytest.raises(ValueError, match="k"):
        cpp._ext.topk_mask(w.data_ptr(), w.data_ptr(), 20, 21, 0, 1)


def test_dispatch_falls_back_on_unsupported_dtype():
    w = torch.randn(3, 4, dtype=torch.float16)
    name, out = dispatch.call("topk_mask", "cpu", "cpp", False, w, 5)
    assert name == "torch" and torch.equal(out, C.topk_mask(w, 5))


# ------------------------------------------------------------------ whole layers
def _layer_problem(dtype=torch.float64, groups=1):
    conv = nn.Conv2d(8, 6, 3, padding=1, groups=groups).to(dtype)
    h_t = torch.randn(4, 8, 7, 6, dtype=dtype)
    return conv, h_t, h_t + 0.3 * torch.randn_like(h_t)


COMPRESSIONS = [
    cdfast.ChannelPrune(0.5),
    cdfast.WeightPrune(0.3),
    cdfast.NMSparsity(2, 4),
    cdfast.GroupLasso(0.5),
    cdfast.L1(0.05),
    cdfast.Quantize(3),
    cdfast.Quantize(4, per_channel=False),
    [cdfast.ChannelPrune(0.5), cdfast.Quantize(4), cdfast.L1(0.01)],
    [cdfast.WeightPrune(0.4), cdfast.GroupLasso(0.2)],
]


class _Counting:
    """Wraps cdfast._cpu and counts the kernel calls (the plan must really use them)."""

    def __init__(self, ext):
        self.ext, self.calls = ext, 0

    def __getattr__(self, name):
        fn = getattr(self.ext, name)

        def wrapped(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)
        return wrapped


# backend="cpp" runs the budget selection in C++; the ops cpp does not have
# fall back to torch with a warning.
@pytest.mark.filterwarnings("ignore:cdfast. backend 'cpp' cannot run")
@pytest.mark.parametrize("compression", COMPRESSIONS, ids=str)
@pytest.mark.parametrize("solver", ["adam", "sgd"])
def test_distill_layer_cpp_equals_torch(compression, solver, monkeypatch):
    conv, h_t, h_s = _layer_problem()
    kw = dict(loss="nc", compression=compression, solver=solver, steps=24, lr=1e-2,
              stats_dtype=torch.float64, log_every=1)
    counting = _Counting(cpp._ext)
    monkeypatch.setattr(cpp, "_ext", counting)
    a = cdfast.distill_layer(conv, h_t, h_s, backend="cpp", **kw)
    monkeypatch.setattr(cpp, "_ext", counting.ext)
    selects = any(isinstance(c, (cdfast.ChannelPrune, cdfast.WeightPrune))
                  for c in (compression if isinstance(compression, list) else [compression]))
    assert (counting.calls > 0) == selects  # budgets select with the kernel; nothing else calls it
    b = cdfast.distill_layer(conv, h_t, h_s, backend="torch", **kw)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-9, atol=1e-12)
    if a.codes is not None:
        assert torch.equal(a.codes, b.codes)
        torch.testing.assert_close(a.scale, b.scale, rtol=1e-9, atol=1e-12)
    assert [s for s, _ in a.history] == [s for s, _ in b.history]
    for (_, x), (_, y) in zip(a.history, b.history):
        assert abs(x - y) <= 1e-9 * max(1.0, abs(y))


@pytest.mark.filterwarnings("ignore:cdfast. backend 'cpp' cannot run")
@pytest.mark.parametrize("compression", [cdfast.ChannelPrune(0.5), cdfast.WeightPrune(0.4)], ids=str)
def test_distill_layer_cpp_float32_grouped(compression):
    conv, h_t, h_s = _layer_problem(torch.float32, groups=2)
    kw = dict(loss="nc", compression=compression, solver="adam", steps=20, lr=1e-2)
    a = cdfast.distill_layer(conv, h_t, h_s, backend="cpp", **kw)
    b = cdfast.distill_layer(conv, h_t, h_s, backend="torch", **kw)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)
    assert abs(a.loss_after - b.loss_after) <= 1e-4 * max(1.0, abs(b.loss_after))


# ------------------------------------------------------------- the column blocks
from cdfast.layer.solvers import sweep as S  # noqa: E402


def _block_problem(G, n, R, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    D = n + 7  # the block is a slice of a larger matrix, as in a sweep
    X = torch.randn(G, D, 3 * D, generator=g, dtype=torch.float64)
    H = (X @ X.transpose(1, 2) + torch.eye(D, dtype=torch.float64)).to(dtype)
    U = S.reverse_cholesky(H)
    V = U / torch.diagonal(U, dim1=-2, dim2=-1)[:, None, :]
    W = torch.randn(G, D, R, generator=g, dtype=torch.float64).to(dtype)
    T = W + 0.1 * torch.randn(G, D, R, generator=g, dtype=torch.float64).to(dtype)
    mask = (torch.rand(G, D, R, generator=g) > 0.4).to(dtype)
    scale = (T.abs().amax(1) * 0.7).contiguous()
    return H, U, V, W, T, mask, 3.0 / scale, scale / 3.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mask", "grid", "grid+mask", "nm", "nm+grid"])
@pytest.mark.parametrize("G,R", [(1, 37), (3, 300)])
def test_sweep_block_matches_torch(dtype, kind, G, R):
    n, s0 = 12, 4
    H, U, V, W, T, mask, inv, step = _block_problem(G, n, R, dtype, 1)
    sl = slice(s0, s0 + n)
    nm = (4, 2, U[:, sl, sl], torch.diagonal(U, dim1=-2, dim2=-1).pow(2)[:, sl], 10) if "nm" in kind else None
    grid = 9 if "grid" in kind else 0
    outs = []
    for fn in (S.sweep_block, cpp.sweep_block):
        Wb, Mb = W.clone(), mask.clone()
        Db = torch.full_like(W, float("nan"))  # every element must be written
        Yb = torch.full_like(W, float("nan"))
        fn(Wb[:, sl], T[:, sl], V[:, sl, sl], Db[:, sl], Yb[:, sl], Mb[:, sl] if kind != "grid" else None,
           inv if grid else None, step if grid else None, 3.0, grid, nm)
        outs.append((Wb, Db[:, sl], Yb[:, sl], Mb))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, **tol)
    assert torch.equal(outs[0][0][:, :s0], W[:, :s0]) and torch.equal(outs[1][0][:, s0 + n:], W[:, s0 + n:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["mask", "grid", "grid+mask"])
def test_coordinate_block_matches_torch(dtype, kind):
    G, n, R, s0 = 2, 11, 70, 3
    H, U, V, W, T, mask, inv, step = _block_problem(G, n, R, dtype, 2)
    sl = slice(s0, s0 + n)
    g0 = torch.bmm(H, W - T)[:, sl].contiguous()
    neg_inv = (-1.0 / torch.diagonal(H, dim1=-2, dim2=-1)).contiguous()
    grid = 8 if "grid" in kind else 0
    outs = []
    for fn in (S.coordinate_block, cpp.coordinate_block):
        Wb, gb = W.clone(), g0.clone()
        Db = torch.full((G, n, R), float("nan"), dtype=dtype)
        fn(Wb[:, sl], gb, H[:, sl, sl], neg_inv[:, sl], Db, mask[:, sl] if "mask" in kind else None,
           inv if grid else None, step if grid else None, 3.0, grid)
        outs.append((Wb, gb[:, -1], Db))  # the last column's gradient saw every earlier change
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, **tol)


@pytest.mark.parametrize("comp", [cdfast.WeightPrune(0.4), cdfast.NMSparsity(2, 4), cdfast.Quantize(3),
                                  [cdfast.ChannelPrune(0.5), cdfast.Quantize(4)]], ids=str)
def test_exact_solver_is_the_same_on_cpp_and_torch(comp):
    assert dispatch.resolve("sweep_block", "cpu")[0] == "cpp"
    torch.manual_seed(3)
    conv = nn.Conv2d(16, 10, 3, padding=1, groups=2).double()
    h = torch.randn(4, 16, 7, 7, dtype=torch.float64)
    h_s = h + 0.2 * torch.randn_like(h)
    kw = dict(compression=comp, solver="exact", stats_dtype=torch.float64, fit_bias=True)  # a free last column
    a = cdfast.distill_layer(conv, h, h_s, backend="torch", **kw)
    b = cdfast.distill_layer(conv, h, h_s, backend="cpp", **kw)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(b.weight, a.weight, rtol=1e-9, atol=1e-12)
