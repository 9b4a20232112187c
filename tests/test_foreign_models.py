"""Models cdfast did not define: torchvision-style ResNets, walked by forward hooks.

These have no ``cdfast_sequence``: a shared ReLU called twice per block, a
``downsample`` branch, ``torch.flatten`` in ``forward``. ``compress`` must walk them
by recomputing from the input, say so in the report, and still remove the
block-internal channels physically. The real torchvision model is tried when
torchvision is installed (it has no CPU build on the project's CI machine).
"""
import pytest
import torch
import torch.nn as nn

import cdfast
from cdfast.experiments.models import count_parameters


class BasicBlock(nn.Module):  # the layout of torchvision.models.resnet.BasicBlock
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):  # the layout of torchvision.models.resnet.Bottleneck
    def __init__(self, c_in, width, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != 4 * width:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, 4 * width, 1, stride, bias=False),
                                            nn.BatchNorm2d(4 * width))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class TorchvisionStyleResNet(nn.Module):
    def __init__(self, block, widths, num_classes=7):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c, layers = 8, []
        for i, w in enumerate(widths):
            blk = block(c, w, stride=1 if i == 0 else 2)
            c = w if block is BasicBlock else 4 * w
            layers.append(nn.Sequential(blk))
        self.layer1, self.layer2 = layers
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer2(self.layer1(x))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def _randomise_bn(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
    return model.eval()


@pytest.mark.parametrize("block, internal", [(BasicBlock, ("conv2",)), (Bottleneck, ("conv2", "conv3"))])
def test_torchvision_style_resnet_is_walked_and_shrunk(block, internal):
    torch.manual_seed(0)
    teacher = _randomise_bn(TorchvisionStyleResNet(block, (8, 12)))
    x = torch.randn(24, 3, 16, 16)
    small, rep = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), policy="resnet",
                                 solver="exact", loss="cross", mu=0.9, progress=False, verbose=False)
    assert rep.walk.startswith("recompute-from-input")
    compressed = {l.name for l in rep.layers if l.action == "compressed"}
    assert compressed == {f"layer{i}.0.{c}" for i in (1, 2) for c in internal}
    assert set(rep.shrink.values()) == {"removed"}
    for name in compressed:  # physically narrower, and the producer lost the same channels
        conv = small.get_submodule(name)
        full = teacher.get_submodule(name)
        assert conv.in_channels == full.in_channels // 2
    assert small.conv1.out_channels == teacher.conv1.out_channels  # residual paths untouched
    assert rep.params_after == count_parameters(small) < count_parameters(teacher)
    with torch.no_grad():
        y_t, y_s = teacher(x), small(x)
    rel = ((y_s - y_t).norm() / y_t.norm()).item()
    assert torch.isfinite(y_s).all() and rel < 0.5, rel


def test_real_torchvision_resnet18():
    tv = pytest.importorskip("torchvision")
    teacher = _randomise_bn(tv.models.resnet18(num_classes=10))
    x = torch.randn(4, 3, 32, 32)
    small, rep = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), policy="resnet",
                                 solver="exact", progress=False, verbose=False)
    assert rep.walk.startswith("recompute-from-input")
    assert count_parameters(small) < count_parameters(teacher)
    assert small.layer1[0].conv2.in_channels == 32
