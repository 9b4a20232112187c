"""The model walk: which layers run in which order, and where each one's inputs come from.

cdfast never traces a graph. It runs the model once with forward hooks to learn the
execution order of its ``Conv2d``/``Linear`` layers (and of the ``BatchNorm`` layers
that follow them), and captures a layer's input with a hook that stops the forward
pass as soon as the input is seen.

:func:`cdfast.compress` re-runs both models from the input for every layer (quadratic
in depth, but it works on any forward, and channels removed mid-walk never leave a
stale cached activation). :func:`as_sequence` gives a network's blocks (an
``nn.Sequential``, or a ``cdfast_sequence()`` method returning the blocks whose
composition is its forward) to FSKD.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

__all__ = ["execution_order", "as_sequence", "capture_input", "calibration_batches", "StopForward"]

COMPRESSIBLE = (nn.Conv2d, nn.Linear)


class StopForward(Exception):
    """Raised by a capture hook to end a forward pass early."""


def execution_order(model: nn.Module, example: torch.Tensor) -> tuple[list[str], list[str]]:
    """Names of the compressible layers, and of all leaf modules, in the order they run."""
    names = {m: n for n, m in model.named_modules()}
    order: list[str] = []
    leaves: list[str] = []
    handles = []

    def hook(module, inputs, output):
        name = names[module]
        leaves.append(name)
        if isinstance(module, COMPRESSIBLE) and name not in order:
            order.append(name)

    for m in model.modules():
        if not list(m.children()):
            handles.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return order, leaves


def as_sequence(model: nn.Module) -> list[nn.Module] | None:
    """The model as a list of blocks whose composition is its forward, or None."""
    if hasattr(model, "cdfast_sequence"):
        return list(model.cdfast_sequence())
    if isinstance(model, nn.Sequential):
        out: list[nn.Module] = []
        for child in model:
            sub = as_sequence(child) if isinstance(child, nn.Sequential) else None
            out.extend(sub if sub is not None else [child])
        return out
    return None


def capture_input(run: Callable[[], object], layer: nn.Module) -> torch.Tensor:
    """Run ``run()`` until ``layer`` is called; return the layer's input (detached)."""
    box: list[torch.Tensor] = []

    def hook(module, inputs):
        box.append(inputs[0].detach())
        raise StopForward

    handle = layer.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            run()
    except StopForward:
        pass
    finally:
        handle.remove()
    if not box:
        raise RuntimeError(f"layer {layer} was not called by the forward pass")
    return box[0]


def calibration_batches(data, batch_size: int) -> list[torch.Tensor]:
    """Calibration inputs as a list of tensors (labels, if any, are dropped)."""
    if isinstance(data, torch.Tensor):
        return [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    out = []
    for item in data:
        x = item[0] if isinstance(item, (tuple, list)) else item
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"data: expected tensors or (input, label) batches, got {type(x).__name__}")
        out.append(x)
    return out

