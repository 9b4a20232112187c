"""``cdfast.reconstruct``: a student compressed by another tool, refit by cross distillation.

Three students of a MobileNetV2 replica (depthwise convs, residual adds): magnitude
pruned (zeros), rounded to a 4-bit grid, and channel-pruned by Torch-Pruning. Each
keeps its structure (zeros, grid, shapes) and ends closer to the teacher on held-out
inputs than it started.
"""
import pytest
import torch

import cdfast
from cdfast.experiments import zoo
from cdfast.experiments.foreign import TINY, magnitude_prune
from cdfast.experiments.grid import naive_compress


def _setup():
    torch.manual_seed(0)
    teacher = zoo.build("mobilenet_v2", **TINY["mobilenet_v2"]).eval()
    g = torch.Generator().manual_seed(3)
    return teacher, torch.randn(48, 1, 12, 12, generator=g), torch.randn(32, 1, 12, 12, generator=g)


def _rel(model, teacher, x):
    with torch.no_grad():
        y_t = teacher(x)
        return float((model(x) - y_t).norm() / y_t.norm())


def _layers(model):
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))][1:]


def test_sparse_student_keeps_its_zeros():
    teacher, x, x_test = _setup()
    student = naive_compress(teacher, cdfast.WeightPrune(0.5), _layers(teacher))
    fixed, rep = cdfast.reconstruct(teacher, student, x, progress=False)
    for n in _layers(teacher):
        zero = student.get_submodule(n).weight == 0
        assert bool((fixed.get_submodule(n).weight[zero] == 0).all()), n
    assert _rel(fixed, teacher, x_test) < _rel(student, teacher, x_test)


def test_quantized_student_stays_on_a_grid():
    teacher, x, x_test = _setup()
    student = naive_compress(teacher, cdfast.Quantize(4), _layers(teacher))
    fixed, rep = cdfast.reconstruct(teacher, student, x, compression=cdfast.Quantize(4), layers=_layers(teacher),
                                    progress=False)
    for n in _layers(teacher):
        w = fixed.get_submodule(n).weight.detach().flatten(1)
        assert max(len(torch.unique(row)) for row in w) <= 15, n  # 2·7 + 1 levels per output channel
        assert set(rep.quantized) == set(_layers(teacher))
    assert _rel(fixed, teacher, x_test) < _rel(student, teacher, x_test)


def test_channel_pruned_student_from_torch_pruning():
    teacher, x, x_test = _setup()
    _, rep = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), solver="exact", progress=False,
                             verbose=False)
    kept = {g["root"]: g["kept"] for g in rep.groups if g["status"] == "pruned"}
    student, kept_outputs = magnitude_prune(teacher, x[:1], kept)
    shapes = {k: v.shape for k, v in student.state_dict().items()}
    fixed, _ = cdfast.reconstruct(teacher, student, x, kept_channels=kept_outputs, progress=False)
    assert {k: v.shape for k, v in fixed.state_dict().items()} == shapes
    assert _rel(fixed, teacher, x_test) < 0.8 * _rel(student, teacher, x_test)
    with pytest.raises(ValueError, match="kept_channels"):
        cdfast.reconstruct(teacher, student, x, progress=False)
