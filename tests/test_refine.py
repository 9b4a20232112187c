"""Block-wise refinement after the layer-wise pass (cdfast.model.refine)."""
import pytest
import torch
import torch.nn as nn

import cdfast
from cdfast.experiments.models import resnet
from cdfast.model.refine import find_blocks, refine_blocks
from test_compress import tiny_vgg


def _with_batchnorms_set(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with BatchNorms that are not the identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


def _teacher():
    torch.manual_seed(0)
    return _with_batchnorms_set(resnet(8, width=8))


def _output_error(teacher, student, x):
    with torch.no_grad():
        return float((student(x) - teacher(x)).pow(2).mean())


def test_find_blocks_splits_at_the_containers():
    teacher = _teacher()
    convs = [n for n, m in teacher.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    blocks = find_blocks(teacher, convs[1:])
    names = [b for b, _ in blocks]
    assert names == ["blocks.0", "blocks.1", "blocks.2", "classifier"]  # resnet(8): 3 basic blocks
    assert blocks[1][1] == [n for n in convs if n.startswith("blocks.1.")]
    # a flat Sequential: every child is a block, and only those that hold a wanted layer
    vgg = tiny_vgg()
    assert find_blocks(vgg, ["3", "12"]) == [("3", ["3"]), ("12", ["12"])]
    # a layer that is the whole model
    lin = nn.Linear(3, 2)
    assert find_blocks(lin, [""]) == [("", [""])]


def test_refinement_lowers_each_block_error_and_the_output_error():
    teacher = _teacher()
    x = torch.randn(12, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    student, rep = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), policy="resnet",
                                   solver="exact", progress=False, verbose=False)
    before = _output_error(teacher, student, x)
    layerwise = {k: v.clone() for k, v in student.state_dict().items()}
    reports = refine_blocks(teacher, student, x, steps=60, lr=1e-3, progress=False)
    assert [r.name for r in reports] == ["blocks.0", "blocks.1", "blocks.2", "classifier"]
    refined = [r for r in reports if r.kept]
    assert refined and all(r.loss_after < r.loss_before for r in refined)
    assert all(r.loss_after >= r.loss_before for r in reports if not r.kept and not r.reason)
    after = _output_error(teacher, student, x)
    assert after < before, (before, after)
    # BatchNorm statistics and affine parameters are not trained
    for k, v in student.state_dict().items():
        if ".bn" in k or "running" in k:
            assert torch.equal(v, layerwise[k]), k


def _stages():
    """A VGG-like network of conv–BN–ReLU stages: pruning a stage's input channels
    removes the previous stage's output channels, so block outputs shrink."""
    torch.manual_seed(6)
    stage = lambda i, o: nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU())
    return _with_batchnorms_set(nn.Sequential(stage(1, 8), stage(8, 12), stage(12, 12), nn.AdaptiveAvgPool2d(1),
                                              nn.Flatten(), nn.Linear(12, 5)))


def test_blocks_whose_outputs_lost_channels_are_fit_to_the_kept_teacher_channels():
    teacher = _stages()
    x = torch.randn(16, 1, 10, 10, generator=torch.Generator().manual_seed(7))
    student, rep = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), solver="exact",
                                   progress=False, verbose=False, refine_steps=40)
    assert student[1][0].out_channels == 6 and rep.kept_outputs["1.0"].numel() == 6
    assert [b.name for b in rep.blocks] == ["1", "2", "5"] and all(not b.reason for b in rep.blocks)
    assert any(b.kept for b in rep.blocks)
    # the error refine_blocks reports for stage "1" is against the teacher's kept channels
    plain, rep0 = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), solver="exact",
                                  progress=False, verbose=False)
    with torch.no_grad():
        kept = rep0.kept_outputs["1.0"]
        h_t, h_s = teacher[0](x), plain[0](x)
        expected = float((plain[1](h_s) - teacher[1](h_t)[:, kept]).pow(2).mean())
    assert abs(rep.blocks[0].loss_before - expected) <= 1e-5 * expected
    # without kept_outputs the block cannot be compared, and says so
    reports = refine_blocks(teacher, plain, x, steps=2, layers=["1.0"], progress=False)
    assert "kept_outputs" in reports[0].reason


def test_a_block_that_gains_nothing_keeps_its_layerwise_weights():
    teacher = _teacher()
    x = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(2))
    student, _ = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), policy="resnet",
                                 solver="exact", progress=False, verbose=False)
    layerwise = {k: v.clone() for k, v in student.state_dict().items()}
    reports = refine_blocks(teacher, student, x, steps=3, lr=10.0, progress=False)  # a step far too large
    assert not any(r.kept for r in reports)
    assert all(torch.equal(v, layerwise[k]) for k, v in student.state_dict().items())
    assert "no gain" in reports[0].line()
    # steps that overflow: reported as diverged, nothing non-finite left in the student
    reports = refine_blocks(teacher, student, x, steps=2, lr=1e30, progress=False)
    assert any("diverged" in r.line() for r in reports)
    assert all(torch.equal(v, layerwise[k]) for k, v in student.state_dict().items())


def test_pruned_weights_stay_zero_and_quantized_layers_stay_on_the_grid():
    teacher = tiny_vgg()
    x = torch.randn(16, 1, 10, 10, generator=torch.Generator().manual_seed(3))
    sparse, _ = cdfast.compress(teacher, x, compression=cdfast.WeightPrune(0.4), solver="exact", progress=False,
                                verbose=False)
    zeros = {n: m.weight == 0 for n, m in sparse.named_modules() if isinstance(m, nn.Conv2d) and n != "0"}
    reports = refine_blocks(teacher, sparse, x, steps=40, lr=1e-3, progress=False)
    assert any(r.kept for r in reports)
    for n, z in zeros.items():
        assert z.any() and (sparse.get_submodule(n).weight[z] == 0).all(), n

    quant, rep = cdfast.compress(teacher, x, compression=cdfast.Quantize(4), solver="exact", progress=False,
                                 verbose=False, refine_steps=40, overrides={"7": {"action": "refit"}})
    assert set(rep.quantized) == {"3", "12"} and [b.name for b in rep.blocks] == ["7"]
    for n, q in rep.quantized.items():  # every quantized weight is still its codes times its scale
        w = quant.get_submodule(n).weight.detach()
        L = 2 ** (q["bits"] - 1) - 1
        grid = (q["codes"].double() * (q["scale"] / L).double().view(-1, *[1] * (w.dim() - 1))).float()
        assert torch.equal(w, grid), n
    assert all(set(b.layers).isdisjoint(rep.quantized) for b in rep.blocks)


def test_compress_refines_and_a_resume_repeats_it_identically(tmp_path):
    teacher = _teacher()
    x = torch.randn(10, 1, 12, 12, generator=torch.Generator().manual_seed(4))
    kw = dict(compression=cdfast.ChannelPrune(0.5), policy="resnet", solver="exact", progress=False,
              verbose=False, augment="flip")
    plain, _ = cdfast.compress(teacher, x, **kw)
    refined, rep = cdfast.compress(teacher, x, refine_steps=30, checkpoint=str(tmp_path / "run.pt"), **kw)
    assert rep.blocks and any(b.kept for b in rep.blocks)
    assert _output_error(teacher, refined, x) < _output_error(teacher, plain, x)
    assert "blocks" in rep.to_dict() and rep.to_dict()["blocks"][0]["name"] == "blocks.0"
    # every layer is in the checkpoint: the second call only repeats the refinement
    again, _ = cdfast.compress(teacher, x, refine_steps=30, checkpoint=str(tmp_path / "run.pt"), **kw)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in refined.state_dict().items())


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1))

    def forward(self, x):
        return self.head(self.body(self.body(x)))  # body runs twice per forward


def test_a_block_called_twice_is_left_with_the_reason():
    torch.manual_seed(5)
    teacher = _Twice().eval()
    student = _Twice().eval()
    x = torch.randn(4, 3, 6, 6)
    reports = refine_blocks(teacher, student, x, steps=5, layers=["body.0", "head.0"], progress=False)
    by_name = {r.name: r for r in reports}
    assert by_name["body.0"].reason == "called 2 times per forward"
    assert "not refined" in by_name["body.0"].line()
    assert by_name["head.0"].reason == ""


@pytest.mark.parametrize("kw, error, match", [
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=1.5), TypeError, "steps"),
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(augment="crop"), ValueError, "augment"),
    (dict(layers=["1"]), ValueError, "layers"),
])
def test_bad_arguments_are_named(kw, error, match):
    teacher = tiny_vgg()
    x = torch.randn(4, 1, 8, 8)
    with pytest.raises(error, match=match):
        refine_blocks(teacher, tiny_vgg(), x, progress=False, **kw)
    with pytest.raises(TypeError, match="student"):
        refine_blocks(teacher, "model", x)
    with pytest.raises(ValueError, match="data"):
        refine_blocks(teacher, tiny_vgg(), torch.full((4, 1, 8, 8), float("nan")), progress=False)
    with pytest.raises(ValueError, match="refine_steps"):
        cdfast.compress(teacher, x, refine_steps=-1, progress=False)
