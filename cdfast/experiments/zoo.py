"""Small, faithful replicas of the architectures people bring to ``cdfast.compress``.

Each follows the layout of its usual implementation (torchvision's ResNet, ResNeXt,
MobileNetV2, EfficientNet and DenseNet, the ConvNeXt and ViT of their papers, a
UNet, a plain MLP) at tiny widths, so the tests can compress every one of them in
seconds and the foreign-model experiment can train them on Fashion-MNIST
(1×28×28) in minutes. None has a ``cdfast_sequence`` or layer names that cdfast
knows: they exercise the graph-based walk as a user's model would.

:func:`build` makes one by name (:data:`ZOO`).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ZOO", "build", "mlp", "resnet18", "resnet50", "resnext", "mobilenet_v2", "efficientnet",
           "densenet", "convnext", "vit", "unet"]


def _bn_init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


# -------------------------------------------------------------------- ResNets
class BasicBlock(nn.Module):
    """torchvision's ``BasicBlock``: one ReLU module called twice, a ``downsample`` branch."""

    expansion = 1

    def __init__(self, c_in: int, planes: int, stride: int = 1, groups: int = 1, base: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or c_in != planes:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's ``Bottleneck`` (ResNet-50); ``groups > 1`` makes it ResNeXt's."""

    expansion = 4

    def __init__(self, c_in: int, planes: int, stride: int = 1, groups: int = 1, base: int = 64):
        super().__init__()
        width = int(planes * (base / 64.0)) * groups
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or c_in != planes * 4:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, planes * 4, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes * 4))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ``ResNet``: 7×7/2 stem, max-pool, four stages, average pool, ``fc``."""

    def __init__(self, block, layers, width: int = 8, in_channels: int = 1, num_classes: int = 10,
                 groups: int = 1, base: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        c = width
        for i, n in enumerate(layers):
            planes = width * 2 ** i
            blocks = []
            for j in range(n):
                blocks.append(block(c, planes, 2 if (i > 0 and j == 0) else 1, groups, base))
                c = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.n_stages = len(layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(c, num_classes)
        _bn_init(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.n_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet18(width: int = 8, in_channels: int = 1, num_classes: int = 10, layers=(2, 2, 2, 2)) -> ResNet:
    return ResNet(BasicBlock, layers, width, in_channels, num_classes)


def resnet50(width: int = 4, in_channels: int = 1, num_classes: int = 10, layers=(3, 4, 6, 3)) -> ResNet:
    return ResNet(Bottleneck, layers, width, in_channels, num_classes)


def resnext(width: int = 4, in_channels: int = 1, num_classes: int = 10, layers=(1, 1, 1, 1),
            groups: int = 4, base: int = 32) -> ResNet:
    """ResNeXt: bottlenecks whose 3×3 conv is grouped (``groups`` × ``planes·base/64`` wide)."""
    return ResNet(Bottleneck, layers, width, in_channels, num_classes, groups, base)


# ---------------------------------------------------------------- MobileNetV2
def _conv_bn_act(c_in, c_out, k=3, stride=1, groups=1, act=nn.ReLU6):
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), act(inplace=True))


class InvertedResidual(nn.Module):
    """torchvision's MobileNetV2 block: 1×1 expand, 3×3 depthwise, 1×1 linear projection."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        self.use_res = stride == 1 and c_in == c_out
        layers = [] if expand == 1 else [_conv_bn_act(c_in, hidden, 1)]
        layers += [_conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8,
                 setting=((1, 1, 1, 1), (6, 1.5, 2, 2), (6, 2, 2, 2), (6, 3, 1, 1)), last: int = 64):
        super().__init__()
        feats = [_conv_bn_act(in_channels, width, 3, 1)]
        c = width
        for t, mult, n, s in setting:
            out = int(round(width * mult))
            for i in range(n):
                feats.append(InvertedResidual(c, out, s if i == 0 else 1, t))
                c = out
        feats.append(_conv_bn_act(c, last, 1))
        self.features = nn.Sequential(*feats)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        _bn_init(self)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(width: int = 8, in_channels: int = 1, num_classes: int = 10) -> MobileNetV2:
    return MobileNetV2(in_channels, num_classes, width)


# --------------------------------------------------------------- EfficientNet
class SqueezeExcitation(nn.Module):
    """torchvision's ``SqueezeExcitation``: pool, 1×1 reduce, SiLU, 1×1 expand, sigmoid gate."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = nn.SiLU()
        self.scale_activation = nn.Sigmoid()

    def forward(self, x):
        s = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return x * s


class MBConv(nn.Module):
    """EfficientNet's MBConv: expand, depthwise, squeeze-and-excitation, project, SiLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, expand: int, kernel: int = 3):
        super().__init__()
        hidden = c_in * expand
        layers = [] if expand == 1 else [_conv_bn_act(c_in, hidden, 1, act=nn.SiLU)]
        layers += [_conv_bn_act(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU),
                   SqueezeExcitation(hidden, max(1, c_in // 4)),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.block = nn.Sequential(*layers)
        self.use_res = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.block(x) if self.use_res else self.block(x)


class EfficientNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 8,
                 setting=((1, 1, 1, 1, 3), (4, 1.5, 2, 2, 3), (4, 2, 2, 2, 5)), last: int = 64):
        super().__init__()
        feats = [_conv_bn_act(in_channels, width, 3, 1, act=nn.SiLU)]
        c = width
        for t, mult, n, s, k in setting:
            out = int(round(width * mult))
            for i in range(n):
                feats.append(MBConv(c, out, s if i == 0 else 1, t, k))
                c = out
        feats.append(_conv_bn_act(c, last, 1, act=nn.SiLU))
        self.features = nn.Sequential(*feats)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(last, num_classes))
        _bn_init(self)

    def forward(self, x):
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def efficientnet(width: int = 8, in_channels: int = 1, num_classes: int = 10) -> EfficientNet:
    return EfficientNet(in_channels, num_classes, width)


# ------------------------------------------------------------------- DenseNet
class DenseLayer(nn.Module):
    """torchvision's ``_DenseLayer``: BN-ReLU-1×1 bottleneck, BN-ReLU-3×3, on the concatenation."""

    def __init__(self, c_in: int, growth: int, bn_size: int = 4):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(c_in)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(c_in, bn_size * growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(bn_size * growth, growth, 3, 1, 1, bias=False)

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat(features, 1)
        return self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))


class DenseBlock(nn.ModuleDict):
    def __init__(self, n: int, c_in: int, growth: int):
        super().__init__()
        for i in range(n):
            self.add_module(f"denselayer{i + 1}", DenseLayer(c_in + i * growth, growth))

    def forward(self, x):
        features = [x]
        for layer in self.values():
            features.append(layer(features))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm = nn.BatchNorm2d(c_in)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(c_in, c_out, 1, bias=False)
        self.pool = nn.AvgPool2d(2, 2)


class DenseNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, growth: int = 4, blocks=(2, 2),
                 init: int = 8):
        super().__init__()
        feats = nn.Sequential()
        feats.add_module("conv0", nn.Conv2d(in_channels, init, 3, 1, 1, bias=False))
        feats.add_module("norm0", nn.BatchNorm2d(init))
        feats.add_module("relu0", nn.ReLU(inplace=True))
        c = init
        for i, n in enumerate(blocks):
            feats.add_module(f"denseblock{i + 1}", DenseBlock(n, c, growth))
            c += n * growth
            if i != len(blocks) - 1:
                feats.add_module(f"transition{i + 1}", Transition(c, c // 2))
                c //= 2
        feats.add_module("norm5", nn.BatchNorm2d(c))
        self.features = feats
        self.classifier = nn.Linear(c, num_classes)
        _bn_init(self)

    def forward(self, x):
        x = F.relu(self.features(x))
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def densenet(growth: int = 4, in_channels: int = 1, num_classes: int = 10, blocks=(2, 2)) -> DenseNet:
    return DenseNet(in_channels, num_classes, growth, blocks)


# ------------------------------------------------------------------- ConvNeXt
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an ``N×C×H×W`` tensor (timm's ``LayerNorm2d``)."""

    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class ConvNeXtBlock(nn.Module):
    """Depthwise 7×7, LayerNorm (channels last), Linear 4× MLP with GELU, layer scale, residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(0.5 * torch.ones(dim))

    def forward(self, x):
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + (self.gamma * y).permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 10, dims=(8, 16), depths=(1, 1)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dims[0], 4, 4), LayerNorm2d(dims[0], eps=1e-6))
        stages = []
        for i, (d, n) in enumerate(zip(dims, depths)):
            down = [] if i == 0 else [LayerNorm2d(dims[i - 1], eps=1e-6), nn.Conv2d(dims[i - 1], d, 2, 2)]
            stages.append(nn.Sequential(*down, *[ConvNeXtBlock(d) for _ in range(n)]))
        self.stages = nn.Sequential(*stages)
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head = nn.Linear(dims[-1], num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.2)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.stages(self.stem(x))
        return self.head(self.norm(x.mean((-2, -1))))


def convnext(dims=(8, 16), in_channels: int = 1, num_classes: int = 10, depths=(1, 1)) -> ConvNeXt:
    return ConvNeXt(in_channels, num_classes, dims, depths)


# ------------------------------------------------------------------------ ViT
class Attention(nn.Module):
    """Multi-head self-attention with separate q/k/v projections and an output ``proj``.

    The head width is read from the projections at run time (``reshape(…, heads, -1)``)
    and the softmax temperature is fixed at construction, so a model whose head
    dimensions were pruned stays the same function of its weights.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, _ = x.shape
        q = self.q(x).reshape(B, N, self.heads, -1).transpose(1, 2)
        k = self.k(x).reshape(B, N, self.heads, -1).transpose(1, 2)
        v = self.v(x).reshape(B, N, self.heads, -1).transpose(1, 2)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, -1))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: int = 2):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp_ratio * dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(mlp_ratio * dim, dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.fc2(self.act(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    """Patch-embedding conv, class token, learned position embedding, pre-norm blocks, head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image: int = 28, patch: int = 7,
                 dim: int = 16, depth: int = 2, heads: int = 2):
        super().__init__()
        self.patch_embed = nn.Conv2d(in_channels, dim, patch, patch)
        n = (image // patch) ** 2
        self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, n + 1, dim))
        self.blocks = nn.Sequential(*[ViTBlock(dim, heads) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])


def vit(dim: int = 16, in_channels: int = 1, num_classes: int = 10, image: int = 28, patch: int = 7,
        depth: int = 2, heads: int = 2) -> ViT:
    return ViT(in_channels, num_classes, image, patch, dim, depth, heads)


# ----------------------------------------------------------------------- UNet
class DoubleConv(nn.Sequential):
    def __init__(self, c_in: int, c_out: int):
        super().__init__(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                         nn.ReLU(inplace=True), nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class UNet(nn.Module):
    """Encoder–decoder with skip concatenations (bilinear upsampling, as the common PyTorch UNet)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, base: int = 8, depth: int = 2):
        super().__init__()
        self.inc = DoubleConv(in_channels, base)
        self.down = nn.ModuleList()
        c, widths = base, [base]
        for _ in range(depth):
            self.down.append(nn.Sequential(nn.MaxPool2d(2), DoubleConv(c, 2 * c)))
            c *= 2
            widths.append(c)
        self.up = nn.ModuleList()
        for skip in reversed(widths[:-1]):
            self.up.append(DoubleConv(c + skip, skip))
            c = skip
        self.outc = nn.Conv2d(c, num_classes, 1)

    def forward(self, x):
        skips = [self.inc(x)]
        for d in self.down:
            skips.append(d(skips[-1]))
        y = skips.pop()
        for u in self.up:
            s = skips.pop()
            y = F.interpolate(y, size=s.shape[-2:], mode="bilinear", align_corners=False)
            y = u(torch.cat([s, y], 1))
        return self.outc(y)


def unet(base: int = 8, in_channels: int = 1, num_classes: int = 10, depth: int = 2) -> UNet:
    return UNet(in_channels, num_classes, base, depth)


# ------------------------------------------------------------------------ MLP
def mlp(hidden=(64, 32), in_features: int = 784, num_classes: int = 10) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    c = in_features
    for h in hidden:
        layers += [nn.Linear(c, h), nn.ReLU()]
        c = h
    layers.append(nn.Linear(c, num_classes))
    return nn.Sequential(*layers)


#: name → builder (tiny defaults, 1×28×28 inputs, 10 classes).
ZOO = {"mlp": mlp, "resnet18": resnet18, "resnet50": resnet50, "resnext": resnext, "mobilenet_v2": mobilenet_v2,
       "efficientnet": efficientnet, "densenet": densenet, "convnext": convnext, "vit": vit, "unet": unet}


def build(name: str, **kw) -> nn.Module:
    """A replica by name (see :data:`ZOO`); keyword arguments go to its builder."""
    if not isinstance(name, str) or name not in ZOO:
        raise ValueError(f"name: expected one of {sorted(ZOO)}, got {name!r}")
    return ZOO[name](**kw)
