#!/usr/bin/env python
"""Compile every cdfast Triton kernel configuration ahead of time for sm_80 and sm_90.

No GPU is needed: each (kernel, tile configuration) is lowered with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cc, 32))`` all the way to a
cubin (Triton's bundled ``ptxas``), and the shared memory it needs per block is read
from the compiled kernel's metadata. The script prints a table and exits non-zero
if any configuration fails to compile or needs more shared memory than the chip
gives one block (sm_80: 163 KiB, sm_90: 227 KiB).

Each tile configuration is compiled with its heaviest constexpr flags (every
optional operand, mask and epilogue stage switched on: the most shared memory any
launch of it can use), and once more with the complementary flags so that every
constexpr branch of every kernel is compiled (the interpreter cannot catch
compile-only errors).

Usage::

    python tools/aot_compile.py [--jobs N] [--fresh] [--arch 80 90]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be real JIT functions here

#: Shared memory one block may use (bytes): sm_80 (A100) 163 KiB, sm_90 (H100/H200) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

# Pointer element types that are not float32, and the scalar arguments that are floats.
_PTR_TYPES = {"pairs_ptr": "*i32", "counter_ptr": "*i32", "mask_ptr": "*i1", "codes_ptr": "*i8"}
_FLOAT_ARGS = {"a", "b", "c", "d", "inv_numel", "two_s", "one_m_b1", "b2", "one_m_b2", "eps",
               "momentum", "levels", "tiny", "t"}


def _specs():
    """``(label, module, kernel name, config, constexpr flags, variant)`` for every compile.

    ``full``: every tile configuration with its heaviest flags (the shared-memory
    bound). ``lean``: the first configuration with the complementary flags, so that
    every constexpr branch of every kernel is compiled at least once.
    """
    from cdfast.kernels import conv, gram, statistics

    out = []

    def add(label, module, name, configs, full, lean):
        for cfg in configs:
            out.append((label, module, name, cfg, full, "full"))
        if lean is not None:
            out.append((label, module, name, configs[0], lean, "lean"))

    add("statistics", statistics, "dual_gram_kernel", statistics.CONFIGS,
        dict(HAS_ONES=True, PRECISION="ieee"), dict(HAS_ONES=False, PRECISION="ieee"))
    add("dual_conv_loss", conv, "dual_conv_loss_kernel", conv.FWD_CONFIGS,
        dict(HAS_ONES=True, HAS_BIAS=True, ACT=True, HAS_AFFINE=True, NEED_T=True, NEED_S=True,
             WRITE_DY=True, WRITE_Y=False, PRECISION="ieee"),
        dict(HAS_ONES=False, HAS_BIAS=False, ACT=False, HAS_AFFINE=False, NEED_T=False, NEED_S=True,
             WRITE_DY=False, WRITE_Y=False, PRECISION="ieee"))
    out.append(("dual_conv_loss", conv, "dual_conv_loss_kernel", conv.FWD_CONFIGS[0],
                dict(HAS_ONES=True, HAS_BIAS=False, ACT=True, HAS_AFFINE=False, NEED_T=True,
                     NEED_S=False, WRITE_DY=False, WRITE_Y=True, PRECISION="ieee"), "teacher"))
    add("conv_weight_grad", conv, "conv_weight_grad_kernel", conv.WGRAD_CONFIGS,
        dict(HAS_ONES=True, NEED_T=True, NEED_S=True, PRECISION="ieee"),
        dict(HAS_ONES=False, NEED_T=False, NEED_S=True, PRECISION="ieee"))
    add("gram_step", gram, "gram_step_kernel", gram.STEP_CONFIGS,
        dict(ADAM=True, HAS_MASK=True, QUANT=True, FUSE_L1=True, PRECISION="ieee"),
        dict(ADAM=False, HAS_MASK=False, QUANT=False, FUSE_L1=False, PRECISION="ieee"))
    add("channel_prox", gram, "channel_prox_kernel", gram.PROX_CONFIGS, dict(MODE=1), dict(MODE=2))
    out.append(("channel_prox", gram, "channel_prox_kernel", gram.PROX_CONFIGS[4], dict(MODE=0), "norms"))
    add("quantize", gram, "quantize_kernel", gram.ELEMENTWISE_CONFIGS, {}, None)
    add("soft_threshold", gram, "soft_threshold_kernel", gram.ELEMENTWISE_CONFIGS, {}, None)
    return out


def _compile(job):
    """Compile one configuration for one architecture; returns a result row."""
    index, arch = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    label, module, name, cfg, flags, variant = _specs()[index]
    fn = getattr(module, name)
    constexprs = {k: v for k, v in cfg.items() if k.isupper()}
    constexprs.update(flags)
    options = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    signature = {}
    for p in fn.params:
        if p.is_constexpr:
            signature[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            signature[p.name] = _PTR_TYPES.get(p.name, "*fp32")
        elif p.name in _FLOAT_ARGS:
            signature[p.name] = "fp32"
        else:
            signature[p.name] = "i32"
    missing = [p.name for p in fn.params if p.is_constexpr and p.name not in constexprs]
    tiles = " ".join(f"{k}={v}" for k, v in cfg.items() if k.isupper())
    row = dict(kernel=label, tiles=tiles, warps=options.get("num_warps"), stages=options.get("num_stages"),
               arch=arch, variant=variant)
    if missing:
        row.update(error=f"constexprs without a value: {missing}")
        return index, row
    start = time.perf_counter()
    try:
        src = ASTSource(fn, signature, constexprs=constexprs)
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        row.update(shared=int(kernel.metadata.shared), seconds=time.perf_counter() - start)
    except Exception as exc:  # report every failure, keep compiling the others
        row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return index, row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles")
    ap.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    ap.add_argument("--fresh", action="store_true", help="compile into an empty Triton cache")
    args = ap.parse_args(argv)
    if args.fresh:
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="cdfast-aot-")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the runtime default; silences a notice

    start = time.perf_counter()
    jobs = [(i, arch) for i in range(len(_specs())) for arch in args.arch]
    if args.jobs > 1:
        import multiprocessing as mp

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            results = list(pool.map(_compile, jobs))
    else:
        results = [_compile(j) for j in jobs]

    failed = 0
    header = f"{'kernel':<18} {'variant':<8} {'tiles':<38} {'warps':>5} {'stages':>6} {'arch':>5} " \
             f"{'shared B':>9} {'limit B':>8} {'status':<8}"
    print(header)
    print("-" * len(header))
    for _, row in sorted(results, key=lambda r: (r[0], r[1]["arch"])):
        limit = SMEM_LIMIT[row["arch"]]
        if "error" in row:
            status, shared = "FAIL", "-"
            failed += 1
        else:
            shared = row["shared"]
            status = "ok" if shared <= limit else "TOO BIG"
            failed += shared > limit
        print(f"{row['kernel']:<18} {row['variant']:<8} {row['tiles']:<38} {row['warps']!s:>5} {row['stages']!s:>6} "
              f"sm_{row['arch']:<2} {shared!s:>9} {limit:>8} {status:<8}")
        if "error" in row:
            print(f"    {row['error']}")
    print(f"{len(results)} compiles, {failed} failed, {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
