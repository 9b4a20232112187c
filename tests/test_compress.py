"""Whole-model compression: the walk, physical shrinking, resume, distributed statistics."""
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import cdfast
from cdfast.experiments.models import count_parameters, resnet


def tiny_vgg():
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(12, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def test_compress_shrinks_the_model_and_keeps_the_teacher():
    teacher = tiny_vgg()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(16, 1, 12, 12)
    small, rep = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), steps=100, progress=False,
                                 verbose=False)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert rep.walk == "block-sequence"
    assert rep.params_after < rep.params_before == count_parameters(teacher)
    assert rep.flops_after < rep.flops_before
    assert small[3].in_channels == 4 and small[0].out_channels == 4 and small[1].num_features == 4
    assert set(rep.shrink.values()) == {"removed"}
    assert [l.action for l in rep.layers] == ["skipped", "compressed", "compressed", "refit"]
    out = small(x)
    assert torch.isfinite(out).all() and out.shape == (16, 5)


def test_block_walk_equals_recompute_walk():
    teacher = tiny_vgg()
    x = torch.randn(12, 1, 10, 10)
    kw = dict(compression=cdfast.ChannelPrune(0.5), solver="exact", stats_dtype=torch.float64, progress=False,
              verbose=False)
    a, ra = cdfast.compress(teacher, x, **kw)
    b, rb = cdfast.compress(teacher, x, max_cache_bytes=0, **kw)
    assert ra.walk == "block-sequence" and rb.walk.startswith("recompute")
    assert torch.allclose(a(x), b(x), atol=1e-5)


def test_resnet_policy_prunes_block_internal_channels_only():
    teacher = resnet(8, width=8).eval()
    x = torch.randn(8, 1, 16, 16)
    small, rep = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), policy="resnet", steps=50,
                                 progress=False, verbose=False)
    for blk in small.blocks:
        assert blk.conv1.out_channels == blk.conv2.in_channels == blk.conv2.out_channels // 2
    assert rep.walk == "block-sequence"
    assert torch.isfinite(small(x)).all()


def test_resume_after_crash(tmp_path):
    teacher = tiny_vgg()
    x = torch.randn(8, 1, 10, 10)
    ck = str(tmp_path / "ck.pt")
    kw = dict(compression=cdfast.ChannelPrune(0.5), solver="exact", progress=False, verbose=False, shrink=False)
    full, _ = cdfast.compress(teacher, x, **kw)

    calls = {"n": 0}
    real = cdfast.compress.__globals__["distill_layer"]

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*a, **k)

    cdfast.compress.__globals__["distill_layer"] = flaky
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            cdfast.compress(teacher, x, checkpoint=ck, **kw)
    finally:
        cdfast.compress.__globals__["distill_layer"] = real
    assert os.path.exists(ck)
    assert len(torch.load(ck, weights_only=True)["done"]) == 2
    resumed, rep = cdfast.compress(teacher, x, checkpoint=ck, **kw)
    assert torch.allclose(resumed(x), full(x), atol=1e-6)


def test_bad_inputs():
    teacher = tiny_vgg()
    x = torch.randn(4, 1, 10, 10)
    with pytest.raises(ValueError, match="data"):
        cdfast.compress(teacher, x[:0], progress=False)
    with pytest.raises(ValueError, match="policy"):
        cdfast.compress(teacher, x, policy="every", progress=False)
    with pytest.raises(TypeError, match="teacher"):
        cdfast.compress("model", x)
    with pytest.raises(ValueError, match="overrides"):
        cdfast.compress(teacher, x, overrides={"nope": {}}, progress=False)
    with pytest.raises(ValueError, match="keep"):
        cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.05), progress=False, verbose=False)
    with pytest.raises(ValueError, match="Conv2d"):
        cdfast.compress(nn.Sequential(nn.ReLU()), x, progress=False)


def _rank_main(rank, world, init_file, x, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        teacher = tiny_vgg()
        share = x[rank::world]
        small, rep = cdfast.compress(teacher, share, compression=cdfast.ChannelPrune(0.5), solver="exact",
                                     stats_dtype=torch.float64, progress=False, verbose=False)
        torch.save({k: v for k, v in small.state_dict().items()}, f"{out_file}.{rank}")
    finally:
        dist.destroy_process_group()


def test_distributed_statistics_equal_one_process(tmp_path):
    x = torch.randn(12, 1, 10, 10)
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), x, str(tmp_path / "out")), nprocs=2, join=True)
    single, _ = cdfast.compress(tiny_vgg(), x, compression=cdfast.ChannelPrune(0.5), solver="exact",
                                stats_dtype=torch.float64, progress=False, verbose=False)
    ref = single.state_dict()
    for rank in range(2):
        got = torch.load(str(tmp_path / f"out.{rank}"), weights_only=True)
        assert got.keys() == ref.keys()
        for k in ref:
            assert torch.allclose(got[k].double(), ref[k].double(), atol=1e-5), k
