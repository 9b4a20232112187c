"""CIFAR-style networks for the experiments, sized for 28×28 and 32×32 inputs.

Every network here is laid out so that a layer walker can treat it as

    stem → a sequence of blocks → global average pool → linear head

* :class:`VGG` (:func:`vgg`, :func:`small_cnn`): ``features`` is an
  ``nn.Sequential`` of per-conv blocks, each ``Sequential(conv, bn, relu[, maxpool])``;
  then ``pool`` (``AdaptiveAvgPool2d(1)``) and ``classifier`` (``nn.Linear``).
* :class:`ResNet` (:func:`resnet`): the He et al. (2016) CIFAR ResNet. ``stem`` is
  ``Sequential(conv3x3, bn, relu)``; ``blocks`` is a flat ``nn.Sequential`` of all
  ``3n`` :class:`BasicBlock` s (``stage_sizes`` says where stages begin); then
  ``pool`` and ``classifier``.

Convs followed by BN carry no bias. ReLUs are not in-place, so forward hooks see
the tensors they were given. :func:`build_model` resolves names such as
``"resnet20"``, ``"resnet56"``, ``"vgg_small"``, ``"vgg16"`` and ``"small_cnn"``.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

import torch
import torch.nn as nn

from ..model.counting import count_flops, count_parameters

__all__ = [
    "VGG_CONFIGS",
    "VGG",
    "BasicBlock",
    "ResNet",
    "vgg",
    "resnet",
    "small_cnn",
    "build_model",
    "MODEL_NAMES",
    "count_parameters",
    "count_flops",
]

#: Per-conv output widths; ``"M"`` is a 2×2 max-pool after the preceding conv.
VGG_CONFIGS: dict[str, tuple] = {
    "vgg_small": (32, 32, "M", 64, 64, "M", 128, 128, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M"),
}

#: Names :func:`build_model` accepts (plus any ``resnet{6n+2}``).
MODEL_NAMES = ("small_cnn", "vgg_small", "vgg16", "resnet20", "resnet32", "resnet44", "resnet56",
               "resnet110")


def _check_int(name: str, v, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v}")
    return v


def _check_width(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"{name}: expected a positive number, got {type(v).__name__}")
    if not v > 0:
        raise ValueError(f"{name}: expected a positive number, got {v}")
    return float(v)


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


# ------------------------------------------------------------------------ VGG


class Head(nn.Module):
    """Global average pool, flatten and the linear classifier, as one block.

    Holds references to the model's own ``pool`` and ``classifier`` (it is built on
    demand by ``cdfast_sequence`` and is not registered on the model).
    """

    def __init__(self, pool: nn.Module, classifier: nn.Module):
        super().__init__()
        self.pool, self.classifier = pool, classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(x), 1))


class VGG(nn.Module):
    """Conv3×3-BN-ReLU blocks with max-pools, global average pool and a linear head.

    ``cfg`` lists output widths, ``"M"`` marking a 2×2 max-pool (``ceil_mode=True``,
    so 28×28 inputs survive five pools: 28→14→7→4→2→1) appended to the block of
    the conv before it.
    """

    def __init__(self, cfg: Sequence, in_channels: int = 1, num_classes: int = 10):
        super().__init__()
        _check_int("in_channels", in_channels)
        _check_int("num_classes", num_classes)
        if not cfg or cfg[0] == "M":
            raise ValueError(f"cfg: expected a list of widths starting with a conv, got {cfg!r}")
        blocks: list[list[nn.Module]] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                if blocks[-1][-1].__class__ is nn.MaxPool2d:
                    raise ValueError(f"cfg: two max-pools in a row in {cfg!r}")
                blocks[-1].append(nn.MaxPool2d(2, 2, ceil_mode=True))
                continue
            _check_int("cfg", v)
            blocks.append([nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=False)])
            c = v
        self.cfg = tuple(cfg)
        self.features = nn.Sequential(*(nn.Sequential(*b) for b in blocks))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        return self.classifier(torch.flatten(self.pool(x), 1))

    def cdfast_sequence(self) -> list[nn.Module]:
        """The blocks whose composition is ``forward`` (for cdfast's linear-cost walk)."""
        return [*self.features, Head(self.pool, self.classifier)]


def vgg(depth_cfg: str = "vgg_small", in_channels: int = 1, num_classes: int = 10,
        width: float = 1.0) -> VGG:
    """A CIFAR-style VGG (``"vgg_small"``: 6 convs; ``"vgg16"``: 13 convs).

    ``width`` scales every conv's channel count (rounded, at least 1).
    """
    if not isinstance(depth_cfg, str):
        raise TypeError(f"depth_cfg: expected a str, got {type(depth_cfg).__name__}")
    if depth_cfg not in VGG_CONFIGS:
        raise ValueError(f"depth_cfg: expected one of {sorted(VGG_CONFIGS)}, got {depth_cfg!r}")
    width = _check_width("width", width)
    cfg = [v if v == "M" else max(1, int(round(v * width))) for v in VGG_CONFIGS[depth_cfg]]
    return VGG(cfg, in_channels=in_channels, num_classes=num_classes)


def small_cnn(in_channels: int = 1, num_classes: int = 10, width: int = 32) -> VGG:
    """A 4-conv :class:`VGG` for fast tests: widths ``w, M, 2w, 2w, M, 4w``."""
    w = _check_int("width", width)
    return VGG([w, "M", 2 * w, 2 * w, "M", 4 * w], in_channels=in_channels,
               num_classes=num_classes)


# --------------------------------------------------------------------- ResNet


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    ``downsample`` is ``Sequential(conv1×1(stride), BN)`` when the shape changes,
    else ``None`` (identity shortcut).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=False)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(out + shortcut)


class ResNet(nn.Module):
    """The CIFAR ResNet of He et al.: depth ``6n+2``, stages of widths ``w, 2w, 4w``."""

    def __init__(self, depth: int = 20, in_channels: int = 1, num_classes: int = 10,
                 width: int = 16):
        super().__init__()
        _check_int("depth", depth, 8)
        if (depth - 2) % 6:
            raise ValueError(f"depth: expected 6n+2 (20, 32, 44, 56, 110, …), got {depth}")
        _check_int("in_channels", in_channels)
        _check_int("num_classes", num_classes)
        _check_int("width", width)
        n = (depth - 2) // 6
        widths = (width, 2 * width, 4 * width)
        self.depth = depth
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=False))
        blocks = []
        in_planes = width
        for s, planes in enumerate(widths):
            for i in range(n):
                stride = 2 if (s > 0 and i == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
        #: blocks per stage; stage s is ``blocks[sum(stage_sizes[:s]) : sum(stage_sizes[:s+1])]``.
        self.stage_sizes = (n, n, n)
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(in_planes, num_classes)
        _init_weights(self)

    @property
    def stages(self) -> list[nn.Sequential]:
        """The three stages as views onto ``blocks`` (not registered twice)."""
        out, start = [], 0
        for size in self.stage_sizes:
            out.append(self.blocks[start:start + size])
            start += size
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        return self.classifier(torch.flatten(self.pool(x), 1))

    def cdfast_sequence(self) -> list[nn.Module]:
        """The blocks whose composition is ``forward`` (for cdfast's linear-cost walk)."""
        return [self.stem, *self.blocks, Head(self.pool, self.classifier)]


def resnet(depth: int = 20, in_channels: int = 1, num_classes: int = 10, width: int = 16) -> ResNet:
    """CIFAR ResNet-``depth`` (``depth = 6n+2``; 20 and 56 are the usual ones).

    ``width`` is the first stage's width (16 in the paper); stages are ``w, 2w, 4w``.
    """
    return ResNet(depth=depth, in_channels=in_channels, num_classes=num_classes, width=width)


# ------------------------------------------------------------------- registry


def build_model(name: str, in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """A network by name: ``"small_cnn"``, ``"vgg_small"``, ``"vgg16"`` or ``"resnet{6n+2}"``."""
    if not isinstance(name, str):
        raise TypeError(f"name: expected a str, got {type(name).__name__}")
    if name == "small_cnn":
        return small_cnn(in_channels=in_channels, num_classes=num_classes)
    if name in VGG_CONFIGS:
        return vgg(name, in_channels=in_channels, num_classes=num_classes)
    m = re.fullmatch(r"resnet(\d+)", name)
    if m and int(m.group(1)) >= 8 and (int(m.group(1)) - 2) % 6 == 0:
        return resnet(int(m.group(1)), in_channels=in_channels, num_classes=num_classes)
    raise ValueError(f"name: unknown model {name!r}; expected one of {', '.join(MODEL_NAMES)} "
                     f"or resnet{{6n+2}}")
