"""Models cdfast did not define: small replicas of ten architectures (cdfast/experiments/zoo.py).

For each, with ``ChannelPrune(0.5)``, ``Quantize(4)`` and ``WeightPrune(0.5)``:
``compress`` runs, the result runs, channel pruning makes it physically smaller
(parameters and FLOPs in the report agree with the model), and on held-out inputs the
result is closer to the teacher than the same compression done naively (Torch-Pruning's
magnitude pruning of the same groups to the same widths; magnitude weight pruning;
rounding to the grid) on the same layers.
"""
import pytest
import torch
import torch.nn as nn

import cdfast
from cdfast.experiments import zoo
from cdfast.experiments.foreign import TINY, naive
from cdfast.model.counting import count_flops, count_parameters

COMPRESSIONS = {"channel": cdfast.ChannelPrune(0.5), "w4": cdfast.Quantize(4), "weight": cdfast.WeightPrune(0.5)}


def _teacher(name):
    torch.manual_seed(0)
    model = zoo.build(name, **TINY[name]).eval()
    g = torch.Generator().manual_seed(1)
    for m in model.modules():  # trained-looking normalisation statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
    return model


def _rel(y, y_t):
    return float((y - y_t).norm() / y_t.norm())


@pytest.mark.parametrize("kind", list(COMPRESSIONS))
@pytest.mark.parametrize("name", list(zoo.ZOO))
def test_replica_is_compressed_better_than_naively(name, kind):
    teacher = _teacher(name)
    g = torch.Generator().manual_seed(2)
    x, x_test = torch.randn(48, 1, 12, 12, generator=g), torch.randn(32, 1, 12, 12, generator=g)
    comp = COMPRESSIONS[kind]
    # the architectures' handling is under test here, not the loss: one fixed loss keeps the 30
    # cases fast (loss="auto", the default, solves every candidate on five folds; tests/test_auto_default.py)
    student, rep = cdfast.compress(teacher, x, compression=comp, loss="cross", solver="exact", progress=False,
                                   verbose=False)
    with torch.no_grad():
        y_t, y_s = teacher(x_test), student(x_test)
        y_n = naive(teacher, x[:1], comp, rep)(x_test)
    assert y_s.shape == y_t.shape and torch.isfinite(y_s).all()
    assert rep.params_after == count_parameters(student)
    assert rep.flops_after == count_flops(student, (1, 12, 12))
    assert any(l.action == "compressed" for l in rep.layers)
    if kind == "channel":
        assert rep.params_after < rep.params_before and rep.flops_after < rep.flops_before
        assert any(g["status"] == "pruned" for g in rep.groups)
    else:
        assert rep.params_after == rep.params_before
    assert _rel(y_s, y_t) < _rel(y_n, y_t), (_rel(y_s, y_t), _rel(y_n, y_t))


def test_groups_found_from_the_graph():
    """Residual streams, first layers, depthwise pass-through, concatenations: from the graph."""
    from cdfast.model.graph import ModelGraph

    m = zoo.build("resnet18", **TINY["resnet18"]).eval()
    g = ModelGraph(m, torch.randn(1, 1, 12, 12))
    assert g.first_layers == {"conv1"}
    tied = {x.root for x in g.groups if x.tied}
    open_ = {x.root for x in g.groups if x.prunable and not x.tied}
    assert open_ == {f"layer{i}.{j}.conv1" for i in range(1, 5) for j in range(2)}  # block-internal only
    assert "conv1" in tied
    fc = next(x for x in g.groups if x.root == "fc")
    assert not fc.prunable and "output" in fc.reason

    m = zoo.build("mobilenet_v2", **TINY["mobilenet_v2"]).eval()
    g = ModelGraph(m, torch.randn(1, 1, 12, 12))
    hidden = next(x for x in g.groups if "features.2.conv.0.0" in x.producers)
    assert hidden.passthrough == ["features.2.conv.1.0"] and hidden.consumers == ["features.2.conv.2"]

    m = zoo.build("densenet", **TINY["densenet"]).eval()
    g = ModelGraph(m, torch.randn(1, 1, 12, 12))
    stem = next(x for x in g.groups if x.root == "features.conv0")
    assert not stem.tied and len(stem.consumers) == 3  # read after every concatenation of its block

    m = zoo.build("vit", **TINY["vit"]).eval()
    g = ModelGraph(m, torch.randn(1, 1, 12, 12))
    attn = next(x for x in g.groups if "blocks.0.attn.v" in x.producers)
    assert "attention" in attn.reason


def test_prune_tied_removes_residual_channels():
    teacher = _teacher("resnet18")
    x = torch.randn(24, 1, 12, 12)
    _, rep = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), solver="exact", progress=False,
                             verbose=False)
    tied, rep_t = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), solver="exact",
                                  prune_tied=True, progress=False, verbose=False)
    assert rep_t.params_after < rep.params_after
    assert tied.conv1.out_channels == teacher.conv1.out_channels // 2  # the stream it feeds was pruned
    assert torch.isfinite(tied(x)).all()


def test_real_torchvision_resnet18():
    tv = pytest.importorskip("torchvision")
    teacher = tv.models.resnet18(num_classes=10).eval()
    x = torch.randn(4, 3, 32, 32)
    small, rep = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), policy="resnet",
                                 solver="exact", progress=False, verbose=False)
    assert count_parameters(small) < count_parameters(teacher)
    assert small.layer1[0].conv2.in_channels == 32
