"""Property-based tests over the public API: every outcome is a clear error or a finite
result no worse than naive compression.

A clear error is a ``TypeError``/``ValueError`` whose message starts with the name of the
argument as the user wrote it. A finite result has finite weights, bias, scale and losses,
and (without penalties, which trade loss for structure) ``loss_after ≤ loss_before``.
"""
from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings, strategies as st

import cdfast

ARGUMENTS = {"teacher_layer", "h_teacher", "h_student", "batches", "statistics", "loss", "mu", "alpha", "beta",
             "objective", "activation", "compression", "solver", "steps", "lr", "momentum", "form", "fit_bias",
             "stats_dtype", "damping", "backend", "strict", "log_every", "keep", "density", "n", "m", "strength",
             "bits", "per_channel", "ramp", "lr_drop", "NMSparsity", "layer", "dtype"}
_NAMED = re.compile(r"^([A-Za-z_][A-Za-z_0-9]*)(, [A-Za-z_][A-Za-z_0-9]*)*:")


def assert_clear(exc: BaseException) -> None:
    assert isinstance(exc, (TypeError, ValueError)), f"{type(exc).__name__}: {exc}"
    m = _NAMED.match(str(exc))
    assert m and all(name.strip() in ARGUMENTS for name in m.group(0)[:-1].split(",")), str(exc)


def assert_finite_and_no_worse(res, compression) -> None:
    for name in ("weight", "bias", "scale"):
        t = getattr(res, name)
        assert t is None or bool(torch.isfinite(t).all()), name
    assert res.weight.grad_fn is None and not res.weight.requires_grad
    assert math.isfinite(res.loss_after) and math.isfinite(res.loss_before) and math.isfinite(res.loss_teacher)
    items = compression if isinstance(compression, list) else [compression]
    if not any(isinstance(c, (cdfast.L1, cdfast.GroupLasso)) for c in items):
        assert res.loss_after <= res.loss_before * (1 + 1e-6) + 1e-30, (res.loss_after, res.loss_before)


COMPRESSIONS = st.sampled_from([
    None, cdfast.ChannelPrune(0.5), cdfast.WeightPrune(0.3), cdfast.NMSparsity(1, 2), cdfast.Quantize(2),
    cdfast.Quantize(4, per_channel=False), cdfast.L1(1e-3), cdfast.GroupLasso(1e-2),
    [cdfast.ChannelPrune(0.5), cdfast.Quantize(4)], [cdfast.WeightPrune(0.5), cdfast.Quantize(3)],
])


@st.composite
def layer_and_inputs(draw):
    kind = draw(st.sampled_from(["conv", "linear"]))
    cin = draw(st.integers(2, 6))
    cout = draw(st.integers(1, 5))
    if kind == "conv":
        layer = nn.Conv2d(cin, cout, draw(st.sampled_from([1, 3])), padding=1, bias=draw(st.booleans()))
        shape = (draw(st.integers(1, 3)), cin, 4, 4)
    else:
        layer = nn.Linear(cin, cout, bias=draw(st.booleans()))
        shape = (draw(st.integers(1, 12)), cin)
    magnitude = draw(st.sampled_from([1e-30, 1e-12, 1.0, 1e6, 1e18]))
    h_t = torch.randn(shape) * magnitude
    h_s = h_t + draw(st.sampled_from([0.0, 0.1])) * magnitude * torch.randn(shape)
    if draw(st.booleans()) and draw(st.booleans()):
        h_s = h_s.clone().requires_grad_(True)
    return layer, h_t, h_s


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=layer_and_inputs(), compression=COMPRESSIONS,
       loss=st.sampled_from(["nc", "cross", "soft", "imitation"]),
       solver=st.sampled_from(["auto", "exact", "adam", "sgd"]),
       steps=st.sampled_from([1, 2, 7, 40]), lr=st.sampled_from([1e-12, 1e-3, 1e-1, 1e308]),
       momentum=st.sampled_from([0.0, 0.9]), form=st.sampled_from(["auto", "gram", "data"]),
       fit_bias=st.booleans())
def test_distill_layer_is_a_clear_error_or_a_finite_result_no_worse_than_naive(
        case, compression, loss, solver, steps, lr, momentum, form, fit_bias):
    layer, h_t, h_s = case
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = cdfast.distill_layer(layer, h_t, h_s, loss=loss, compression=compression, solver=solver,
                                       steps=steps, lr=lr, momentum=momentum, form=form, fit_bias=fit_bias)
    except (TypeError, ValueError) as exc:
        assert_clear(exc)
        return
    assert_finite_and_no_worse(res, compression)


BAD_ARGUMENTS = [
    dict(momentum=float("nan")), dict(momentum=5.0), dict(momentum="0.9"), dict(lr=float("inf")), dict(lr=-1.0),
    dict(lr=1e300), dict(log_every="x"), dict(log_every=-3), dict(stats_dtype=torch.float16), dict(fit_bias="no"),
    dict(strict="yes"), dict(damping=float("nan")), dict(steps=2.5), dict(steps=0), dict(solver="newton"),
    dict(form="dense"), dict(loss="l2"), dict(mu=1.5), dict(compression="prune"),
    dict(compression=[cdfast.ChannelPrune(0.5), cdfast.WeightPrune(0.5)]), dict(backend="gpu"),
]


@pytest.mark.parametrize("kw", BAD_ARGUMENTS, ids=lambda d: ",".join(f"{k}={v!r}" for k, v in d.items()))
def test_bad_arguments_are_named(kw):
    conv = nn.Conv2d(4, 3, 3, padding=1)
    h = torch.randn(2, 4, 5, 5)
    with pytest.raises((TypeError, ValueError)) as info:
        cdfast.distill_layer(conv, h, h + 0.1, solver=kw.pop("solver", "adam"), steps=kw.pop("steps", 5), **kw)
    assert_clear(info.value)


def test_non_finite_teacher_is_refused():
    for attr in ("weight", "bias"):
        conv = nn.Conv2d(4, 3, 3, padding=1)
        with torch.no_grad():
            getattr(conv, attr).view(-1)[0] = float("nan")
        with pytest.raises(ValueError, match=f"teacher_layer: its {attr} contains NaN or Inf"):
            cdfast.distill_layer(conv, torch.randn(2, 4, 5, 5), torch.randn(2, 4, 5, 5))


def test_diverging_iterations_stop_with_an_error_naming_lr():
    conv = nn.Conv2d(4, 3, 3, padding=1)
    h = torch.randn(3, 4, 5, 5)
    for solver in ("adam", "sgd"):
        with pytest.raises(ValueError, match="^lr: the .* iterates diverged"):
            cdfast.distill_layer(conv, h, h + 0.3 * torch.randn_like(h), loss="nc", solver=solver, steps=50,
                                 lr=1e30, momentum=0.9)


@pytest.mark.parametrize("magnitude", [1e-30, 1e18])
def test_extreme_input_magnitudes_give_the_same_weights(magnitude):
    """Such statistics are accumulated in float64: the solution does not change and the
    losses scale by magnitude² (they used to overflow, or underflow to an all-zero layer)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 4, 3, padding=1)
    h = torch.randn(3, 5, 6, 6)
    hs = h + 0.2 * torch.randn_like(h)
    kw = dict(compression=[cdfast.ChannelPrune(0.6), cdfast.Quantize(4)], solver="exact")
    ref = cdfast.distill_layer(conv, h, hs, **kw)
    big = cdfast.distill_layer(conv, h * magnitude, hs * magnitude, **kw)
    assert torch.allclose(big.weight, ref.weight, rtol=1e-4, atol=1e-6)
    assert abs(big.loss_after / (ref.loss_after * magnitude ** 2) - 1) < 1e-3
    assert float(big.weight.abs().max()) > 0
