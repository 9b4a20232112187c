"""Model surgery: really remove pruned channels, and fold BatchNorm.

When layer ``l`` keeps only some input channels, the layer that produces them
(``l−1``, found as the nearest preceding ``Conv2d`` in execution order with only
channel-wise modules in between: BatchNorm, ReLU, pooling, dropout) can drop the
matching output channels, its bias entries and those of the BatchNorm between
them. The result is a plain ``nn.Module`` with fewer parameters and FLOPs.

Structure is inferred from execution order, so every removal is checked: the
shrunk model must give the masked model's outputs on a probe batch, otherwise
that removal is undone and reported (a residual connection, for example, makes a
channel removal invalid; cdfast's ResNet policy only prunes block-internal
channels for that reason).
"""
from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["shrink_channels", "replace_module", "fold_batchnorm"]

CHANNELWISE = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.MaxPool2d, nn.AvgPool2d,
               nn.AdaptiveAvgPool2d, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Hardtanh, nn.SiLU, nn.GELU)


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _producer(model: nn.Module, leaves: list[str], consumer: str):
    """(producer conv name, [batchnorm names]) or None when the path is not channel-wise."""
    i = leaves.index(consumer)
    bns = []
    for name in reversed(leaves[:i]):
        m = model.get_submodule(name)
        if isinstance(m, nn.Conv2d):
            return (name, bns) if m.groups == 1 else None
        if isinstance(m, nn.BatchNorm2d):
            bns.append(name)
        elif not isinstance(m, CHANNELWISE):
            return None
    return None


def _narrow_conv_in(conv: nn.Module, keep: torch.Tensor) -> nn.Module:
    if isinstance(conv, nn.Linear):
        new = nn.Linear(len(keep), conv.out_features, bias=conv.bias is not None)
    else:
        new = nn.Conv2d(len(keep), conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                        conv.dilation, 1, conv.bias is not None, conv.padding_mode)
    new = new.to(conv.weight)
    with torch.no_grad():
        new.weight.copy_(conv.weight[:, keep])
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def _narrow_conv_out(conv: nn.Conv2d, keep: torch.Tensor) -> nn.Conv2d:
    new = nn.Conv2d(conv.in_channels, len(keep), conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, 1, conv.bias is not None, conv.padding_mode).to(conv.weight)
    with torch.no_grad():
        new.weight.copy_(conv.weight[keep])
        if conv.bias is not None:
            new.bias.copy_(conv.bias[keep])
    return new


def _narrow_bn(bn: nn.BatchNorm2d, keep: torch.Tensor) -> nn.BatchNorm2d:
    new = nn.BatchNorm2d(len(keep), bn.eps, bn.momentum, bn.affine, bn.track_running_stats).to(
        bn.running_mean if bn.running_mean is not None else bn.weight)
    with torch.no_grad():
        if bn.affine:
            new.weight.copy_(bn.weight[keep])
            new.bias.copy_(bn.bias[keep])
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean[keep])
            new.running_var.copy_(bn.running_var[keep])
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
    new.train(bn.training)
    return new


def shrink_channels(model: nn.Module, kept: dict[str, torch.Tensor], leaves: list[str],
                    probe: torch.Tensor, rtol: float = 1e-4) -> dict[str, str]:
    """Remove pruned input channels in place. ``kept[name]`` are the consumer's kept channels.

    Returns, per consumer, ``"removed"`` or the reason it was left masked.
    """
    status: dict[str, str] = {}
    was_training = model.training
    model.eval()
    with torch.no_grad():
        reference = model(probe)
    scale = float(reference.abs().max()) or 1.0
    for consumer, keep in kept.items():
        cons = model.get_submodule(consumer)
        if getattr(cons, "groups", 1) != 1:
            status[consumer] = "kept masked: grouped convolution"
            continue
        found = _producer(model, leaves, consumer)
        if found is None:
            status[consumer] = "kept masked: no channel-wise path to a producing Conv2d"
            continue
        prod_name, bn_names = found
        prod = model.get_submodule(prod_name)
        if prod.out_channels != (cons.in_channels if isinstance(cons, nn.Conv2d) else cons.in_features):
            status[consumer] = "kept masked: producer width differs (already shrunk or reshaped)"
            continue
        keep = keep.to(cons.weight.device)
        saved = {n: model.get_submodule(n) for n in [consumer, prod_name, *bn_names]}
        replace_module(model, consumer, _narrow_conv_in(cons, keep))
        replace_module(model, prod_name, _narrow_conv_out(prod, keep))
        for n in bn_names:
            replace_module(model, n, _narrow_bn(saved[n], keep))
        try:
            with torch.no_grad():
                out = model(probe)
            ok = out.shape == reference.shape and float((out - reference).abs().max()) <= rtol * scale
        except RuntimeError:
            ok = False
        if ok:
            status[consumer] = "removed"
        else:
            for n, m in saved.items():
                replace_module(model, n, m)
            status[consumer] = "kept masked: removal changed the outputs (e.g. a residual connection)"
    model.train(was_training)
    return status


def fold_batchnorm(model: nn.Module, leaves: list[str]) -> list[str]:
    """Fold every eval-mode BatchNorm2d into the Conv2d that directly precedes it."""
    folded = []
    for i, name in enumerate(leaves):
        bn = model.get_submodule(name)
        if not isinstance(bn, nn.BatchNorm2d) or i == 0:
            continue
        conv = model.get_submodule(leaves[i - 1])
        if not isinstance(conv, nn.Conv2d) or conv.out_channels != bn.num_features:
            continue
        with torch.no_grad():
            s = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
            new = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                            conv.dilation, conv.groups, True, conv.padding_mode).to(conv.weight)
            new.weight.copy_(conv.weight * s.view(-1, 1, 1, 1))
            new.bias.copy_((bias - bn.running_mean) * s + bn.bias)
        replace_module(model, leaves[i - 1], new)
        replace_module(model, name, nn.Identity())
        folded.append(name)
    return folded
