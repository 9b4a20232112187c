"""FSKD (SPEC §5) and the comparison baselines (SPEC §6), on tiny random networks."""
import copy

import pytest
import torch
import torch.nn as nn

from cdfast.experiments.baselines import METHODS, run
from cdfast.model.fskd import block_end_convs, fskd
from cdfast.experiments.models import count_parameters, resnet
from cdfast.model.walk import capture_input


def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) * 0.4 - 0.2)
    return model


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return _randomise_bn(resnet(8, width=8)).eval()


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(2)
    return torch.randn(24, 1, 12, 12, generator=g), torch.randint(0, 10, (24,), generator=g)


def _rel(a, b):
    return float((a - b).detach().norm() / b.detach().norm())


def _perturb(conv, seed, bias_shift=False):
    g = torch.Generator().manual_seed(seed)
    C = conv.out_channels
    P = torch.eye(C) + 0.3 * torch.randn(C, C, generator=g)
    with torch.no_grad():
        conv.weight.copy_(torch.einsum("oc,cihw->oihw", P, conv.weight))
        if bias_shift and conv.bias is not None:
            conv.bias.copy_(P @ conv.bias + 0.1 * torch.randn(C, generator=g))


def test_block_end_convs_skip_shortcuts(teacher, data):
    names = block_end_convs(teacher, data[0][:1])
    assert names == ["stem.0", "blocks.0.conv2", "blocks.1.conv2", "blocks.2.conv2"]


def test_fskd_recovers_invertible_perturbation(teacher, data):
    x = data[0]
    student = copy.deepcopy(teacher)
    for i, n in enumerate(["blocks.0.conv2", "blocks.1.conv2", "blocks.2.conv2"]):
        _perturb(student.get_submodule(n), 10 + i)
    with torch.no_grad():
        ref = teacher(x)
        assert _rel(student(x), ref) > 1e-2
    fixed, info = fskd(teacher, student, x, return_info=True)
    with torch.no_grad():
        assert _rel(fixed(x), ref) < 1e-4
    assert info["blocks.0.conv2"]["err_before"] > 1e-2 > 1e-8 > info["blocks.0.conv2"]["err_after"]
    assert count_parameters(fixed) == count_parameters(student)
    assert {k: v.shape for k, v in fixed.state_dict().items()} == \
        {k: v.shape for k, v in student.state_dict().items()}
    # the student itself was not modified
    with torch.no_grad():
        assert _rel(student(x), ref) > 1e-2


def test_fskd_without_batchnorm_uses_conv_bias():
    torch.manual_seed(3)
    t = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 5, 3, padding=1), nn.ReLU(),
                      nn.Flatten(), nn.Linear(5 * 8 * 8, 3)).eval()
    s = copy.deepcopy(t)
    _perturb(s[2], 4, bias_shift=True)
    x = torch.randn(16, 2, 8, 8)
    fixed = fskd(t, s, x)
    with torch.no_grad():
        assert _rel(fixed(x), t(x)) < 1e-5


def test_fskd_on_pruned_student_keeps_size_and_reduces_error(teacher, data):
    x = data[0]
    student, _ = run("l1", teacher, x, keep=0.5)
    fixed, info = fskd(teacher, student, x, return_info=True)
    assert count_parameters(fixed) == count_parameters(student) < count_parameters(teacher)
    for v in info.values():
        assert v["err_after"] <= v["err_before"] + 1e-9
    with torch.no_grad():
        assert _rel(fixed(x), teacher(x)) < _rel(student(x), teacher(x))


@pytest.mark.parametrize("method", METHODS)
def test_baseline_shrinks_and_is_finite(method, teacher, data):
    x, y = data
    student, info = run(method, teacher, x, keep=0.5, labels=y, steps=5)
    assert info["params"] == count_parameters(student) < count_parameters(teacher)
    assert info["flops"] < info["flops_teacher"]
    assert info["seconds"] >= 0
    with torch.no_grad():
        out = student(x)
    assert out.shape == (len(x), 10) and torch.isfinite(out).all()


def _layer_error(student, teacher, x, name="blocks.0.conv2"):
    """Output error of one layer on its own inputs (earlier layers are the teacher's)."""
    lt, ls = teacher.get_submodule(name), student.get_submodule(name)
    with torch.no_grad():
        y_t = lt(capture_input(lambda: teacher(x), lt))
        y_s = ls(capture_input(lambda: student(x), ls))
    return _rel(y_s, y_t)


@pytest.mark.parametrize("method", ["thinet", "cp"])
def test_reconstruction_beats_l1(method, teacher, data):
    x = data[0]
    l1, _ = run("l1", teacher, x, keep=0.5)
    st, info = run(method, teacher, x, keep=0.5)
    e_l1, e_m = _layer_error(l1, teacher, x), _layer_error(st, teacher, x)
    assert e_m <= e_l1
    assert abs(info["layers"]["blocks.0.conv2"]["recon_error"] - e_m ** 2) < 1e-4
    assert abs(info["layers"]["blocks.0.conv2"]["recon_error_l1"] - e_l1 ** 2) < 1e-4


def test_fskd_output_pruned_vgg_matches_kept_teacher_channels():
    from cdfast.experiments.models import small_cnn

    torch.manual_seed(5)
    t = _randomise_bn(small_cnn(width=4)).eval()
    x = torch.randn(20, 1, 12, 12)
    l1, _ = run("l1", t, x, keep=0.5, policy="skip_first")
    fk, info = run("fskd", t, x, keep=0.5, policy="skip_first")
    assert count_parameters(fk) == count_parameters(l1) < count_parameters(t)
    assert all("err_after" in v for v in info["layers"].values())   # narrowed convs fitted too
    with torch.no_grad():
        assert _rel(fk(x), t(x)) < _rel(l1(x), t(x))


def test_every_method_accepts_the_comparison_keywords():
    """One set of keywords (compress's solver/mu) can be passed to every method."""

    teacher = resnet(8, width=8).eval()
    x = torch.randn(10, 1, 12, 12)
    y = torch.arange(10) % 10
    for method in ("l1", "fskd", "thinet", "cross"):
        student, info = run(method, teacher, x, keep=0.5, labels=y, solver="exact", mu=0.9, steps=5)
        assert info["params"] < info["params_teacher"]
