"""Measurement helpers: machine facts, peak rates, timing, peak memory, counted work.

Counted work (FLOPs and bytes) is what the algorithm must do, not what a particular
kernel happens to do; it is the numerator of "achieved FLOP/s" and of the floor
``max(FLOPs / peak FLOP/s, bytes / peak bytes/s)``. See :func:`layer_work`.
"""
from __future__ import annotations

import csv
import ctypes
import math
import gc
import os
import platform
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
F32 = 4  # bytes per float32


# ------------------------------------------------------------------ machine facts
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def git_state() -> str:
    """``<commit>`` or ``<commit>+dirty`` of the repository (read only)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (commit or "unknown") + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --------------------------------------------------------------------- peak rates
def measure_peaks(device: torch.device, quick: bool = False) -> dict:
    """The machine's peak fp32 matmul FLOP/s and copy bytes/s, measured now.

    FLOP/s: the best of several ``n × n`` fp32 matmuls (``2n³`` FLOP each), default
    matmul settings (TF32 as torch has it configured). Bytes/s: the best of several
    copies of a large fp32 buffer (read + write = ``2 × size`` bytes).
    """
    if device.type == "cuda":
        n, copy_elems, reps = 8192, 1 << 28, 10  # 1 GiB buffers
    else:
        n, copy_elems, reps = (1024, 1 << 23, 4) if quick else (2048, 1 << 26, 8)  # 32 / 256 MiB
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, generator=g)
    b = torch.randn(n, n, device=device, generator=g)
    c = torch.empty(n, n, device=device)
    torch.mm(a, b, out=c)  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        sync(device)
        best = min(best, time.perf_counter() - t)
    flops = 2.0 * n ** 3 / best
    del a, b, c
    src = torch.ones(copy_elems, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best_c = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best_c = min(best_c, time.perf_counter() - t)
    bw = 2.0 * copy_elems * F32 / best_c
    del src, dst
    tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else False
    return {"peak_flops_per_s": flops, "peak_bytes_per_s": bw, "matmul_n": n,
            "copy_bytes": copy_elems * F32, "tf32": tf32}


# ------------------------------------------------------------------ peak memory
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory added while the block runs.

    CUDA: ``torch.cuda.max_memory_allocated`` minus what was allocated before.
    CPU: tracemalloc cannot see tensor storage (torch allocates it outside Python's
    allocator) and ``ru_maxrss`` only ever rises, so the resident set size is sampled
    every ``interval`` seconds by a thread, after ``gc.collect()`` and glibc's
    ``malloc_trim(0)`` have returned free pages; the figure is the peak RSS above the
    starting RSS (``rss_delta``). Allocations living shorter than ``interval`` can be
    missed, so small cases are under-reported rather than over-reported.
    """

    def __init__(self, device: torch.device, interval: float = 0.002):
        self.device = device
        self.interval = interval
        self.peak = 0
        self.method = "cuda_max_allocated" if device.type == "cuda" else "rss_delta"

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        gc.collect()
        if _LIBC is not None:
            try:
                _LIBC.malloc_trim(0)
            except AttributeError:
                pass
        self.base = _rss()
        self._max = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(self.interval):
            r = _rss()
            if r > self._max:
                self._max = r

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            return False
        self._stop.set()
        self._thread.join()
        self.peak = max(self._max, _rss()) - self.base
        return False


# ----------------------------------------------------------------------- timing
@dataclass
class Measurement:
    times: list = field(default_factory=list)
    first_call_s: float = float("nan")
    peak_mem_bytes: int = 0
    mem_method: str = ""
    output: object = None
    single: bool = False  # only the first call was timed

    @property
    def median_s(self) -> float:
        return statistics.median(self.times)

    @property
    def min_s(self) -> float:
        return min(self.times)


def measure(fn, device: torch.device, *, max_repeats: int = 5, budget_s: float = 20.0,
            warmup_is_compile: bool = False) -> Measurement:
    """Time ``fn()``: a first call (warm-up), then timed repeats within ``budget_s``.

    The median is over the timed repeats. When even one repeat would exceed the
    budget the first call is the measurement (``single``; it then includes one-time
    costs, small against calls that long). With ``warmup_is_compile`` the first call
    (compilation) is never used as the measurement: at least one repeat always runs,
    and peak memory is taken on it rather than on the compiling call.
    """
    m = Measurement()
    mem = PeakMemory(device)
    sync(device)
    if warmup_is_compile:
        t = time.perf_counter()
        out = fn()
        sync(device)
        m.first_call_s = time.perf_counter() - t
        del out
    else:
        with mem:
            t = time.perf_counter()
            out = fn()
            sync(device)
            m.first_call_s = time.perf_counter() - t
        m.peak_mem_bytes, m.mem_method = mem.peak, mem.method
        m.output = out
    spent = 0.0
    while len(m.times) < max_repeats:
        expect = statistics.median(m.times) if m.times else m.first_call_s
        if not (warmup_is_compile and not m.times) and spent + expect > budget_s:
            break
        if warmup_is_compile and not m.times:
            with mem:
                t = time.perf_counter()
                out = fn()
                sync(device)
                dt = time.perf_counter() - t
            m.peak_mem_bytes, m.mem_method = mem.peak, mem.method
        else:
            t = time.perf_counter()
            out = fn()
            sync(device)
            dt = time.perf_counter() - t
        m.times.append(dt)
        m.output = out
        spent += dt
    if not m.times:
        m.times = [m.first_call_s]
        m.single = True
    return m


# ------------------------------------------------------------------ counted work
@dataclass(frozen=True)
class LayerShape:
    """A stride-1, 'same'-padded k×k conv layer and its few-shot batch."""

    c_in: int
    c_out: int
    k: int
    hw: int  # input (= output) height and width
    n: int   # samples

    @property
    def d(self) -> int:  # columns of the unfolded input, C_in·k²
        return self.c_in * self.k * self.k

    @property
    def m(self) -> int:  # rows of the unfolded input, N·H_out·W_out
        return self.n * self.hw * self.hw

    @property
    def in_bytes(self) -> int:
        return self.n * self.c_in * self.hw * self.hw * F32

    @property
    def out_bytes(self) -> int:
        return self.m * self.c_out * F32


def ramp_steps(steps: int) -> int:
    """Steps taken before the channel mask is fixed (``int(steps/3) + 1``): both
    implementations run them at full width; cdfast runs the rest on the kept columns."""
    return min(steps, int(steps / 3) + 1)


def layer_work(shape: LayerShape, impl: str, steps: int, keep: float) -> tuple[float, float]:
    """Counted ``(FLOPs, bytes)`` of one implementation on one layer.

    reference (authors' procedure), per step: four convolutions forward (teacher and
        student on h^T and h^S) and two weight gradients: ``12·M·C_out·D`` FLOP;
        each convolution reads its input and writes its output once, the loss reads
        the four outputs and writes two output gradients:
        ``6·in_bytes + 12·out_bytes`` (Adam's weight-sized traffic is negligible).
    cdfast_statistics: three D×D Grams, two symmetric (``M·D²`` each) and one general
        (``2·M·D²``): ``4·M·D²`` FLOP; bytes: the two inputs read once, three Grams
        written.
    cdfast_solver, per step at width d (D for the ramp steps, ``keep·D`` after):
        the gradient ``(W − A)·H + F``: ``2·C_out·d²`` plus Adam ``≈ 16·C_out·d``
        FLOP; bytes: ``H`` read once (``d²``) and eight weight-sized streams
        (W, A, F, G, m, v read/written): ``(d² + 8·C_out·d)·4``. Plus forming the
        quadratic once (``2·C_out·D²`` FLOP, three Grams read).
    cdfast: statistics + solver.
    """
    D, co = shape.d, shape.c_out
    if impl.startswith("reference"):
        flops = 12.0 * shape.m * co * D * steps
        by = (6.0 * shape.in_bytes + 12.0 * shape.out_bytes) * steps
        return flops, by
    stat_f = 4.0 * shape.m * D * D
    stat_b = 2.0 * shape.in_bytes + 3.0 * D * D * F32
    full = ramp_steps(steps)
    rest = steps - full
    dk = max(1, int(keep * shape.c_in + 1e-9)) * shape.k * shape.k
    solve_f = 2.0 * co * D * D
    solve_b = 3.0 * D * D * F32
    for cnt, d in ((full, D), (rest, dk)):
        solve_f += cnt * (2.0 * co * d * d + 16.0 * co * d)
        solve_b += cnt * (d * d + 8.0 * co * d) * F32
    if impl == "cdfast_statistics":
        return stat_f, stat_b
    if impl == "cdfast_solver":
        return solve_f, solve_b
    return stat_f + solve_f, stat_b + solve_b


def format_cell(v):
    """A CSV cell: None and NaN empty, bools as 0/1, floats to 6 significant digits."""
    if v is None:
        return ""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return v


def merge_csv(rows: list[dict], path: Path, columns: list[str], key) -> None:
    """Write ``rows`` to ``path``: rows already there with the same ``key(row)`` are
    replaced, all others kept (so runs of a subset of cases, or of other devices,
    accumulate in one file); written to a temporary file and renamed."""
    new = [{k: format_cell(v) for k, v in r.items()} for r in rows]
    keys = {key(r) for r in new}
    kept = []
    if path.exists():
        with path.open(newline="") as f:
            kept = [r for r in csv.DictReader(f) if key(r) not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        for r in kept + new:
            w.writerow(r)
    tmp.replace(path)
