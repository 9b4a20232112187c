"""Model size: parameters and FLOPs, for the compression report."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

__all__ = ["count_parameters", "count_flops"]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (BN affine parameters included, buffers not)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_flops(model: nn.Module, input_shape: Sequence[int], *, batched: bool | None = None) -> int:
    """FLOPs of one forward pass of one sample, counted as 2 × multiply-accumulates.

    Only ``nn.Conv2d`` and ``nn.Linear`` are counted (biases, BN, activations and
    pooling are not): a conv contributes ``C_out·H_out·W_out·(C_in/groups)·k_h·k_w``
    MACs, a linear layer ``out_features·in_features`` MACs per input row. Counting
    uses forward hooks on a zero input; weights count dense (a zeroed weight is
    still counted, a removed channel is not).

    Args:
        model: the network (run in eval mode under ``no_grad``; its mode is restored).
        input_shape: ``(C, H, W)`` or ``(features,)`` for one sample, or
            ``(N, C, H, W)`` (the count is then divided by ``N``).
        batched: whether ``input_shape`` starts with the batch size ``N``; ``None``
            infers it as above. ``compress`` passes ``(1, *sample_shape)`` with
            ``batched=True``, which fits inputs of any rank (sequences too).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise TypeError(f"input_shape: expected a sequence of ints, got {input_shape!r}") from None
    if batched is not None and not isinstance(batched, bool):
        raise TypeError(f"batched: expected a bool or None, got {type(batched).__name__}")
    if not shape or any(s < 1 for s in shape) or (batched and len(shape) < 2):
        raise ValueError(f"input_shape: expected positive sizes (C, H, W), (features,) or (N, C, H, W), got {shape}")
    if batched is None:
        batched = len(shape) not in (1, 3)
    if not batched:
        shape = (1,) + shape
    batch = shape[0]
    macs = 0

    def conv_hook(m: nn.Conv2d, inp, out):
        nonlocal macs
        kh, kw = m.kernel_size
        macs += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Linear, inp, out):
        nonlocal macs
        macs += out.numel() * m.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    p = next(model.parameters(), None)
    x = torch.zeros(shape, device=p.device if p is not None else None,
                    dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32)
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return 2 * macs // batch
