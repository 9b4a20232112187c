"""Problems for the CUDA kernels and their CPU emulation, shared by ``tests/test_cuda.py``
and ``tools/sanitizer_cases.py`` (which runs them under compute-sanitizer)."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sysconfig
from pathlib import Path

import torch
import torch.nn as nn

from cdfast.layer.geometry import LayerGeometry
from cdfast.layer.losses import LossSpec, Quadratic
from cdfast.layer.plan import ConstraintPlan
from cdfast.layer.solvers import SolverConfig
from cdfast.layer.statistics import LayerStatistics

CSRC = Path(__file__).resolve().parent.parent / "csrc"


def make_problem(compression, *, cin=12, cout=70, k=3, groups=1, fit_bias=False, dtype=torch.float64,
                 steps=12, solver="adam", lr=1e-2, loss="nc", device="cpu", seed=0):
    """A conv layer's quadratic, two fresh plans (torch, kernel) and the solver settings.

    The default sizes are not tile multiples: 70 rows and D = 108 against 64×64 tiles.
    """
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups).to(dtype)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g, dtype=dtype) * 0.1)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g, dtype=dtype) * 0.1)
    conv = conv.to(device)
    h_t = torch.randn(4, cin, 6, 5, generator=g, dtype=dtype).to(device)
    h_s = h_t + 0.3 * torch.randn(h_t.shape, generator=g, dtype=dtype).to(device)
    geo = LayerGeometry.of(conv)
    stats = LayerStatistics(conv, dtype=dtype, fit_bias=fit_bias, backend="torch")
    stats.update(h_t, h_s)
    anchor = geo.weight_matrix(conv.weight.detach(), conv.bias.detach() if fit_bias else None)
    quad = Quadratic.from_statistics(stats, LossSpec(loss, 0.6, 0.5, 0.5, "linear", None), anchor, dtype=dtype)
    cfg = SolverConfig(solver=solver, steps=steps, lr=lr, log_every=1)

    def plan():
        return ConstraintPlan(compression, geo, steps, anchor.shape[-1], device, dtype, backend="torch")
    return quad, plan(), plan(), cfg


def build_emulation(out_dir: str | os.PathLike):
    """``csrc/emu_bindings.cpp`` built with the host compiler (C++20) into ``out_dir``.

    The kernels' own source on the CPU: each CUDA thread a std::thread, the block and
    grid barriers real barriers. Raises ``RuntimeError`` saying why it cannot be built.
    """
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        raise RuntimeError("no C++ compiler for the CUDA emulation")
    try:
        import pybind11
    except ImportError:
        raise RuntimeError("pybind11 is not installed") from None
    target = Path(out_dir) / f"cdfast_cuda_emu{sysconfig.get_config_var('EXT_SUFFIX')}"
    cmd = [cxx, "-std=c++20", "-O2", "-g0", "-shared", "-fPIC", "-pthread", f"-I{CSRC}",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
           str(CSRC / "emu_bindings.cpp"), "-o", str(target)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"building the CUDA emulation failed: {r.stderr[-3000:]}")
    spec = importlib.util.spec_from_file_location("cdfast_cuda_emu", target)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.emulated is True
    return mod
