"""Peak memory of ``cdfast.compress`` against the number of calibration images.

Each size runs in a fresh process: the peak resident set (``ru_maxrss``) is read after
the teacher and the images are loaded and again after ``compress``; the difference is
what compression itself needed. The statistics stream every batch into ``D × D`` Grams
and the walk recomputes activations batch by batch, so the difference should not grow
with the number of images beyond one batch's activations: ``batch_size`` is the budget.

    python -m bench.memory_compress                      # ResNet-20, 28×28, 10 … 3000 images
    python -m bench.memory_compress --sizes 10 300 1000 --batch-size 64   # adds a curve; others are kept
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "results"

CHILD = r"""
import json, resource, sys, time, torch
import cdfast
from cdfast.experiments.models import build_model
torch.set_num_threads(1)
model, n, batch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(0)
teacher = build_model(model).eval()
x = torch.randn(n, 1, 28, 28)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
_, report = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), solver="exact", batch_size=batch,
                            progress=False, verbose=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"images": n, "rss_before_mb": before / 1024, "rss_peak_mb": after / 1024,
                  "compress_mb": (after - before) / 1024, "seconds": time.perf_counter() - t0,
                  "walk": report.walk}))
"""


def run(model: str, sizes, batch: int) -> list[dict]:
    rows = []
    for n in sizes:
        r = subprocess.run([sys.executable, "-c", CHILD, model, str(n), str(batch)], capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(r.stderr[-2000:])
        row = json.loads(r.stdout.strip().splitlines()[-1])
        row.update(model=model, batch_size=batch)
        rows.append(row)
        print(f"{n:6d} images: +{row['compress_mb']:8.1f} MB over {row['rss_before_mb']:.0f} MB "
              f"({row['seconds']:.1f} s)", flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for key in sorted({(r["model"], r["batch_size"]) for r in rows}):
        curve = sorted((r for r in rows if (r["model"], r["batch_size"]) == key), key=lambda r: r["images"])
        ax.plot([r["images"] for r in curve], [r["compress_mb"] for r in curve], "o-",
                label=f"{key[0]}, batch_size={key[1]}")
    ax.set_xscale("log")
    ax.set_xlabel("calibration images")
    ax.set_ylabel("peak memory added by compress (MB)")
    ax.set_title("compress: memory against the sample count")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 300, 1000, 3000])
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args(argv)
    rows = run(args.model, args.sizes, args.batch_size)
    OUT.mkdir(exist_ok=True)
    path = OUT / "memory_compress.csv"
    if path.is_file():  # keep the curves measured with other batch sizes or models
        with open(path, newline="") as f:
            kept = [r for r in csv.DictReader(f) if (r["model"], int(r["batch_size"])) != (args.model, args.batch_size)]
        rows = [dict(r, images=int(r["images"]), batch_size=int(r["batch_size"]),
                     compress_mb=float(r["compress_mb"])) for r in kept] + rows
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, OUT / "memory_compress.png")
    print(f"wrote {OUT / 'memory_compress.csv'} and memory_compress.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
