"""The loss family: Gram form = data form = the SPEC formula, for every loss."""
import pytest
import torch
import torch.nn as nn
from hypothesis import assume, given, settings, strategies as st

import cdfast
from cdfast.layer.geometry import LayerGeometry
from cdfast.layer.losses import LOSSES, LossSpec, Quadratic
from conftest import rel_err

PARAMS = dict(mu=0.3, alpha=0.7, beta=0.2)


def spec_formula(name, layer, W, h_t, h_s, mu=0.3, alpha=0.7, beta=0.2, sigma=lambda y: y):
    """SPEC §2 written out literally with the layer's own forward."""
    g = LayerGeometry.of(layer)
    A, b = layer.weight, layer.bias
    T = lambda x: sigma(g.apply(x, A, b))   # teacher layer
    S = lambda x: sigma(g.apply(x, W, b))   # student layer
    mse = lambda u, v: (u - v).pow(2).sum() / u.numel()
    if name == "nc":
        return mse(T(h_t), S(h_s))
    if name == "correction":
        return mse(T(h_t), S(h_t))
    if name == "imitation":
        return mse(T(h_s), S(h_s))
    if name == "cross":
        return mu * mse(T(h_t), S(h_t)) + (1 - mu) * mse(T(h_s), S(h_s))
    ht_hat = alpha * h_t + (1 - alpha) * h_s
    hs_hat = (1 - beta) * h_t + beta * h_s
    return mse(T(ht_hat), S(hs_hat))


def make_layer(kind, cin=6, cout=4, k=3, stride=1, padding=1, dilation=1, groups=1, bias=True):
    if kind == "linear":
        return nn.Linear(cin, cout, bias=bias).double()
    return nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias).double()


def inputs(layer, n=3, hw=(7, 6)):
    if isinstance(layer, nn.Linear):
        h = torch.randn(n, layer.in_features, dtype=torch.float64)
    else:
        h = torch.randn(n, layer.in_channels, *hw, dtype=torch.float64)
    return h, h + 0.4 * torch.randn_like(h)


def gram_loss_and_grad(name, layer, W, h_t, h_s):
    g = LayerGeometry.of(layer)
    stats = cdfast.LayerStatistics(layer, dtype=torch.float64).update(h_t, h_s)
    quad = Quadratic.from_statistics(stats, LossSpec(name, **PARAMS), g.weight_matrix(layer.weight.detach()))
    Wm = g.weight_matrix(W)
    return quad.loss(Wm), g.weight_tensor(quad.grad(Wm))[0]


LAYERS = [
    dict(kind="conv"),
    dict(kind="conv", stride=2, padding=0),
    dict(kind="conv", k=3, padding=2, dilation=2),
    dict(kind="conv", cin=6, cout=6, groups=6),           # depthwise
    dict(kind="conv", cin=6, cout=4, groups=2, k=1, padding=0),
    dict(kind="linear"),
]


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("layer_kw", LAYERS, ids=lambda d: "-".join(f"{k}{v}" for k, v in d.items()))
def test_gram_form_equals_formula_and_data_form(name, layer_kw):
    layer = make_layer(**layer_kw)
    h_t, h_s = inputs(layer)
    W = (layer.weight.detach() + 0.1 * torch.randn_like(layer.weight)).requires_grad_(True)

    ref = spec_formula(name, layer, W, h_t, h_s, **PARAMS)
    (ref_grad,) = torch.autograd.grad(ref, W)

    g = LayerGeometry.of(layer)
    spec = LossSpec(name, **PARAMS)
    targets = spec.teacher_outputs(g, layer.weight.detach(), layer.bias.detach(), h_t, h_s)
    data = spec.data_loss(g, W, layer.bias.detach(), targets, h_t, h_s)
    (data_grad,) = torch.autograd.grad(data, W)

    gram, gram_grad = gram_loss_and_grad(name, layer, W.detach(), h_t, h_s)
    assert rel_err(data, ref) < 1e-10
    assert rel_err(data_grad, ref_grad) < 1e-10
    assert rel_err(gram, ref) < 1e-10 and rel_err(gram_grad, ref_grad) < 1e-10


@settings(max_examples=25, deadline=None)
@given(cin=st.integers(1, 5), cout=st.integers(1, 5), k=st.integers(1, 4), stride=st.integers(1, 3),
       padding=st.integers(0, 2), dilation=st.integers(1, 2), n=st.integers(1, 3), hw=st.integers(5, 9),
       name=st.sampled_from(LOSSES))
def test_gram_form_any_conv_shape(cin, cout, k, stride, padding, dilation, n, hw, name):
    assume(hw + 2 * padding >= dilation * (k - 1) + 1)  # the kernel fits the padded input
    layer = make_layer("conv", cin, cout, k, stride, padding, dilation)
    h_t, h_s = inputs(layer, n, (hw, hw + 1))
    W = layer.weight.detach() + 0.1 * torch.randn_like(layer.weight)
    Wg = W.clone().requires_grad_(True)
    ref = spec_formula(name, layer, Wg, h_t, h_s, **PARAMS)
    (ref_grad,) = torch.autograd.grad(ref, Wg)
    gram, grad = gram_loss_and_grad(name, layer, W, h_t, h_s)
    assert rel_err(gram, ref) < 1e-10 or abs(float(gram - ref)) < 1e-14
    assert rel_err(grad, ref_grad) < 1e-10 or float(ref_grad.abs().max()) < 1e-14


def test_fit_bias_gram_matches_formula():
    layer = make_layer("conv")
    h_t, h_s = inputs(layer)
    g = LayerGeometry.of(layer)
    W = (layer.weight.detach() + 0.1 * torch.randn_like(layer.weight)).requires_grad_(True)
    b = (layer.bias.detach() + 0.1 * torch.randn_like(layer.bias)).requires_grad_(True)
    y_t = g.apply(h_t, layer.weight, layer.bias)
    y_s = g.apply(h_t, W, b)
    y_t2, y_s2 = g.apply(h_s, layer.weight, layer.bias), g.apply(h_s, W, b)
    ref = 0.3 * (y_t - y_s).pow(2).mean() + 0.7 * (y_t2 - y_s2).pow(2).mean()
    gw, gb = torch.autograd.grad(ref, (W, b))
    stats = cdfast.LayerStatistics(layer, dtype=torch.float64, fit_bias=True).update(h_t, h_s)
    anchor = g.weight_matrix(layer.weight.detach(), layer.bias.detach())
    quad = Quadratic.from_statistics(stats, LossSpec("cross", mu=0.3), anchor)
    Wm = g.weight_matrix(W.detach(), b.detach())
    grad_w, grad_b = g.weight_tensor(quad.grad(Wm))
    assert rel_err(quad.loss(Wm), ref) < 1e-8
    assert rel_err(grad_w, gw) < 1e-8 and rel_err(grad_b, gb) < 1e-8


def test_canonical_form_matches_loss():
    layer = make_layer("conv", cin=3, cout=4)
    h_t, h_s = inputs(layer, n=6)  # M = 252 > D = 27: H is non-singular
    g = LayerGeometry.of(layer)
    stats = cdfast.LayerStatistics(layer, dtype=torch.float64).update(h_t, h_s)
    quad = Quadratic.from_statistics(stats, LossSpec("cross", mu=0.6), g.weight_matrix(layer.weight.detach()),
                                     damping=0.0)
    w_star, c = quad.canonical()
    W = g.weight_matrix(layer.weight.detach()) + torch.randn(1, 4, 27, dtype=torch.float64)
    d = W - w_star
    canon = quad.scale * ((torch.bmm(d, quad.H) * d).sum() + c)
    assert rel_err(canon, quad.loss(W)) < 1e-9
    assert float(quad.grad(w_star).abs().max()) < 1e-9  # W* is the minimiser


def test_activation_objective_matches_formula_with_bn():
    layer = make_layer("conv")
    bn = nn.BatchNorm2d(4).double().eval()
    bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.data.uniform_(0.5, 2)
    h_t, h_s = inputs(layer)
    W = (layer.weight.detach() + 0.1 * torch.randn_like(layer.weight)).requires_grad_(True)
    sigma = lambda y: torch.relu(bn(y))
    ref = spec_formula("cross", layer, W, h_t, h_s, mu=0.3, sigma=sigma)
    spec = LossSpec("cross", mu=0.3, objective="activation", activation=cdfast.ActivationSpec.from_batchnorm(bn))
    g = LayerGeometry.of(layer)
    t = spec.teacher_outputs(g, layer.weight.detach(), layer.bias.detach(), h_t, h_s)
    data = spec.data_loss(g, W, layer.bias.detach(), t, h_t, h_s)
    assert rel_err(data, ref) < 1e-10


def test_error_basis_statistics_give_spec_grams():
    layer = make_layer("conv", groups=2, cin=6, cout=4)
    h_t, h_s = inputs(layer)
    stats = cdfast.LayerStatistics(layer, dtype=torch.float64).update(h_t, h_s)
    g = LayerGeometry.of(layer)
    Xt, Xs = g.unfold(h_t), g.unfold(h_s)
    assert rel_err(stats.G_TT, Xt @ Xt.transpose(1, 2)) < 1e-12
    assert rel_err(stats.G_SS, Xs @ Xs.transpose(1, 2)) < 1e-12
    assert rel_err(stats.G_ST, Xs @ Xt.transpose(1, 2)) < 1e-12


def test_streaming_statistics_equal_one_pass_and_half_inputs():
    layer = make_layer("conv").float()
    h_t = torch.randn(8, 6, 7, 6)
    h_s = h_t + 0.3 * torch.randn_like(h_t)
    one = cdfast.LayerStatistics(layer, dtype=torch.float64).update(h_t, h_s)
    many = cdfast.LayerStatistics(layer, dtype=torch.float64)
    for i in range(0, 8, 3):
        many.update(h_t[i:i + 3], h_s[i:i + 3])
    assert many.rows == one.rows == 8 * 7 * 6 and many.samples == 8
    assert rel_err(many.G_TT, one.G_TT) < 1e-12 and rel_err(many.G_ET, one.G_ET) < 1e-12
    half = cdfast.LayerStatistics(layer).update(h_t.half(), h_s.half())
    assert half.G_TT.dtype == torch.float32
    assert rel_err(half.G_TT, one.G_TT) < 1e-2


def test_robust_cholesky_factors_a_dead_group_with_rounding_noise_off_its_diagonal():
    """A group whose inputs are dead in every sample: zero diagonal, float32 rounding noise
    (±2^-22) off it. The other group, positive definite, factors as without it."""
    from cdfast.layer.losses import robust_cholesky

    g = torch.Generator().manual_seed(0)
    A = torch.randn(9, 20, generator=g, dtype=torch.float64)
    good = A @ A.T
    noise = torch.zeros(9, 9, dtype=torch.float64)
    noise[0, 8] = noise[8, 0] = 2.0 ** -22
    noise[2, 5] = noise[5, 2] = -(2.0 ** -22)
    L = robust_cholesky(torch.stack([good, noise]))
    assert torch.isfinite(L).all()
    assert torch.allclose(L[0], torch.linalg.cholesky(good))
    rebuilt = L[1] @ L[1].T
    assert torch.allclose(rebuilt, noise, atol=9 * 2.0 ** -22 * 1.01) and torch.linalg.eigvalsh(rebuilt).min() > 0
