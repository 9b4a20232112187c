"""``compress``: few-shot compression of a whole network, layer by layer.

For every Conv2d/Linear in execution order (SPEC §4): the teacher's input ``h^T``
comes from the intact teacher, the student's input ``h^S`` from the student
compressed so far; the layer's statistics are streamed over the calibration
batches (so the sample count is bounded by time, not memory, and summed across
ranks under ``torch.distributed``); the layer is solved with
:func:`cdfast.distill_layer` and written back; then the walk moves on. At the end
pruned channels are physically removed (:mod:`cdfast.model.surgery`).
"""
from __future__ import annotations

import copy
import json
import os
import re
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from ..layer.constraints import normalize
from ..layer.distill import distill_layer
from ..layer.statistics import LayerStatistics
from .surgery import fold_batchnorm, shrink_channels
from .counting import count_flops, count_parameters
from .walk import as_sequence, calibration_batches, capture_input, execution_order, run_blocks

__all__ = ["compress", "CompressionReport", "POLICIES"]

POLICIES = ("all", "skip_first", "resnet")
_INTERNAL_CONV = re.compile(r"(?:^|\.)conv(\d+)$")  # a block's convN (CIFAR and torchvision naming)


@dataclass
class LayerReport:
    name: str
    action: str            # "compressed", "refit" or "skipped"
    loss_before: float = 0.0
    loss_after: float = 0.0
    in_channels: int = 0
    kept_channels: int = 0
    sparsity: float = 0.0
    bits: int | None = None
    rows: int = 0          # M = N·H_out·W_out
    cols: int = 0          # D = C_in/G·k²
    seconds: float = 0.0
    solver: str = ""
    backend: str = ""

    def line(self) -> str:
        extra = f"bits={self.bits} " if self.bits else ""
        return (f"{self.name:28s} {self.action:10s} loss {self.loss_before:.4g} -> {self.loss_after:.4g}  "
                f"ch {self.kept_channels}/{self.in_channels} sparsity {self.sparsity:.2f} {extra}"
                f"M/D {self.rows}/{self.cols} {self.seconds:.2f}s")


@dataclass
class CompressionReport:
    """What :func:`compress` did, layer by layer, and what it bought."""

    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    flops_before: int = 0
    flops_after: int = 0
    seconds: float = 0.0
    walk: str = ""          # "block-sequence" or "recompute-from-input" (and why)
    samples: int = 0
    shrink: dict = field(default_factory=dict)
    quantized: dict = field(default_factory=dict, repr=False)  # name -> {"codes", "scale", "bits"}

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("quantized")
        d["quantized_layers"] = sorted(self.quantized)
        return d

    def to_json(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    def table(self) -> str:
        return "\n".join(l.line() for l in self.layers)


def _policy(policy: str, order: list[str], model: nn.Module) -> dict[str, str]:
    """Layer name → "compress" / "refit" / "skip"."""
    actions = {}
    first_conv = next((n for n in order if isinstance(model.get_submodule(n), nn.Conv2d)), None)
    for n in order:
        m = model.get_submodule(n)
        if policy == "all":
            actions[n] = "compress"
        elif policy == "skip_first":
            actions[n] = "skip" if n == first_conv else ("compress" if isinstance(m, nn.Conv2d) else "refit")
        else:  # resnet: prune only block-internal channels, the inputs of conv2 (and a bottleneck's conv3)
            conv = _INTERNAL_CONV.search(n)
            internal = conv is not None and int(conv.group(1)) >= 2
            actions[n] = "skip" if n == first_conv else ("compress" if internal else "refit")
    return actions


def _save_checkpoint(path: str, student: nn.Module, done: list[str], report: CompressionReport) -> None:
    tmp = path + ".tmp"
    torch.save({"student": student.state_dict(), "done": done,
                "layers": [asdict(l) for l in report.layers],
                "quantized": report.quantized}, tmp)
    os.replace(tmp, path)


def compress(teacher: nn.Module, data, *, compression=None, loss: str = "cross", mu: float = 0.9,
             solver: str = "auto", steps: int = 3000, lr: float = 1e-3, policy: str = "skip_first",
             overrides: dict[str, dict] | None = None, batch_size: int = 256, shrink: bool = True,
             fold_bn: bool = False, checkpoint: str | None = None, progress: bool = True,
             verbose: bool = True, max_cache_bytes: int = 2 << 30, **layer_kwargs):
    """Compress ``teacher`` from a few calibration samples; returns ``(student, report)``.

    Args:
        teacher: any ``nn.Module`` (kept intact; put in eval mode for the walk).
        data: calibration inputs: a tensor, a Dataset/DataLoader of ``(x, y)`` or ``x``
            batches, or a list of tensors. Labels are never used.
        compression: constraint(s) for the layers the policy compresses.
        loss, mu, solver, steps, lr: as :func:`cdfast.distill_layer` (``solver="auto"``:
            the exact solver where it applies; the iterative settings default to the
            authors' ResNet-56 ones, μ=0.9, lr=1e-3).
        policy: ``"skip_first"`` (default: the first conv untouched, convs compressed,
            Linear layers refit), ``"all"``, or ``"resnet"`` (compress only the
            block-internal channels, the inputs of each block's ``conv2`` and, in a
            bottleneck, ``conv3``; refit the rest, so residual widths are unchanged).
        overrides: per-layer keyword overrides by module name, e.g.
            ``{"blocks.0.conv2": {"compression": None, "steps": 500}}``; an override
            ``{"action": "skip"}`` leaves the layer untouched.
        shrink: physically remove pruned channels at the end.
        fold_bn: fold BatchNorms into the preceding convs at the end.
        checkpoint: path of a file written after every layer; when it exists the
            compression resumes after the last finished layer.
        **layer_kwargs: passed on to :func:`cdfast.distill_layer` (``form``, ``backend`` …).
    """
    start = time.perf_counter()
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher: expected an nn.Module, got {type(teacher).__name__}")
    if policy not in POLICIES:
        raise ValueError(f"policy: expected one of {POLICIES}, got {policy!r}")
    compression = normalize(compression)
    batches = calibration_batches(data, batch_size)
    if not batches or sum(len(b) for b in batches) == 0:
        raise ValueError("data: expected at least one calibration sample, got none")
    params = list(teacher.parameters())
    device = params[0].device if params else torch.device("cpu")
    if batches[0].device != device:
        raise ValueError(f"data: expected tensors on the model's device {device}, got {batches[0].device}")
    teacher_mode = teacher.training
    teacher.eval()
    order, leaves = execution_order(teacher, batches[0][:1])
    if not order:
        raise ValueError("teacher: has no nn.Conv2d or nn.Linear layer to compress")
    actions = _policy(policy, order, teacher)
    overrides = dict(overrides or {})
    for name in overrides:
        if name not in actions:
            raise ValueError(f"overrides: no compressible layer named {name!r}; layers are {order}")
    student = copy.deepcopy(teacher).eval()
    report = CompressionReport(params_before=count_parameters(teacher),
                               flops_before=count_flops(teacher, tuple(batches[0].shape[1:])),
                               samples=sum(len(b) for b in batches))

    done: list[str] = []
    if checkpoint and os.path.exists(checkpoint):
        state = torch.load(checkpoint, weights_only=True)
        student.load_state_dict(state["student"])
        done = list(state["done"])
        report.layers = [LayerReport(**d) for d in state["layers"]]
        report.quantized = dict(state["quantized"])

    # The walk: block-sequence when the model is one (and the activations fit), else recompute.
    seq_t, seq_s = as_sequence(teacher), as_sequence(student)
    cache_bytes = 2 * sum(b.numel() * b.element_size() for b in batches)
    if seq_t is None:
        report.walk = "recompute-from-input (the model is not a sequence of blocks)"
    elif cache_bytes * 4 > max_cache_bytes:
        seq_t = seq_s = None
        report.walk = "recompute-from-input (block activations would exceed max_cache_bytes)"
    else:
        report.walk = "block-sequence"
    if seq_t is not None:
        name_of = {m: n for n, m in teacher.named_modules()}
        block_of = {}
        for b, blk in enumerate(seq_t):
            for m in blk.modules():
                if name_of.get(m) in actions:
                    block_of[name_of[m]] = b
        if any(n not in block_of for n in order):
            seq_t = seq_s = None
            report.walk = "recompute-from-input (some layers are outside the block sequence)"

    from tqdm.auto import tqdm

    bar = tqdm(order, desc="cdfast compress", disable=not progress, unit="layer")
    acts_t = list(batches)
    acts_s = list(batches)
    current_block = 0
    for name in bar:
        bar.set_postfix_str(name)
        kw = dict(layer_kwargs)
        kw.update(loss=loss, mu=mu, solver=solver, steps=steps, lr=lr, compression=compression)
        action = actions[name]
        ov = dict(overrides.get(name, {}))
        action = ov.pop("action", action)
        kw.update(ov)
        if action == "refit":
            kw["compression"] = None
        layer_t, layer_s = teacher.get_submodule(name), student.get_submodule(name)
        if seq_t is not None:  # advance both caches to this layer's block
            while current_block < block_of[name]:
                acts_t = [run_blocks([seq_t[current_block]], a) for a in acts_t]
                acts_s = [run_blocks([seq_s[current_block]], a) for a in acts_s]
                current_block += 1
        if name in done or action == "skip":
            if name not in done:
                report.layers.append(LayerReport(name, "skipped"))
            continue
        t0 = time.perf_counter()
        geometry_stats = LayerStatistics(layer_t, dtype=kw.pop("stats_dtype", torch.float32),
                                         fit_bias=kw.pop("fit_bias", False), backend=kw.get("backend", "auto"))
        for a_t, a_s in zip(acts_t, acts_s):
            if seq_t is not None:
                blk_t, blk_s = seq_t[current_block], seq_s[current_block]
                h_t = capture_input(lambda: blk_t(a_t), layer_t)
                h_s = capture_input(lambda: blk_s(a_s), layer_s)
            else:
                h_t = capture_input(lambda: teacher(a_t), layer_t)
                h_s = capture_input(lambda: student(a_s), layer_s)
            geometry_stats.update(h_t, h_s)
        geometry_stats.all_reduce()
        res = distill_layer(layer_t, statistics=geometry_stats, **kw)
        res.apply_to(layer_s)
        g = geometry_stats.geometry
        lr_ = LayerReport(name, "compressed" if action == "compress" and kw["compression"] else "refit",
                          res.loss_before, res.loss_after, g.in_channels,
                          int(res.kept_channels.numel()) if res.kept_channels is not None else g.in_channels,
                          res.sparsity, res.bits, geometry_stats.rows, g.cols + int(geometry_stats.fit_bias),
                          time.perf_counter() - t0, res.solver, res.backend)
        report.layers.append(lr_)
        if res.codes is not None:
            report.quantized[name] = {"codes": res.codes, "scale": res.scale, "bits": res.bits}
        if res.kept_channels is not None and res.kept_channels.numel() < g.in_channels:
            report.shrink[name] = res.kept_channels.tolist()
        done.append(name)
        if verbose:
            tqdm.write(lr_.line())
        if checkpoint:
            _save_checkpoint(checkpoint, student, done, report)

    if shrink and report.shrink:
        kept = {n: torch.tensor(k) for n, k in report.shrink.items()}
        report.shrink = shrink_channels(student, kept, leaves, batches[0][: min(8, len(batches[0]))])
    if fold_bn:
        fold_batchnorm(student, execution_order(student, batches[0][:1])[1])
    report.params_after = count_parameters(student)
    report.flops_after = count_flops(student, tuple(batches[0].shape[1:]))
    report.seconds = time.perf_counter() - start
    teacher.train(teacher_mode)
    return student, report
