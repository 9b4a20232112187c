"""Small cases of every CUDA kernel of cdfast, for compute-sanitizer.

    compute-sanitizer --tool memcheck python tools/sanitizer_cases.py
    python tools/sanitizer_cases.py --emulate      # the same cases on the CPU emulation

Runs ``gram_kernel`` (float32 and float64; no constraint, channel and weight pruning,
N:M, group lasso + L1, per-channel and per-layer quantization with a fitted bias) on
sizes that are not tile multiples, with a grid of two blocks and a full grid, and
checks each result against the torch path. ``tools/gpu_check.sh`` runs it under
memcheck and racecheck with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (every tensor its own
allocation, so an out-of-bounds access is not hidden inside a cached block).
Exits non-zero when a result differs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import cdfast  # noqa: E402
from cdfast._backends import cuda as cuda_backend  # noqa: E402
from cdfast.layer.solvers import gram_iterative  # noqa: E402
from cuda_cases import build_emulation, make_problem  # noqa: E402  (tests/cuda_cases.py)

GRAM_CASES = [
    # (compression, make_problem keywords)
    (None, {}),
    (cdfast.ChannelPrune(0.5), {"fit_bias": True}),
    (cdfast.WeightPrune(0.3), {"solver": "sgd"}),
    (cdfast.NMSparsity(1, 3), {"groups": 2}),
    ([cdfast.GroupLasso(1.0), cdfast.L1(0.1)], {}),
    ([cdfast.ChannelPrune(0.4), cdfast.Quantize(3)], {}),
    (cdfast.Quantize(4, per_channel=False), {"fit_bias": True}),
]


def run(ext, device: str, steps: int = 4) -> int:
    """Every case on ``ext`` (None: the real kernels); returns the number of cases.

    On the GPU each solve runs on two blocks (the grid-wide sync across blocks) and on
    the full grid; the emulation (an OS thread per CUDA thread) runs two blocks only.
    """
    grids = (2,) if device == "cpu" else (2, 0)
    n = 0
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        for compression, kw in GRAM_CASES:
            for blocks in grids:
                quad, p_ref, p_ker, cfg = make_problem(compression, dtype=dtype, steps=steps, device=device, **kw)
                W_ref, _ = gram_iterative(quad, p_ref, cfg)
                W_ker, _ = cuda_backend.solve(quad, p_ker, cfg, ext=ext, max_blocks=blocks)
                if device != "cpu":
                    torch.cuda.synchronize()
                if not (torch.equal(p_ker.mask, p_ref.mask) and torch.allclose(W_ker, W_ref, rtol=tol, atol=tol)):
                    raise SystemExit(f"gram_kernel {dtype} {compression} {kw} blocks={blocks}: differs from torch")
                n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--emulate", action="store_true", help="run the cases on the CPU emulation of the kernels")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.emulate:
        with tempfile.TemporaryDirectory() as d:
            n = run(build_emulation(d), "cpu")
        where = "the CPU emulation"
    else:
        why = cdfast.backends()["cuda"]
        if why != "available":
            raise SystemExit(f"sanitizer_cases: the cuda backend cannot run here: {why}")
        n = run(None, "cuda")
        where = torch.cuda.get_device_name()
    print(f"sanitizer_cases: {n} kernel runs on {where} agree with torch ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
