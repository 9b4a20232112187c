"""Every bad input of distill_layer gets a ValueError/TypeError naming the argument."""
import pytest
import torch
import torch.nn as nn

import cdfast

conv = nn.Conv2d(4, 3, 3, padding=1)
h = torch.randn(2, 4, 6, 6)


def call(**kw):
    args = dict(teacher_layer=conv, h_teacher=h, h_student=h + 0.1, steps=3)
    args.update(kw)
    return cdfast.distill_layer(**args)


@pytest.mark.parametrize("kw, exc, match", [
    (dict(h_teacher=torch.randn(2, 5, 6, 6), h_student=torch.randn(2, 5, 6, 6)), ValueError, "h_teacher"),
    (dict(h_student=torch.randn(2, 4, 6, 7)), ValueError, "h_student"),
    (dict(h_student=h.double()), TypeError, "h_student"),
    (dict(h_teacher=h.long(), h_student=h.long()), TypeError, "h_teacher"),
    (dict(h_teacher=[1, 2]), TypeError, "h_teacher"),
    (dict(h_student=h.clone().index_fill_(0, torch.tensor([1]), float("nan"))), ValueError, "h_student"),
    (dict(h_teacher=h.clone().index_fill_(0, torch.tensor([0]), float("inf"))), ValueError, "h_teacher"),
    (dict(h_teacher=h[:0], h_student=h[:0]), ValueError, "h_teacher"),
    (dict(h_teacher=torch.randn(2, 4, 1, 1), h_student=torch.randn(2, 4, 1, 1), teacher_layer=nn.Conv2d(4, 3, 3)),
     ValueError, "h_teacher"),
    (dict(h_teacher=None), ValueError, "h_teacher"),
    (dict(batches=[]), ValueError, "batches"),
    (dict(mu=1.5), ValueError, "mu"),
    (dict(mu=-0.1), ValueError, "mu"),
    (dict(loss="soft", alpha=2.0), ValueError, "alpha"),
    (dict(loss="soft", beta=-1.0), ValueError, "beta"),
    (dict(loss="kl"), ValueError, "loss"),
    (dict(objective="relu"), ValueError, "objective"),
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=2.5), TypeError, "steps"),
    (dict(lr=0.0), ValueError, "lr"),
    (dict(solver="lbfgs"), ValueError, "solver"),
    (dict(form="sparse"), ValueError, "form"),
    (dict(objective="activation", solver="exact"), ValueError, "solver"),
    (dict(objective="activation", form="gram"), ValueError, "form"),
    (dict(teacher_layer=nn.Conv1d(4, 3, 3)), TypeError, "teacher_layer"),
    (dict(compression="prune"), TypeError, "compression"),
    (dict(compression=[cdfast.ChannelPrune(0.5), cdfast.WeightPrune(0.5)]), ValueError, "compression"),
    (dict(compression=cdfast.ChannelPrune(0.2)), ValueError, "keep"),   # int(0.2·4) = 0 channels
    (dict(compression=cdfast.NMSparsity(2, 3)), ValueError, "NMSparsity"),
    (dict(activation=nn.ReLU()), TypeError, "activation"),
])
def test_bad_inputs_raise_clear_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        call(**kw)


def test_linear_layer_shape_mismatch():
    with pytest.raises(ValueError, match="h_teacher"):
        cdfast.distill_layer(nn.Linear(5, 2), torch.randn(3, 4), torch.randn(3, 4))


def test_half_precision_inputs_are_accepted():
    res = call(h_teacher=h.half(), h_student=(h + 0.1).half(), compression=cdfast.ChannelPrune(0.5), steps=20)
    assert res.weight.dtype == torch.float32 and torch.isfinite(res.weight).all()
    res = call(h_teacher=h.bfloat16(), h_student=(h + 0.1).bfloat16(), objective="activation", steps=5)
    assert torch.isfinite(res.weight).all()


def test_device_mismatch_is_an_error():
    meta = torch.empty(2, 4, 6, 6, device="meta")
    with pytest.raises((ValueError, TypeError), match="h_"):
        cdfast.distill_layer(conv, meta, meta)


@pytest.mark.parametrize("conv", [nn.Conv2d(4, 4, 7, padding=3, groups=4), nn.Conv2d(4, 6, 3, stride=2, padding=1),
                                  nn.Conv2d(4, 6, 5, padding="same")])
def test_padded_layer_takes_a_one_pixel_input(conv):
    """The receptive-field check counts the padding (ConvNeXt's depthwise 7×7 at 1×1)."""
    h = torch.randn(6, 4, 1, 1)
    res = cdfast.distill_layer(conv, h, h + 0.1 * torch.randn_like(h), compression=cdfast.Quantize(4),
                               solver="exact")
    assert res.weight.shape == conv.weight.shape and torch.isfinite(res.weight).all()


def test_input_smaller_than_the_padded_receptive_field():
    h = torch.randn(2, 4, 1, 1)
    with pytest.raises(ValueError, match=r"padded by \(0, 0\).*receptive field \(2, 2\)"):
        cdfast.distill_layer(nn.Conv2d(4, 4, 2, stride=2), h, h)
