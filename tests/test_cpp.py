"""The C++ CPU backend (cdfast._cpu via cdfast._backends.cpp) against the torch oracle."""
import math

import pytest
import torch
import torch.nn as nn

import cdfast
from cdfast import constraints as C
from cdfast import dispatch
from cdfast.geometry import LayerGeometry

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
    for op in ("soft_threshold", "group_shrink", "topk_mask", "quantize"):
        name, fn = dispatch.resolve(op, "cpu")
        assert name == "cpp" and fn is getattr(cpp, op)


# ------------------------------------------------------------------ soft_threshold
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1,), (3, 7), (2, 5, 33), (70001,)])
def test_soft_threshold_is_bitwise_the_oracle(dtype, shape):
    w = torch.randn(shape, dtype=dtype)
    w.view(-1)[: min(3, w.numel())] = 0.0
    for t in (0.0, 0.37, 5.0, -0.1):
        assert torch.equal(cpp.soft_threshold(w, t), C.soft_threshold(w, t))


def test_soft_threshold_noncontiguous_and_nan():
    w = torch.randn(6, 10, dtype=torch.float64)[:, ::3]
    assert torch.equal(cpp.soft_threshold(w, 0.2), C.soft_threshold(w, 0.2))
    x = torch.tensor([float("nan"), -0.0, 1.0, -2.0])
    out = cpp.soft_threshold(x, 0.5)
    assert math.isnan(out[0]) and out[1] == 0 and out[2] == 0.5 and out[3] == -1.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_raw_kernels_write_every_element(dtype):
    """Poisoned (NaN / 0x77) output buffers: every element must be written."""
    ext = cpp._ext
    n = 40003
    w = torch.randn(n, dtype=dtype)
    out = torch.full_like(w, float("nan"))
    ext.soft_threshold(w.data_ptr(), out.data_ptr(), n, 0.1, CODE[dtype], 2)
    assert torch.equal(out, C.soft_threshold(w, 0.1))
    mask = torch.full((n,), True)
    ext.topk_mask(w.data_ptr(), mask.data_ptr(), n, 123, CODE[dtype], 2)
    assert int(mask.sum()) == 123
    codes = torch.full((n,), 0x77, dtype=torch.int8)
    vals = torch.full_like(w, float("nan"))
    s = torch.tensor([0.9], dtype=dtype)
    ext.quantize(w.data_ptr(), s.data_ptr(), 0, 1, n, 3, codes.data_ptr(), vals.data_ptr(), CODE[dtype], 2)
    c_ref, v_ref = C.quantize(w, s, 3)
    assert torch.equal(codes, c_ref) and torch.equal(vals, v_ref)
    geo = _geo(7, 5, (3, 3), 1)
    W = _matrix(geo, True, dtype)
    o = torch.full_like(W, float("nan"))
    ext.group_shrink(W.data_ptr(), o.data_ptr(), 1, 5, geo.cols + 1, 7, 9, 0.4, CODE[dtype], 2)
    assert not torch.isnan(o).any()
    torch.testing.assert_close(o, C.group_shrink(W, geo, 0.4))


# ------------------------------------------------------------------ group_shrink
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cin,cout,k,groups,bias", GEOMETRIES)
def test_group_shrink_matches_oracle(dtype, cin, cout, k, groups, bias):
    geo = _geo(cin, cout, k, groups)
    W = _matrix(geo, bias, dtype)
    W[..., : geo.taps] *= 1e-3  # a channel that shrinks to exactly zero
    for t in (0.0, 0.3, 2.5):
        ours, ref = cpp.group_shrink(W, geo, t), C.group_shrink(W, geo, t)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        tol = 1e-6 if dtype == torch.float32 else 1e-14
        torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
        if t > 0:
            assert (ours[..., : geo.taps] == 0).all()
        if bias:
            assert torch.equal(ours[..., -1], W[..., -1])


def test_group_shrink_large_parallel():
    geo = LayerGeometry("conv2d", 64, 96, (3, 3))
    W = torch.randn(1, 96, geo.cols)
    torch.testing.assert_close(cpp.group_shrink(W, geo, 3.0), C.group_shrink(W, geo, 3.0), rtol=1e-6, atol=1e-6)


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
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_quantize_is_bitwise_the_oracle(dtype, bits):
    W = torch.randn(3, 7, 29, dtype=dtype)
    L = 2 ** (bits - 1) - 1
    W[0, 0, :8] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.0, -0.0], dtype=dtype) / L  # halves
    scales = [torch.tensor(1.0, dtype=dtype),                     # per layer, 0-d
              W.abs().amax().reshape(1, 1, 1) * 0.6,               # per layer, (1, 1, 1)
              W.abs().amax(-1, keepdim=True) * 0.7,                # per row
              W.abs() * 0.5 + 0.1,                                 # per element
              0.8]                                                 # a plain number
    for s in scales:
        c1, v1 = cpp.quantize(W, s, bits)
        c2, v2 = C.quantize(W, s, bits)
        assert c1.dtype == torch.int8 and v1.dtype == dtype
        assert torch.equal(c1, c2) and torch.equal(v1, v2)


def test_quantize_round_half_to_even():
    W = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 3.49], dtype=torch.float64)
    codes, _ = cpp.quantize(W, torch.tensor(7.0, dtype=torch.float64), 4)  # L = 7: W/s*L = W
    assert codes.tolist() == [0, 2, 2, 0, -2, 3]


def test_quantize_noncontiguous_weight_columns():
    W = torch.randn(2, 4, 10)
    s = W.abs().amax(-1, keepdim=True)
    c1, v1 = cpp.quantize(W[..., :9], s, 3)
    c2, v2 = C.quantize(W[..., :9], s, 3)
    assert torch.equal(c1, c2) and torch.equal(v1, v2)


# ------------------------------------------------------------------ bad arguments
def test_bad_arguments_raise_naming_the_argument():
    w = torch.randn(4, 5)
    geo = _geo(5, 4, (1, 1), 1)
    with pytest.raises(TypeError, match="w:"):
        cpp.soft_threshold(w.numpy(), 0.1)
    with pytest.raises(TypeError, match="threshold"):
        cpp.soft_threshold(w, "0.1")
    with pytest.raises(ValueError, match="threshold"):
        cpp.soft_threshold(w, float("nan"))
    with pytest.raises(dispatch.Unsupported):
        cpp.soft_threshold(w.half(), 0.1)
    with pytest.raises(dispatch.Unsupported):
        cpp.topk_mask(torch.arange(5), 2)
    with pytest.raises(ValueError, match="W:"):
        cpp.group_shrink(torch.randn(1, 4, 7), geo, 0.1)
    with pytest.raises(ValueError, match="W:"):
        cpp.group_shrink(torch.randn(4, 5), geo, 0.1)
    with pytest.raises(TypeError, match="geometry"):
        cpp.group_shrink(torch.randn(1, 4, 5), "conv", 0.1)
    with pytest.raises(TypeError, match="k:"):
        cpp.topk_mask(w, 2.0)
    with pytest.raises(ValueError, match="k:"):
        cpp.topk_mask(w, 21)
    with pytest.raises(ValueError, match="bits"):
        cpp.quantize(w, torch.tensor(1.0), 9)
    with pytest.raises(TypeError, match="bits"):
        cpp.quantize(w, torch.tensor(1.0), 3.0)
    with pytest.raises(ValueError, match="scale"):
        cpp.quantize(w, torch.ones(3), 3)
    with pytest.raises(dispatch.Unsupported):
        cpp.quantize(w, torch.ones(1, dtype=torch.float64), 3)
    # the raw binding checks its own arguments too
    with pytest.raises(ValueError, match="dtype"):
        cpp._ext.soft_threshold(w.data_ptr(), w.data_ptr(), 20, 0.1, 5, 1)
    with pytest.raises(ValueError, match="null"):
        cpp._ext.soft_threshold(0, w.data_ptr(), 20, 0.1, 0, 1)
    with pytest.raises(ValueError, match="bits"):
        cpp._ext.quantize(w.data_ptr(), w.data_ptr(), 0, 4, 5, 1, w.data_ptr(), w.data_ptr(), 0, 1)
    with pytest.raises(ValueError, match="k"):
        cpp._ext.topk_mask(w.data_ptr(), w.data_ptr(), 20, 21, 0, 1)


def test_dispatch_falls_back_on_unsupported_dtype():
    w = torch.randn(3, 4, dtype=torch.float16)
    name, out = dispatch.call("soft_threshold", "cpu", "cpp", False, w, 0.5)
    assert name == "torch" and torch.equal(out, C.soft_threshold(w, 0.5))


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


# backend="cpp" runs the projection operators in C++; the ops cpp does not have
# (statistics, gram_solve) fall back to torch with a warning.
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
    if not isinstance(compression, cdfast.NMSparsity):  # n:m masks use no dispatched operator
        assert counting.calls > 0
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
@pytest.mark.parametrize("compression", [cdfast.ChannelPrune(0.5), cdfast.GroupLasso(0.5),
                                         cdfast.Quantize(3)], ids=str)
def test_distill_layer_cpp_float32_grouped(compression):
    conv, h_t, h_s = _layer_problem(torch.float32, groups=2)
    kw = dict(loss="nc", compression=compression, steps=20, lr=1e-2)
    a = cdfast.distill_layer(conv, h_t, h_s, backend="cpp", **kw)
    b = cdfast.distill_layer(conv, h_t, h_s, backend="torch", **kw)
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)
    assert abs(a.loss_after - b.loss_after) <= 1e-4 * max(1.0, abs(b.loss_after))
