"""``augment=``: label-free views of the calibration images, held out by image under ``loss="auto"``."""
import pytest
import torch
import torch.nn as nn

import cdfast
from cdfast.layer.selection import FoldedStatistics
from cdfast.model.augment import SHIFT, views
from test_compress import tiny_vgg


def _images(n=5, h=9, w=11, seed=0):
    return torch.randn(n, 2, h, w, generator=torch.Generator().manual_seed(seed))


def test_views_are_view_major_flips_and_border_repeating_shifts():
    x = _images()
    n = len(x)
    flipped = views(x, "flip")
    assert flipped.shape == (2 * n, *x.shape[1:])
    assert torch.equal(flipped[:n], x) and torch.equal(flipped[n:], x.flip(-1))
    shifted = views(x, "shift")
    assert shifted.shape[0] == 5 * n and torch.equal(shifted[:n], x)
    right = shifted[n:2 * n]  # (dy, dx) = (0, +SHIFT): moved right, the left border column repeated
    assert torch.equal(right[..., SHIFT:], x[..., :-SHIFT])
    assert torch.equal(right[..., :SHIFT], x[..., :1].expand(-1, -1, -1, SHIFT))
    down = shifted[3 * n:4 * n]  # (+SHIFT, 0)
    assert torch.equal(down[..., SHIFT:, :], x[..., :-SHIFT, :])
    both = views(x, "flip+shift")
    assert both.shape[0] == 10 * n and torch.equal(both[5 * n:6 * n], x.flip(-1))
    assert torch.equal(both[6 * n:7 * n], right.flip(-1))
    mixed = views(x, "mix")  # image i blended with image i + m (cyclically), m = 1 … 4
    assert mixed.shape[0] == 5 * n
    assert torch.allclose(mixed[2 * n + 1], 0.6 * x[1] + 0.4 * x[3]) and torch.allclose(mixed[n + 4], 0.6 * x[4] + 0.4 * x[0])
    assert views(x, "flip+shift+mix").shape[0] == 18 * n
    assert torch.equal(views(x, lambda t: [t * 2]), torch.cat([x, x * 2]))
    assert views(x, None) is x


def test_bad_augment_is_refused_naming_the_argument():
    x = _images()
    for bad in ("mirror", 3):
        with pytest.raises(ValueError, match="augment"):
            views(x, bad)
    with pytest.raises(ValueError, match="augment: view 0"):
        views(x, lambda t: [t[:, :1]])
    with pytest.raises(ValueError, match="augment"):
        views(torch.randn(4, 8), "flip")
    with pytest.raises(ValueError, match="augment"):
        cdfast.compress(tiny_vgg(), torch.randn(4, 1, 8, 8), augment="crop", progress=False)


def test_folds_by_image_keep_every_view_of_an_image_together():
    conv = nn.Conv2d(2, 3, 3)
    x = _images(n=7)
    v = views(x, "flip")  # 14 samples: image i and its flip are samples i and 7 + i
    h_t, h_s = v, v + 0.1 * torch.randn_like(v)
    folded = FoldedStatistics(conv, folds=3, period=7, dtype=torch.float64)
    for chunk in range(0, 14, 4):  # dealt over several updates, as compress streams batches
        folded.update(h_t[chunk:chunk + 4], h_s[chunk:chunk + 4])
    for f in range(3):
        idx = [s for s in range(14) if (s % 7) % 3 == f]
        ref = cdfast.LayerStatistics(conv, dtype=torch.float64).update(h_t[idx], h_s[idx])
        assert folded.parts[f].samples == len(idx)
        assert torch.allclose(folded.parts[f].state_dict()["grams"], ref.state_dict()["grams"])
    with pytest.raises(ValueError, match="period"):
        FoldedStatistics(conv, folds=3, period=2)


def test_compress_with_augment_fits_on_every_view():
    teacher = tiny_vgg()
    x = torch.randn(6, 1, 10, 10, generator=torch.Generator().manual_seed(2))
    kw = dict(compression=cdfast.ChannelPrune(0.5), solver="exact", progress=False, verbose=False)
    _, plain = cdfast.compress(teacher, x, loss="nc", **kw)
    _, rep = cdfast.compress(teacher, x, augment="flip+shift", **kw)
    assert rep.samples == 6 and rep.views == 10
    fitted = [(a, b) for a, b in zip(plain.layers, rep.layers) if a.action != "skipped"]
    assert fitted and all(b.rows == 10 * a.rows for a, b in fitted)
    assert all("held-out" in b.choice for _, b in fitted)  # 6 images: held out by image
    # a duplicate view adds no information: the nc fit is the plain one
    twice, _ = cdfast.compress(teacher, x, loss="nc", augment=lambda t: [t.clone()], stats_dtype=torch.float64,
                               **kw)
    once, _ = cdfast.compress(teacher, x, loss="nc", stats_dtype=torch.float64, **kw)
    for (n, a), (_, b) in zip(once.named_parameters(), twice.named_parameters()):
        assert torch.allclose(a, b, atol=1e-4), n


def test_selection_after_the_batchnorm_is_checked_and_runs():
    teacher = tiny_vgg()
    x = torch.randn(8, 1, 10, 10, generator=torch.Generator().manual_seed(7))
    with pytest.raises(ValueError, match="select_on"):
        cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), select_on="bn", progress=False)
    kw = dict(compression=cdfast.ChannelPrune(0.5), solver="exact", loss="nc", progress=False, verbose=False)
    small, rep = cdfast.compress(teacher, x, select_on="norm", **kw)  # the weighting itself: tests/test_groups.py
    assert torch.isfinite(small(x)).all() and small[3].out_channels == 6 and rep.params_after < rep.params_before
