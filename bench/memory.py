"""Peak memory of ``distill_layer`` on wide layers (the ``D × D`` statistics never formed).

    python -m bench.memory                 # every row, each in a fresh process
    python -m bench.memory --quick         # a 4,096-input Linear only (tests)

A 25,088-input Linear (VGG-16's flattened 512×7×7 features) sampled on a few inputs
has ``M < D``: cdfast keeps the unfolded inputs (``representation == "lowrank"``) and
solves on them, where the three ``D × D`` float32 Grams would take 7.5 GB. Each row runs
in its own process and reports the peak resident set of the process (``ru_maxrss``) and
its growth over the process just before the call (the layer and the inputs already
allocated); the result's ``form`` says which representation ran. The iterative solver
runs few steps: its memory does not depend on how many.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

from .harness import REPO

OUT = REPO / "bench" / "results" / "memory.csv"
COLUMNS = ["layer", "samples", "compression", "solver", "form", "status", "seconds", "peak_rss_bytes",
           "growth_bytes", "gram_bytes", "loss_before", "loss_after", "steps", "torch_threads", "note"]

# (in, out, samples, compression, steps)
ROWS = [(25088, 1000, 64, "ChannelPrune(0.5)", 20), (25088, 1000, 64, "Quantize(4)", 20),
        (25088, 1000, 64, "WeightPrune(0.5)", 20), (25088, 4096, 64, "ChannelPrune(0.5)", 5),
        (25088, 4096, 64, "Quantize(4)", 5), (25088, 4096, 64, "WeightPrune(0.5)", 5)]
QUICK = [(4096, 64, 16, "ChannelPrune(0.5)", 3)]

CHILD = r"""
import json, resource, sys, time, torch
import cdfast
torch.set_num_threads(1)
d_in, d_out, n, comp, steps = json.loads(sys.argv[1])
torch.manual_seed(0)
layer = torch.nn.Linear(d_in, d_out)
h_t = torch.randn(n, d_in)
h_s = h_t + 0.1 * torch.randn_like(h_t)
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
before = rss()
t = time.perf_counter()
res = cdfast.distill_layer(layer, h_t, h_s, compression=eval("cdfast." + comp), steps=steps)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(solver=res.solver, form=res.form, seconds=seconds, peak=peak, before=before,
                      loss_before=res.loss_before, loss_after=res.loss_after,
                      finite=bool(torch.isfinite(res.weight).all()))))
"""


def run(rows) -> list[dict]:
    out = []
    for d_in, d_out, n, comp, steps in rows:
        row = dict(layer=f"Linear {d_in}→{d_out}", samples=n, compression=comp, steps=steps, torch_threads=1,
                   gram_bytes=3 * 4 * d_in * d_in)
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps([d_in, d_out, n, comp, steps])],
                              capture_output=True, text=True, cwd=REPO, timeout=3600)
        if proc.returncode != 0:
            row.update(status=f"error: {proc.stderr.strip().splitlines()[-1][:200] if proc.stderr else proc.returncode}")
        else:
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            row.update(status="ok" if r["finite"] else "non-finite weight", solver=r["solver"], form=r["form"],
                       seconds=r["seconds"], peak_rss_bytes=r["peak"], growth_bytes=r["peak"] - r["before"],
                       loss_before=r["loss_before"], loss_after=r["loss_after"])
        print(f"  {row['layer']:<18} {comp:<18} {row.get('solver', '')} {row.get('form', '')} "
              f"{row['status']} peak {row.get('peak_rss_bytes', 0) / 2**20:.0f} MiB", file=sys.stderr, flush=True)
        out.append(row)
    return out


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--match", default="", help="only the rows whose 'in→out compression' contains this text")
    a = ap.parse_args(argv)
    rows = run([r for r in (QUICK if a.quick else ROWS) if a.match in f"{r[0]}→{r[1]} {r[3]}"])
    path = Path(a.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    return path


if __name__ == "__main__":
    main()
