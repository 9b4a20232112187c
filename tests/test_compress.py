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
    assert rep.params_after < rep.params_before == count_parameters(teacher)
    assert rep.flops_after < rep.flops_before
    assert small[3].in_channels == 4 and small[0].out_channels == 4 and small[1].num_features == 4
    assert small[12].in_features == 6  # the classifier reads half of the last conv's channels
    assert set(rep.shrink.values()) == {"removed"}
    assert [l.action for l in rep.layers] == ["skipped", "compressed", "compressed", "compressed"]
    out = small(x)
    assert torch.isfinite(out).all() and out.shape == (16, 5)


def test_skip_first_policy_refits_the_classifier():
    teacher = tiny_vgg()
    x = torch.randn(16, 1, 12, 12)
    small, rep = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), policy="skip_first",
                                 solver="exact", progress=False, verbose=False)
    assert [l.action for l in rep.layers] == ["skipped", "compressed", "compressed", "refit"]
    assert small[12].in_features == 12 and small[7].out_channels == 12


def test_pruned_layer_is_the_fixed_support_solve():
    """A consumer after removal is fit against the teacher's full-width layer with its removed
    inputs fixed at zero: the same weights as distill_layer with that FixedSupport."""
    teacher = tiny_vgg()
    x = torch.randn(16, 1, 10, 10)
    kw = dict(solver="exact", stats_dtype=torch.float64, mu=0.9)
    small, rep = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), loss="cross", progress=False,
                                 verbose=False, **kw)
    kept = rep.kept_outputs["0"]
    assert len(kept) == 4
    with torch.no_grad():
        h_t = teacher[2](teacher[1](teacher[0](x)))
        h_s = small[2](small[1](small[0](x)))
    full = h_t.clone()  # a removed channel carries the teacher's value (only the teacher sees it)
    full[:, kept] = h_s
    ref = cdfast.distill_layer(teacher[3], h_t.double(), full.double(), loss="cross",
                               compression=cdfast.FixedSupport(channels=kept.tolist()), **kw)
    rows = rep.kept_outputs["3"]  # its own outputs went later, with the next group: rows are independent
    assert torch.allclose(small[3].weight.double(), ref.weight[rows][:, kept].double(), atol=1e-5)


def test_activation_objective_and_data_form():
    teacher = tiny_vgg()
    x = torch.randn(8, 1, 10, 10)
    for kw in (dict(objective="activation"), dict(form="data")):
        small, rep = cdfast.compress(teacher, x, compression=[cdfast.ChannelPrune(0.5)], steps=20, progress=False,
                                     verbose=False, **kw)
        assert rep.params_after < rep.params_before
        assert all(l.loss_after <= l.loss_before + 1e-6 for l in rep.layers if l.action == "compressed")
        assert torch.isfinite(small(x)).all()


def test_resnet_policy_prunes_block_internal_channels_only():
    teacher = resnet(8, width=8).eval()
    x = torch.randn(8, 1, 16, 16)
    small, rep = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), policy="resnet", steps=50,
                                 progress=False, verbose=False)
    for blk in small.blocks:
        assert blk.conv1.out_channels == blk.conv2.in_channels == blk.conv2.out_channels // 2
    assert {l.name for l in rep.layers if l.action == "compressed"} == {f"blocks.{i}.conv2" for i in range(3)}
    assert torch.isfinite(small(x)).all()


def test_resume_after_crash(tmp_path):
    teacher = tiny_vgg()
    x = torch.randn(8, 1, 10, 10)
    ck = str(tmp_path / "ck.pt")
    kw = dict(compression=cdfast.ChannelPrune(0.5), solver="exact", progress=False, verbose=False)
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
    assert len(torch.load(ck, weights_only=True)["done"]) == 3  # the skipped first layer and two solves
    resumed, rep = cdfast.compress(teacher, x, checkpoint=ck, **kw)  # replays the removed channels
    assert [m.weight.shape for m in resumed.modules() if isinstance(m, nn.Conv2d)] == \
        [m.weight.shape for m in full.modules() if isinstance(m, nn.Conv2d)]
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
    with pytest.raises(ValueError, match="action"):
        cdfast.compress(teacher, x, overrides={"3": {"action": "later"}}, progress=False)


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
