"""The CUDA backend: the persistent Gram-form solver.

Three layers of tests:

* build: the extension module is built and imports (no GPU needed), and nvcc
  compiles the .cu sources (skipped without nvcc);
* emulation: the kernels' own source compiled for the CPU (csrc/emu_bindings.cpp:
  std::threads for CUDA threads, real barriers for __syncthreads and the grid sync)
  runs the solver's exact code path against the torch oracle — multi-block,
  multi-tile, every constraint kind — on a machine without a GPU;
* GPU: the real kernels against the torch path (skipped cleanly without a GPU).
"""
import importlib.util
import os
import shutil
import subprocess
import sysconfig

import pytest
import torch
import torch.nn as nn

import cdfast
from cdfast import dispatch
from cdfast.layer.plan import ConstraintPlan
from cdfast.layer.geometry import LayerGeometry
from cdfast.layer.losses import LossSpec, Quadratic
from cdfast.layer.solvers import SolverConfig, gram_iterative
from cdfast.layer.statistics import LayerStatistics
from helpers import PRUNE_AND_QUANTIZE, prune_quantize_ratio

cuda_backend = pytest.importorskip("cdfast._backends.cuda")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(REPO, "csrc")
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)
CUDA_REASON = cdfast.backends()["cuda"]
HAS_GPU = CUDA_REASON == "available"
gpu = pytest.mark.skipif(not HAS_GPU, reason=f"cuda backend unavailable: {CUDA_REASON}")


# ------------------------------------------------------------------ problems
def make_problem(compression, *, cin=12, cout=70, k=3, groups=1, fit_bias=False, dtype=torch.float64,
                 steps=12, solver="adam", lr=1e-2, loss="nc", device="cpu", seed=0):
    """A conv layer's quadratic, two fresh plans (torch, kernel) and the solver settings."""
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


def assert_same_solve(quad, p_ref, p_ker, cfg, ext, max_blocks=0, rtol=1e-10, atol=1e-12, hist_rtol=1e-10):
    W_ref, h_ref = gram_iterative(quad, p_ref, cfg)
    W_ker, h_ker = cuda_backend.solve(quad, p_ker, cfg, ext=ext, max_blocks=max_blocks)
    assert W_ker.shape == W_ref.shape and W_ker.dtype == W_ref.dtype and W_ker.device == W_ref.device
    assert torch.equal(p_ker.mask, p_ref.mask)
    torch.testing.assert_close(W_ker, W_ref, rtol=rtol, atol=atol)
    assert [s for s, _ in h_ker] == [s for s, _ in h_ref]
    for (_, a), (_, b) in zip(h_ker, h_ref):
        assert abs(a - b) <= hist_rtol * max(1e-30, abs(b)) + 1e-300
    if p_ref.scale is not None:
        torch.testing.assert_close(p_ker.scale, p_ref.scale, rtol=rtol, atol=atol)
    return W_ref, W_ker


# ------------------------------------------------------------------ build
@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
def test_cuda_extension_is_built_and_imports_without_gpu():
    spec = importlib.util.find_spec("cdfast._cuda")
    assert spec is not None, "nvcc is here but cdfast._cuda was not built (pip install --no-build-isolation -e .)"
    ext = importlib.import_module("cdfast._cuda")
    assert ext.emulated is False
    n, why = ext.device_count()
    assert isinstance(n, int) and isinstance(why, str)
    assert ext.tile_shape() == (64, 64)
    assert ext.gram_workspace_bytes(1, 70, 108, 12, 0) > 0
    reason = cdfast.backends()["cuda"]
    assert reason == "available" or (isinstance(reason, str) and len(reason) > 10)
    if n == 0 or why:
        assert reason != "available"
        # without a GPU every launch is refused with an exception, never a crash
        with pytest.raises(RuntimeError, match="CUDA"):
            ext.gram_solve({"dtype": 0, "device": 0})


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("source", ["gram_solver.cu"])
def test_cu_sources_compile_with_nvcc(source, tmp_path):
    out = tmp_path / (source + ".ptx")
    cmd = [NVCC, "--ptx", "-std=c++17", "-arch=compute_90", f"-I{CSRC}", os.path.join(CSRC, source),
           "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    ptx = out.read_text()
    assert ".entry" in ptx and "gram_kernel" in ptx


# ------------------------------------------------------------------ emulation
@pytest.fixture(scope="session")
def emu(tmp_path_factory):
    """csrc/emu_bindings.cpp built with the host compiler (C++20) into a temp dir."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler for the CUDA emulation")
    try:
        import pybind11
    except ImportError:
        pytest.skip("pybind11 is not installed")
    out_dir = tmp_path_factory.mktemp("cuda_emu")
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    target = out_dir / f"cdfast_cuda_emu{suffix}"
    cmd = [cxx, "-std=c++20", "-O2", "-g0", "-shared", "-fPIC", "-pthread", f"-I{CSRC}",
           f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
           os.path.join(CSRC, "emu_bindings.cpp"), "-o", str(target)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0 and "c++20" in r.stderr.lower():
        pytest.skip(f"the host compiler lacks C++20: {r.stderr[-300:]}")
    assert r.returncode == 0, r.stderr[-3000:]
    spec = importlib.util.spec_from_file_location("cdfast_cuda_emu", target)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.emulated is True
    return mod


EMU_CASES = [
    # (compression, problem keywords, max_blocks)
    (None, {}, 3),
    (None, {"solver": "sgd"}, 2),
    (cdfast.L1(0.5), {}, 3),
    ([cdfast.L1(0.5), cdfast.GroupLasso(2.0)], {}, 3),
    (cdfast.ChannelPrune(0.5), {"fit_bias": True}, 3),
    (cdfast.ChannelPrune(0.5), {"groups": 2, "solver": "sgd"}, 4),
    (cdfast.WeightPrune(0.3), {}, 2),
    ([cdfast.WeightPrune(0.7), cdfast.L1(0.4)], {"steps": 15}, 3),  # ties among zeroed weights
    (cdfast.NMSparsity(1, 3), {"groups": 2, "fit_bias": True}, 3),
    (cdfast.Quantize(3), {}, 3),
    (cdfast.Quantize(4, per_channel=False), {"fit_bias": True, "steps": 20}, 2),
    ([cdfast.ChannelPrune(0.4), cdfast.Quantize(2), cdfast.L1(0.3)], {"steps": 15}, 3),
    ([cdfast.NMSparsity(2, 4), cdfast.GroupLasso(1.0), cdfast.L1(0.1)], {"cin": 8, "cout": 20}, 1),
]


@pytest.mark.parametrize("compression,kw,blocks", EMU_CASES, ids=lambda x: str(x)[:60])
def test_emulated_kernel_matches_torch_float64(emu, compression, kw, blocks):
    quad, p_ref, p_ker, cfg = make_problem(compression, **kw)
    W_ref, _ = assert_same_solve(quad, p_ref, p_ker, cfg, emu, max_blocks=blocks)
    if p_ref.quant is None:  # (a quantized solve may keep its first iterate as the best)
        assert float((W_ref - quad.anchor).abs().max()) > 1e-4  # the problem moved


@pytest.mark.parametrize("compression", [cdfast.WeightPrune(0.3), cdfast.ChannelPrune(0.3),
                                         cdfast.GroupLasso(1.0)], ids=str)
def test_emulated_kernel_matches_torch_float32(emu, compression):
    quad, p_ref, p_ker, cfg = make_problem(compression, dtype=torch.float32, cin=20, cout=30, k=1)
    assert_same_solve(quad, p_ref, p_ker, cfg, emu, max_blocks=2, rtol=1e-5, atol=1e-6, hist_rtol=1e-5)


def test_emulated_binding_rejects_bad_arguments(emu):
    quad, _, plan, cfg = make_problem(None, cin=4, cout=3)
    with pytest.raises(ValueError, match="missing"):
        emu.gram_solve({"dtype": 0, "device": 0, "G": 1})
    with pytest.raises(TypeError, match="R"):
        emu.gram_solve({"dtype": 0, "device": 0, "G": 1, "R": "3"})
    with pytest.raises(ValueError, match="dtype"):
        emu.gram_solve({"dtype": 2, "device": 0})
    with pytest.raises(ValueError, match="wc"):
        emu.gram_solve(dict(dtype=0, device=0, G=1, R=3, D=10, wc=8, taps=1, group_in=8))
    with pytest.raises(ValueError, match="bits"):
        emu.gram_solve(dict(dtype=0, device=0, G=1, R=2, D=4, wc=4, taps=1, group_in=4, steps=1, solver=1,
                            two_s=1.0, bits=9))
    with pytest.raises(ValueError, match="null pointer"):
        emu.gram_solve(dict(dtype=0, device=0, G=1, R=2, D=4, wc=4, taps=1, group_in=4, steps=1, solver=1,
                            two_s=1.0, H=0))
    with pytest.raises(dispatch.Unsupported):
        cuda_backend.solve(quad, plan, SolverConfig(solver="exact", steps=3), ext=emu)
    with pytest.raises(ValueError, match="workspace_bytes"):
        t = torch.zeros(8)
        p = t.data_ptr()
        emu.gram_solve(dict(dtype=0, device=0, G=1, R=2, D=4, wc=4, taps=1, group_in=4, steps=1, solver=1,
                            two_s=1.0, H=p, F=p, A=p, W=p, Wb=p, m=p, mask=p, sched_f=p, sched_i=p,
                            workspace=p, workspace_bytes=8))


# ------------------------------------------------------------------ GPU
@gpu
def test_probe_and_dispatch_pick_cuda_for_cuda_tensors():
    name, fn = dispatch.resolve("gram_solve", "cuda")
    assert name == "cuda" and fn is cuda_backend.gram_solve


GPU_CASES = EMU_CASES + [
    (cdfast.ChannelPrune(0.3), {"cin": 64, "cout": 150, "steps": 60}, 0),
    (cdfast.WeightPrune(0.2), {"cin": 64, "cout": 150, "steps": 60}, 0),
    ([cdfast.GroupLasso(0.5), cdfast.Quantize(4)], {"cin": 32, "cout": 100, "steps": 40}, 0),
]


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("compression,kw,blocks", GPU_CASES, ids=lambda x: str(x)[:60])
def test_gpu_solver_matches_torch_path(compression, kw, blocks):
    quad, p_ref, p_ker, cfg = make_problem(compression, device="cuda", **kw)
    assert_same_solve(quad, p_ref, p_ker, cfg, None, max_blocks=blocks, rtol=1e-9, atol=1e-11, hist_rtol=1e-9)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("compression", [None, cdfast.ChannelPrune(0.5), cdfast.WeightPrune(0.3),
                                         cdfast.NMSparsity(2, 4), cdfast.GroupLasso(0.5), cdfast.L1(0.05),
                                         cdfast.Quantize(3)], ids=str)
def test_gpu_distill_layer_cuda_equals_torch(compression):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 24, 3, padding=1).double().cuda()
    h_t = torch.randn(8, 16, 8, 8, dtype=torch.float64, device="cuda")
    h_s = h_t + 0.3 * torch.randn_like(h_t)
    kw = dict(loss="nc", compression=compression, solver="adam", steps=40, lr=1e-2, stats_dtype=torch.float64,
              log_every=1)
    a = cdfast.distill_layer(conv, h_t, h_s, backend="cuda", **kw)
    b = cdfast.distill_layer(conv, h_t, h_s, backend="torch", **kw)
    assert a.backend == "cuda"
    assert torch.equal(a.mask, b.mask)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-9, atol=1e-11)
    if a.codes is not None:
        assert torch.equal(a.codes, b.codes)


@gpu
@pytest.mark.gpu
def test_gpu_float32_solver_close_to_torch():
    quad, p_ref, p_ker, cfg = make_problem(cdfast.ChannelPrune(0.5), device="cuda", dtype=torch.float32,
                                           cin=64, cout=96, steps=50)
    assert_same_solve(quad, p_ref, p_ker, cfg, None, rtol=1e-4, atol=1e-5, hist_rtol=1e-4)


@gpu
@pytest.mark.gpu
def test_gpu_bad_arguments_raise():
    ext = cuda_backend._ext
    p = torch.zeros(16).data_ptr()  # host memory
    with pytest.raises(ValueError, match="device memory|host"):
        ext.gram_solve(dict(dtype=0, device=0, G=1, R=2, D=4, wc=4, taps=1, group_in=4, steps=1, solver=1,
                            two_s=1.0, H=p, F=p, A=p, W=p, Wb=p, m=p, mask=p, sched_f=p, sched_i=p,
                            workspace=p, workspace_bytes=1 << 20))
    quad, _, plan, cfg = make_problem(None, device="cuda", cin=4, cout=3)
    with pytest.raises(dispatch.Unsupported):
        cuda_backend.gram_solve(quad, plan, SolverConfig(solver="exact", steps=3))
    torch.cuda.synchronize()  # nothing left broken behind


@pytest.mark.parametrize("compression", PRUNE_AND_QUANTIZE, ids=str)
def test_emulated_prune_and_quantize_ends_clearly_below_naive(emu, compression):
    """The kernel tracks the best iterate only from the schedule's ``final_from`` on."""
    def solve(quad, plan, cfg):
        return cuda_backend.solve(quad, plan, cfg, ext=emu, max_blocks=2)
    assert prune_quantize_ratio(solve, compression, steps=120) < 0.3
