"""The README's demonstration: compress the shipped ResNet-20 from 5 images per class.

The teacher ships with cdfast (:func:`cdfast.experiments.train.shipped_teacher`: a
ResNet-20 trained by ``cdfast train resnet20 --epochs 3 --seed 0``, 92.47 % on the
Fashion-MNIST test set), so the demonstration trains nothing. From the same 50
unlabelled training images it removes half of every block-internal channel with
each of the paper's main methods, and quantizes the network to 4 bits with
cross distillation; it prints accuracy on the 10,000 test images, parameters,
FLOPs, the size of the saved file (:func:`cdfast.save`) and the time of each
compression, and writes the table, a plot and the compressed models into ``out``.

BP (fine-tuning by backpropagation on the 50 labelled images) is left out: it
takes minutes here. ``cdfast experiment`` runs it with the full comparison.

On a machine that already runs more than it has cores, the demo uses one thread:
there, two OpenMP threads that the OS deschedules in turn stall each other (measured
on this project's shared two-core machine: 386 s with two threads against 70 s with
one, the same run).
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

#: (label, baselines.run method) of the channel-pruning rows, in the paper's order.
METHODS = (("L1-norm", "l1"), ("FSKD", "fskd"), ("ThiNet", "thinet"), ("CP", "cp"),
           ("Ours-NC", "nc"), ("Ours", "cross"), ("Ours-S", "soft"))
#: The quantization row: cross distillation to a 4-bit grid, one scale per output channel.
QUANT_LABEL = "Ours W4"


def main(k: int = 5, seed: int = 0, out: str | os.PathLike | None = None, keep: float = 0.5,
         mu: float = 0.9, methods=METHODS, quantize: bool = True, test_limit: int | None = None) -> int:
    """Run the demonstration; returns 0.

    ``out`` defaults to a new ``cdfast-runs/demo-<time>``; ``methods``, ``quantize``
    and ``test_limit`` (the first N test images) make a shorter run.
    """
    from . import new_run_folder

    start = time.perf_counter()
    threads = torch.get_num_threads()
    busy = _one_thread_if_busy()
    try:
        _run(k, seed, Path(out) if out is not None else new_run_folder("demo"), keep, mu, methods, quantize,
             test_limit, busy)
    finally:
        torch.set_num_threads(threads)
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


def _run(k, seed, out: Path, keep, mu, methods, quantize, test_limit, busy) -> None:
    from .. import Quantize, compress
    from ..model.counting import count_flops, count_parameters
    from ..model.export import save
    from . import baselines
    from .data import few_shot, load_fashion_mnist
    from .train import evaluate, shipped_teacher

    (out / "models").mkdir(parents=True, exist_ok=True)
    teacher, info = shipped_teacher()
    test = load_fashion_mnist("test")
    if test_limit is not None:
        test = torch.utils.data.TensorDataset(*(t[:test_limit] for t in test.tensors))
    x, y = few_shot(load_fashion_mnist("train"), k, seed=seed).tensors
    shape = tuple(x.shape[1:])
    if busy:
        print(busy)
    print(f"teacher: ResNet-20 shipped with cdfast (trained by `{info.get('command', '?')}`)")
    print(f"compressing from {len(x)} unlabelled training images ({k} per class); channel rows keep "
          f"{keep:.0%} of each block's internal channels; accuracy on the {len(test):,} test images\n")

    rows: list[dict] = []
    header = f"{'method':9s} {'accuracy':>9s} {'params':>9s} {'MFLOPs':>8s} {'file kB':>8s} {'seconds':>8s}"
    print(header)
    print("-" * len(header))

    def add(label: str, model: torch.nn.Module, seconds: float | None, report=None) -> None:
        path = save(model, out / "models" / f"{label.lower().replace(' ', '-')}.safetensors", report)
        row = {"method": label, "accuracy": evaluate(model, test), "params": count_parameters(model),
               "flops": count_flops(model, shape), "kB": path.stat().st_size / 1000, "seconds": seconds}
        rows.append(row)
        secs = "" if seconds is None else f"{seconds:8.1f}"
        print(f"{label:9s} {row['accuracy']:8.2f}% {row['params']:9,d} {row['flops'] / 1e6:8.1f} "
              f"{row['kB']:8.0f} {secs:>8s}", flush=True)

    add("Teacher", teacher, None)
    for label, method in methods:
        t = time.perf_counter()
        student, _ = baselines.run(method, teacher, x, keep=keep, labels=y, policy="resnet", seed=seed,
                                   solver="exact", mu=mu)
        add(label, student, time.perf_counter() - t)
    if quantize:
        t = time.perf_counter()
        student, report = compress(teacher, x, compression=Quantize(4), loss="cross", mu=mu, solver="exact",
                                   policy="skip_first", progress=False, verbose=False)
        add(QUANT_LABEL, student, time.perf_counter() - t, report)

    table = _markdown(rows, k, len(test))
    (out / "demo.md").write_text(table)
    plot = _plot(rows, out / "demo.png", k)
    print(f"\ntable {out / 'demo.md'}, plot {plot}, models {out / 'models'}/ (load with cdfast.load)")


def _one_thread_if_busy() -> str | None:
    """Use one torch thread when the 1-minute load average exceeds the core count; say so."""
    try:
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
    except OSError:  # no load average on this platform
        return None
    if load > cores and torch.get_num_threads() > 1:
        torch.set_num_threads(1)
        return (f"the machine is busy (load {load:.1f} on {cores} cores): running on one thread, which "
                "contention slows far less than two")
    return None


def _markdown(rows: list[dict], k: int, n_test: int) -> str:
    lines = [f"Shipped ResNet-20 teacher compressed from {k} images per class; accuracy on {n_test:,} "
             "Fashion-MNIST test images; file: `cdfast.save` (safetensors).", "",
             "| method | accuracy (%) | parameters | MFLOPs | file (kB) | seconds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        secs = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        lines.append(f"| {r['method']} | {r['accuracy']:.2f} | {r['params']:,} | {r['flops'] / 1e6:.1f} | "
                     f"{r['kB']:.0f} | {secs} |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path, k: int) -> Path:
    """Accuracy per method as horizontal bars, each labelled with its saved size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    teacher, methods = rows[0], rows[1:]
    best = max(r["accuracy"] for r in rows)
    # zoom on the methods within 15 points of the best; a bar far below is cut and labelled
    low = max(0.0, min(r["accuracy"] for r in methods if r["accuracy"] > best - 15) - 2)
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(methods) + 1.4))
    ys = range(len(methods))[::-1]
    ax.barh(list(ys), [max(r["accuracy"], low) - low for r in methods], left=low, color="tab:blue")
    for y, r in zip(ys, methods):
        ax.text(max(r["accuracy"], low) + 0.05, y, f"{r['accuracy']:.2f}%  ({r['kB']:.0f} kB)", va="center",
                fontsize=8)
    ax.axvline(teacher["accuracy"], color="gray", ls="--", lw=1)
    ax.text(teacher["accuracy"], len(methods) - 0.4, f"teacher {teacher['accuracy']:.2f}% ({teacher['kB']:.0f} kB)",
            ha="right", fontsize=8, color="gray")
    ax.set_yticks(list(ys), [r["method"] for r in methods])
    ax.set_xlim(low, best + 1.2)
    ax.set_xlabel("test accuracy (%)")
    ax.set_title(f"ResNet-20 on Fashion-MNIST, compressed from {k} images per class", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
