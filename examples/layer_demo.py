"""Compress one 64→64 3×3 convolution by cross distillation and print what happened.

The layer's inputs are real Fashion-MNIST features when the Debian package
``dataset-fashion-mnist`` is installed (50 images, lifted to 64 channels by a
fixed random 3×3 convolution and ReLU, then pooled to 16×16), else random
features; the student's input is the teacher's plus noise, standing in for the
error of the layers compressed before it.
"""
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import cdfast


def layer_inputs(n: int = 50) -> tuple[torch.Tensor, str]:
    torch.manual_seed(0)
    try:
        from cdfast.experiments.data import few_shot, load_fashion_mnist

        images = few_shot(load_fashion_mnist("train"), k=n // 10, seed=0).tensors[0]
        source = f"{len(images)} Fashion-MNIST images"
    except Exception:  # the data package is optional for this demo
        images = torch.randn(n, 1, 28, 28)
        source = f"{n} random images (install dataset-fashion-mnist for real ones)"
    lift = torch.randn(64, 1, 3, 3) / 3
    h = F.relu(F.conv2d(images, lift, padding=1))
    return F.adaptive_avg_pool2d(h, 16), source


def main() -> None:
    h_teacher, source = layer_inputs()
    h_student = h_teacher + 0.1 * h_teacher.std() * torch.randn_like(h_teacher)
    conv = nn.Conv2d(64, 64, 3, padding=1)
    print(f"layer: {conv}\ninputs: {source}, {tuple(h_teacher.shape)}; backends: {cdfast.backends()}\n")
    print(f"{'solver':8} {'loss':6} {'naive loss':>11} {'distilled':>11} {'kept ch':>8} {'sparsity':>9} {'time s':>7}")
    for solver, loss in (("adam", "nc"), ("adam", "cross"), ("exact", "cross")):
        t0 = time.perf_counter()
        res = cdfast.distill_layer(conv, h_teacher, h_student, loss=loss, mu=0.6,
                                   compression=cdfast.ChannelPrune(keep=0.5), solver=solver, steps=3000)
        dt = time.perf_counter() - t0
        print(f"{solver:8} {loss:6} {res.loss_before:11.5f} {res.loss_after:11.5f} "
              f"{res.kept_channels.numel():8d} {res.sparsity:9.2f} {dt:7.2f}")
    res = cdfast.distill_layer(conv, h_teacher, h_student, compression=cdfast.Quantize(bits=4), solver="exact")
    print(f"\n4-bit weights (exact/GPTQ): naive rounding loss {res.loss_before:.5f} -> {res.loss_after:.5f}, "
          f"{res.codes.unique().numel()} distinct codes, {res.wall_time:.2f} s")


if __name__ == "__main__":
    main()
