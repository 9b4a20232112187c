r"""Block-wise refinement: after the layer-wise pass, fit each block of the student to
the teacher's block as a whole.

The layer-wise fit (:func:`cdfast.compress`) matches each layer's linear output; the
nonlinearities, BatchNorms and residual additions between layers are left to follow.
A *block* ``B`` (a residual block, a conv–BN–ReLU stage) is fit to its teacher block
on the features each actually sees, without labels:

    min over the block's layer weights   Σ_n ‖ B_S(h^S_n) − B_T(h^T_n) ‖² / numel

with ``h^T`` the teacher block's input on the teacher, ``h^S`` the student block's input
on the student (refined up to it): the ``nc`` loss one level up. Blocks are fit in
module order, each by ``steps`` full-batch Adam steps on the calibration samples
(label-free views from ``augment`` add rows, as in :mod:`cdfast.model.augment`).
Where a block's output lost channels (a VGG stage whose successor was pruned), the
teacher's output is restricted to the kept channels (``kept_outputs``).
BatchNorms stay in eval mode and are not trained; exact zeros of a weight (weight
pruning, N:M) stay zero; quantized layers are frozen (their weights stay on the
grid). A block whose loss does not fall keeps its layer-wise weights.

Blocks are found from the module tree (:func:`find_blocks`): the children of every
``nn.Sequential``/``nn.ModuleList`` that hold a layer to refine (a ResNet's basic
blocks, a VGG's conv–BN–ReLU stages), and the layers outside any such container
alone. A block must be called once per forward, with one tensor in and one out;
the others are left as the layer-wise pass made them, with the reason in the report.

On ResNet-20 with half the block-internal channels removed, from 10 images, 500
steps at ``lr = 3e-4`` with ``augment="flip+shift+mix"`` took ``loss="auto"`` from 90.00
to 91.68 % (three draws; the teacher: 92.47 %; ``docs/RESULTS.md``).
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .._validation import check_bool, check_positive_int, check_tensor
from .augment import check_augment, views
from .walk import calibration_batches

__all__ = ["BlockReport", "find_blocks", "refine_blocks"]

#: Adam steps and learning rate of :func:`refine_blocks` (measured on ResNet-20 at K = 1).
REFINE_STEPS, REFINE_LR = 500, 3e-4

_CONTAINERS = (nn.Sequential, nn.ModuleList)
_LAYERS = (nn.Conv2d, nn.Linear)


@dataclass
class BlockReport:
    """What refinement did to one block: its mean squared error against the teacher's
    block on the calibration samples before and after, or why it was left."""

    name: str
    layers: list[str] = field(default_factory=list)
    loss_before: float | None = None   # None: not refined (see ``reason``)
    loss_after: float | None = None
    kept: bool = False       # True: the refined weights were kept (the loss fell)
    reason: str = ""         # why the block was not refined, if it was not
    seconds: float = 0.0

    def line(self) -> str:
        if self.reason:
            return f"{self.name}: not refined ({self.reason})"
        verdict = "kept" if self.kept else "no gain, layer-wise weights kept"
        return (f"{self.name}: block error {self.loss_before:.4g} -> {self.loss_after:.4g} ({verdict}; "
                f"{len(self.layers)} layers, {self.seconds:.1f} s)")


def find_blocks(model: nn.Module, layers: Iterable[str]) -> list[tuple[str, list[str]]]:
    """The blocks of ``model`` that hold some of ``layers`` (names of Conv2d/Linear
    modules), in module order, each with the layers it holds.

    A module is split into its children unless it is a child of a container
    (``nn.Sequential``/``nn.ModuleList``), in which case it is one block; a layer
    reached outside any container is a block of its own.
    """
    wanted = set(layers)
    blocks: list[tuple[str, list[str]]] = []

    def held(prefix: str) -> list[str]:
        return [n for n, _ in model.named_modules()
                if n in wanted and (not prefix or n == prefix or n.startswith(prefix + "."))]

    def visit(prefix: str, module: nn.Module, in_container: bool) -> None:
        inside = held(prefix)
        if not inside:
            return
        if in_container or isinstance(module, _LAYERS) or not list(module.children()):
            blocks.append((prefix, inside))
            return
        for child, sub in module.named_children():
            visit(f"{prefix}.{child}" if prefix else child, sub, isinstance(module, _CONTAINERS))

    visit("", model, False)
    return blocks


def _calls(model: nn.Module, module: nn.Module, x: torch.Tensor) -> tuple[int, bool]:
    """How often ``module`` runs in one forward of ``model`` on ``x``, and whether every
    call took one tensor and returned one tensor."""
    calls, plain = [], []

    def hook(_, args, kwargs, out):
        calls.append(1)
        plain.append(len(args) == 1 and not kwargs and isinstance(args[0], torch.Tensor)
                     and isinstance(out, torch.Tensor))

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return len(calls), all(plain)


def _block_io(model: nn.Module, block: nn.Module, batches: list[torch.Tensor], output: bool):
    """The input (and output) of ``block`` on every batch, detached."""
    ins, outs = [], []

    def hook(_, args, out):
        ins.append(args[0].detach())
        outs.append(out.detach())

    handle = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        handle.remove()
    return (ins, outs) if output else ins


def _mse(block: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor], total: int,
         backward: bool) -> float:
    """Mean squared error of ``block`` on ``inputs`` against ``targets`` (gradients
    accumulated batch by batch when ``backward``)."""
    loss_sum = 0.0
    for h, y in zip(inputs, targets):
        with torch.set_grad_enabled(backward):
            loss = (block(h) - y).pow(2).sum() / total
        if backward:
            loss.backward()
        loss_sum += float(loss.detach())
    return loss_sum


def refine_blocks(teacher: nn.Module, student: nn.Module, data, *, steps: int = REFINE_STEPS,
                  lr: float = REFINE_LR, augment=None, layers: Iterable[str] | None = None,
                  frozen: Iterable[str] = (), kept_outputs: dict | None = None, batch_size: int = 256,
                  progress: bool = True) -> list[BlockReport]:
    """Fit each block of ``student`` to the teacher's block (module docstring); in place.

    Args:
        teacher: the trained network (not changed).
        student: its compressed copy (:func:`cdfast.compress`'s first result): the same
            module tree, with fewer channels or other weights.
        data: calibration inputs, as for :func:`cdfast.compress`. Labels are never used.
        steps: Adam steps per block (each over all samples).
        lr: Adam's learning rate.
        augment: label-free views of ``data`` to fit on as well (``"mix"``,
            ``"flip+shift+mix"`` …, :func:`cdfast.model.augment.views`).
        layers: the Conv2d/Linear layers whose weights may change (default: every one
            except ``frozen`` and those that read the model's input).
        frozen: layers that keep their weights (``compress`` passes its quantized ones).
        kept_outputs: layer → the teacher's output channels it kept
            (``report.kept_outputs`` of :func:`cdfast.compress`): a block whose output
            lost channels is compared with those channels of the teacher's block.
        batch_size: samples per forward.
        progress: a progress bar over the blocks.

    Returns:
        One :class:`BlockReport` per block, in module order (each block is fit on the
        student as refined so far).
    """
    if not isinstance(teacher, nn.Module) or not isinstance(student, nn.Module):
        bad = "teacher" if not isinstance(teacher, nn.Module) else "student"
        raise TypeError(f"{bad}: expected an nn.Module, got {type(teacher if bad == 'teacher' else student).__name__}")
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < float("inf"):
        raise ValueError(f"lr: expected a positive finite number, got {lr!r}")
    check_augment(augment)
    check_bool("progress", progress)
    frozen = set(frozen)
    batches = calibration_batches(data, batch_size)
    if not batches or sum(len(b) for b in batches) == 0:
        raise ValueError("data: expected at least one calibration sample, got none")
    for b in batches:
        check_tensor("data", b)
    if augment is not None:
        batches = list(views(torch.cat(batches), augment).split(batch_size))
    modules = dict(student.named_modules())
    if layers is None:  # what compress fits by default: every layer but those that read the input
        from .graph import ModelGraph
        from .walk import execution_order

        order, _ = execution_order(student, batches[0][:1])
        first = ModelGraph(student, batches[0][:1]).first_layers
        layers = [n for n in order if n not in first]
    layers = [n for n in layers if n not in frozen]
    for n in layers:
        if not isinstance(modules.get(n), _LAYERS):
            raise ValueError(f"layers: {n!r} is not an nn.Conv2d or nn.Linear of the student")
    teacher_mode, student_mode = teacher.training, student.training
    teacher.eval(), student.eval()
    reports: list[BlockReport] = []
    from tqdm.auto import tqdm

    blocks = find_blocks(student, layers)
    try:
        for name, inside in tqdm(blocks, desc="cdfast refine", disable=not progress, unit="block"):
            reports.append(_refine_one(teacher, student, name, inside, batches, steps, lr, kept_outputs or {}))
    finally:
        teacher.train(teacher_mode), student.train(student_mode)
    return reports


def _kept_channels(inside: list[str], kept_outputs: dict, width: int) -> torch.Tensor | None:
    """The teacher channels a block's output kept: those of its last layer that kept
    ``width`` of them (a stage's conv, the last conv of a residual branch)."""
    for n in reversed(inside):
        idx = kept_outputs.get(n)
        if idx is not None and len(idx) == width:
            return torch.as_tensor(idx, dtype=torch.long)
    return None


def _refine_one(teacher: nn.Module, student: nn.Module, name: str, inside: list[str], batches, steps: int,
                lr: float, kept_outputs: dict) -> BlockReport:
    t0 = time.perf_counter()
    report = BlockReport(name, list(inside))
    block_s = student.get_submodule(name) if name else student
    try:
        block_t = teacher.get_submodule(name) if name else teacher
    except AttributeError:
        report.reason = "the teacher has no such module"
        return report
    for model, block in ((teacher, block_t), (student, block_s)):
        calls, plain = _calls(model, block, batches[0][:1])
        if calls != 1 or not plain:
            report.reason = (f"called {calls} times per forward" if calls != 1
                             else "its forward does not take and return one tensor")
            return report
    h_t, y_t = _block_io(teacher, block_t, batches, output=True)
    h_s = _block_io(student, block_s, batches, output=False)
    with torch.no_grad():
        shape_s = block_s(h_s[0][:1]).shape
    if shape_s[1:] != y_t[0].shape[1:]:  # the block's output lost channels: compare the kept ones
        kept = _kept_channels(inside, kept_outputs, shape_s[1]) if len(shape_s) == y_t[0].dim() else None
        if kept is None or shape_s[2:] != y_t[0].shape[2:]:
            report.reason = (f"its output {tuple(shape_s[1:])} differs from the teacher's "
                             f"{tuple(y_t[0].shape[1:])} and kept_outputs does not say which channels remain")
            return report
        y_t = [y.index_select(1, kept.to(y.device)) for y in y_t]
    total = sum(y.numel() for y in y_t)

    params = [p for n in inside for p in student.get_submodule(n).parameters(recurse=False)]
    saved = [p.detach().clone() for p in params]
    masks = [(p != 0) if p.dim() > 1 else None for p in params]  # exact zeros (pruned weights) stay zero
    trainable = {id(p) for p in params}
    flags = {p: p.requires_grad for p in block_s.parameters()}
    for p in block_s.parameters():
        p.requires_grad_(id(p) in trainable)
    try:
        report.loss_before = _mse(block_s, h_s, y_t, total, backward=False)
        if not math.isfinite(report.loss_before):
            report.loss_before, report.reason = None, "its error against the teacher is not finite"
            return report
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            _mse(block_s, h_s, y_t, total, backward=True)
            for p, m in zip(params, masks):
                if m is not None and p.grad is not None:
                    p.grad.mul_(m)
            opt.step()
            with torch.no_grad():
                for p, m in zip(params, masks):
                    if m is not None:
                        p.mul_(m)
        report.loss_after = _mse(block_s, h_s, y_t, total, backward=False)
        finite = all(bool(torch.isfinite(p).all()) for p in params) and math.isfinite(report.loss_after)
        if not finite:
            report.loss_after, report.reason = None, "the Adam steps diverged (lower lr)"
        report.kept = finite and report.loss_after < report.loss_before
        if not report.kept:  # never leave a block worse than the layer-wise pass made it
            with torch.no_grad():
                for p, v in zip(params, saved):
                    p.copy_(v)
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        for p in params:
            p.grad = None
    report.seconds = time.perf_counter() - t0
    return report
