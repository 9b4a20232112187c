"""The README's demonstration: compress a Fashion-MNIST ResNet from 5 images per class.

Trains a small ResNet-8-style teacher (one epoch on 20,000 images, cached under
``~/.cache/cdfast``) so that the whole demonstration fits in a few minutes on two
CPU cores, then removes half of every block-internal channel with each method from
the same 50 unlabelled images and prints accuracy on the 10,000 test images, size
and time. ``cdfast experiment`` runs the full comparison on ResNet-20/VGG teachers.
"""
from __future__ import annotations

import time

import torch


def main(k: int = 5, seed: int = 0, model_name: str = "resnet8", epochs: int = 1, max_train: int = 20000) -> int:
    from . import baselines
    from .data import few_shot, load_fashion_mnist
    from .models import count_parameters
    from .train import evaluate, train_teacher

    torch.manual_seed(seed)
    t0 = time.perf_counter()
    teacher = train_teacher(model_name, epochs=epochs, max_train=max_train, progress=False).eval()
    test = load_fashion_mnist("test")
    x, y = few_shot(load_fashion_mnist("train"), k, seed=seed).tensors
    print(f"teacher {model_name} ready in {time.perf_counter() - t0:.0f} s; compressing from {len(x)} images "
          f"({k} per class), half of the block-internal channels removed\n")
    rows = [("Teacher", evaluate(teacher, test), count_parameters(teacher), 0.0)]
    methods = [("L1-norm", "l1"), ("BP", "bp"), ("FSKD", "fskd"), ("ThiNet", "thinet"), ("CP", "cp"),
               ("Ours-NC", "nc"), ("Ours", "cross"), ("Ours-S", "soft")]
    print(f"{'method':10s} {'accuracy':>9s} {'params':>9s} {'seconds':>8s}")
    print(f"{'Teacher':10s} {rows[0][1]:8.2f}% {rows[0][2]:9,d} {'':>8s}")
    for label, method in methods:
        t = time.perf_counter()
        student, _ = baselines.run(method, teacher, x, keep=0.5, labels=y, policy="resnet", seed=seed,
                                   solver="exact", mu=0.9)
        dt = time.perf_counter() - t
        acc = evaluate(student.eval(), test)
        print(f"{label:10s} {acc:8.2f}% {count_parameters(student):9,d} {dt:8.1f}", flush=True)
    print(f"\ntotal {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
