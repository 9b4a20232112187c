"""Does a compiled CPU operator pay for itself? Whole ``distill_layer`` calls, cpp vs torch.

The ``cpp`` backend keeps an operator only if it measurably speeds up a whole layer
solve. This bench times ``distill_layer`` (Adam, the authors' schedule) with the
projection operators resolved to ``cpp`` (the default on the CPU) and to ``torch``,
on the same statistics, and writes ``bench/results/backend_ops.csv``.

    python -m bench.backend_ops            # median of 3 per row, one thread
    python -m bench.backend_ops --quick    # one small layer, for the tests
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import torch

import cdfast

OUT = Path(__file__).resolve().parent / "results" / "backend_ops.csv"

LAYERS = {  # name: (layer, input shape)
    "conv_64to64_3x3": (lambda: torch.nn.Conv2d(64, 64, 3, padding=1), (50, 64, 16, 16)),
    "conv_256to256_3x3": (lambda: torch.nn.Conv2d(256, 256, 3, padding=1), (16, 256, 7, 7)),
    "linear_768to768": (lambda: torch.nn.Linear(768, 768), (512, 768)),
}
COMPRESSIONS = {"weight_0.3": lambda: cdfast.WeightPrune(0.3), "channel_0.5": lambda: cdfast.ChannelPrune(0.5)}


def run(quick: bool = False, steps: int = 600, repeats: int = 3) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    layers = dict(list(LAYERS.items())[:1]) if quick else LAYERS
    for lname, (make, shape) in layers.items():
        torch.manual_seed(0)
        layer = make()
        h_t = torch.randn(*shape)
        stats = cdfast.LayerStatistics(layer).update(h_t, h_t + 0.1 * torch.randn_like(h_t))
        for cname, comp in COMPRESSIONS.items():
            times, losses = {}, {}
            for backend in ("cpp", "torch"):
                ts = []
                for _ in range(1 if quick else repeats):
                    t0 = time.perf_counter()
                    r = cdfast.distill_layer(layer, statistics=stats, compression=comp(), solver="adam",
                                             steps=20 if quick else steps,
                                             backend=backend)
                    ts.append(time.perf_counter() - t0)
                times[backend], losses[backend] = statistics.median(ts), r.loss_after
            rows.append(dict(layer=lname, compression=cname, steps=20 if quick else steps,
                             cpp_s=round(times["cpp"], 4), torch_s=round(times["torch"], 4),
                             speedup=round(times["torch"] / times["cpp"], 3),
                             loss_cpp=losses["cpp"], loss_torch=losses["torch"]))
            print(f"{lname:20s} {cname:12s} cpp {times['cpp']:7.3f}s  torch {times['torch']:7.3f}s  "
                  f"speed-up {times['torch'] / times['cpp']:.2f}x", flush=True)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=600)
    args = ap.parse_args(argv)
    rows = run(args.quick, args.steps)
    if not args.quick:
        OUT.parent.mkdir(parents=True, exist_ok=True)
        with open(OUT, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
        print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
