"""The ``cuda`` backend: the CUDA C++ extension ``cdfast._cuda``.

``gram_solve``
    The persistent fused Gram-form solver (``csrc/gram_solver_kernel.cuh``): one
    cooperative launch runs every step of :func:`cdfast.layer.solvers.gram_iterative` for
    one layer — gradient ``(W−A)·H + F``, Adam or SGD+momentum with masked state,
    the constraint schedule (channel top-k ramp and lr drop, weight top-k ramp, N:M,
    L1 and group-lasso prox, straight-through B-bit quantization with best-iterate
    tracking and closed-form scale refits) — and returns ``(W_latent, history)`` as
    the torch path does. The iterates are the same up to floating-point rounding
    (the kernel sums in another order and accumulates reductions in float64);
    top-k ties are broken by a fixed order (lowest channel index).

The extension is linked against the static CUDA runtime, so it imports where no
GPU is; the probe then says why the backend cannot run. It also compares each
device's compute capability with the targets the build carries (``setup.py``'s
``CDFAST_CUDA_ARCHS``, by default machine code for sm_80 and sm_90 and PTX for
compute_90): a V100 or a T4 has no kernel, so ``backend="auto"`` never picks this
backend there. Combinations the kernel does not cover, a device without a kernel,
and launch errors that mean the same (:data:`UNSUPPORTED_LAUNCH_ERRORS`) raise
:class:`~cdfast.dispatch.Unsupported`: the dispatcher runs the torch path, or raises
``BackendUnavailable`` in strict mode.
"""
from __future__ import annotations

import re

import torch

from .. import dispatch
from ..dispatch import Unsupported, register
from ..layer.constraints import L1, GroupLasso
from ..layer.losses import robust_cholesky
from ..layer.solvers.iterative import history_steps

_ext = None
_import_error: str | None = None
try:
    from .. import _cuda as _ext  # type: ignore[attr-defined]
except ImportError as exc:  # built without nvcc, or a source checkout
    _import_error = f"the CUDA extension cdfast._cuda is not built ({exc})"

_DTYPES = {torch.float32: 0, torch.float64: 1}
_probe_cache: list = []

#: What the CUDA runtime says when a kernel cannot run on a device (no machine code
#: or PTX for its compute capability, too many registers or blocks for it, a driver
#: too old for the PTX): the torch path runs instead. These errors are not sticky —
#: nothing was launched — so the CUDA context stays usable. Names and messages both,
#: since the launchers report either.
UNSUPPORTED_LAUNCH_ERRORS = (
    "cudaErrorNoKernelImageForDevice", "no kernel image is available",
    "cudaErrorInvalidDeviceFunction", "invalid device function",
    "cudaErrorInvalidKernelImage", "device kernel image is invalid",
    "cudaErrorLaunchOutOfResources", "too many resources requested",
    "cudaErrorCooperativeLaunchTooLarge", "too many blocks in cooperative launch",
    "cudaErrorUnsupportedPtxVersion", "PTX was compiled with an unsupported toolchain",
    "cudaErrorJitCompilerNotFound", "PTX JIT compiler library not found",
    "does not support cooperative launches", "does not fit on one multiprocessor",
)


def build_targets(ext=None) -> tuple[str, ...]:
    """The GPU targets the extension was compiled for, e.g. ``("sm_80", "sm_90", "sm_90a", "compute_90")``.

    ``setup.py`` records them (``CDFAST_CUDA_ARCHS``); empty when unknown.
    """
    ext = _ext if ext is None else ext
    return tuple(t for t in str(getattr(ext, "targets", "")).split() if t)


def kernel_target(capability: tuple[int, int], targets) -> str | None:
    """Which of ``targets`` runs on a device of compute ``capability``, or None.

    Machine code ``sm_XY`` runs on devices ``X.Z`` with ``Z >= Y`` (same major);
    ``sm_XYa`` only on ``X.Y``; ``sm_XYf`` on its family (``X.Z``, ``Z >= Y``).
    PTX ``compute_XY`` is compiled by the driver for any device of capability at
    least ``X.Y`` (``compute_XYa`` only for ``X.Y``). Machine code is preferred.
    """
    major, minor = capability
    sass, ptx = None, None
    for t in targets:
        m = re.fullmatch(r"(sm|compute)_(\d+)(\d)([af]?)", t)
        if not m:
            continue
        kind, tmaj, tmin, suffix = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if suffix == "a":
            fits = (major, minor) == (tmaj, tmin)
        elif kind == "sm":
            fits = major == tmaj and minor >= tmin
        else:
            fits = (major, minor) >= (tmaj, tmin)
        if fits and kind == "sm":
            sass = sass or t
        elif fits:
            ptx = ptx or t
    return sass or ptx


def _device_reason(index: int, targets) -> str | None:
    """Why device ``index`` cannot run this build's kernels, or None."""
    if not targets:
        return None  # an extension that does not say: the launch decides (and maps its error)
    cap = torch.cuda.get_device_capability(index)
    if kernel_target(cap, targets) is None:
        return (f"cuda:{index} ({torch.cuda.get_device_name(index)}) has compute capability {cap[0]}.{cap[1]}, "
                f"and this build of cdfast carries kernels for {', '.join(targets)} only (rebuild with "
                f"CDFAST_CUDA_ARCHS=sm_{cap[0]}{cap[1]})")
    return None


def _probe() -> str | None:
    if _ext is None:
        return _import_error
    if not _probe_cache:
        n, why = _ext.device_count()
        if why:
            reason = f"no usable CUDA device ({why})"
        elif n < 1:
            reason = "no CUDA device is visible"
        elif not torch.cuda.is_available():
            reason = "this torch has no CUDA support (torch.cuda.is_available() is False)"
        else:
            # usable when one visible device has a kernel; solve() checks the device of each call
            reasons = [_device_reason(i, build_targets()) for i in range(torch.cuda.device_count())]
            reason = None if any(r is None for r in reasons) else "; ".join(reasons)
        _probe_cache.append(reason)
    return _probe_cache[0]


dispatch.register_probe("cuda", _probe)


def _check_device(device: torch.device, ext) -> None:
    """Raise :class:`Unsupported` when the tensors' device has no kernel in this build."""
    if getattr(ext, "emulated", False):
        return
    why = _device_reason(device.index if device.index is not None else torch.cuda.current_device(),
                         build_targets(ext))
    if why is not None:
        raise Unsupported(why)


def _launch(fn, args: dict):
    """Run a launcher of the extension; a "cannot run here" error becomes :class:`Unsupported`."""
    try:
        return fn(args)
    except RuntimeError as exc:
        if any(s in str(exc) for s in UNSUPPORTED_LAUNCH_ERRORS):
            raise Unsupported(f"the CUDA kernel cannot run on this device: {exc}") from exc
        raise


# ------------------------------------------------------------------ gram_solve
def _schedule_arrays(plan, cfg, log_steps: list[int]):
    """The plan's :class:`~cdfast.layer.plan.StepSchedule` as the kernel's two tables:
    per step ``(lr, lr/(1−β₁ᵗ), √(1−β₂ᵗ))`` and ``(channel_k, weight_k, log_slot)``."""
    sched = plan.schedule
    slot = {s: j for j, s in enumerate(log_steps)}
    sched_f = sched.optimizer_table(cfg.lr, cfg.betas)
    sched_i = [(sched.channel_k[i], sched.weight_k[i], slot.get(i, -1)) for i in range(cfg.steps)]
    return sched_f, sched_i


def _check_supported(quad, plan, cfg) -> None:
    if cfg.solver not in ("adam", "sgd"):
        raise Unsupported(f"solver {cfg.solver!r}: the CUDA kernel runs adam and sgd")
    A = quad.anchor
    if A.dtype not in _DTYPES:
        raise Unsupported(f"dtype {A.dtype}: the CUDA kernel runs float32 and float64")
    if sum(isinstance(p, L1) for p in plan.penalties) > 1 or sum(isinstance(p, GroupLasso)
                                                                for p in plan.penalties) > 1:
        raise Unsupported("more than one L1 or GroupLasso penalty on one layer")
    if plan.nm is not None and plan.nm.m > 32:
        raise Unsupported(f"NMSparsity m={plan.nm.m}: the CUDA kernel handles m <= 32")
    if A.dim() == 3 and A.numel() >= 2 ** 31:
        raise Unsupported(f"a layer of {A.numel()} weights: the CUDA kernel counts in 32 bits")


def solve(quad, plan, cfg, ext=None, max_blocks: int = 0):
    """Run the persistent solver of ``ext`` (default: ``cdfast._cuda``) on ``quad``.

    Same contract as :func:`cdfast.layer.solvers.gram_iterative`: returns
    ``(W_latent, history)`` and leaves ``plan.mask`` / ``plan.scale`` as it does.
    ``ext`` may be the CPU emulation of the tests (host tensors); ``max_blocks``
    caps the grid (0: as many blocks as fit on the device).
    """
    ext = _ext if ext is None else ext
    if ext is None:
        raise Unsupported(_import_error or "the CUDA extension is not built")
    if quad.H is None:
        raise Unsupported("the low-rank form (H as a factor) runs on the torch engine")
    _check_supported(quad, plan, cfg)
    emulated = bool(getattr(ext, "emulated", False))
    A = quad.anchor.contiguous()
    H = quad.H.to(A.dtype).contiguous()
    Fm = quad.F.to(A.dtype).contiguous()
    device = A.device
    if not emulated and device.type != "cuda":
        raise ValueError(f"quad: the cuda backend runs on CUDA tensors, got device {device}")
    _check_device(device, ext)
    if H.device != device or Fm.device != device:
        raise ValueError("quad: H, F and the anchor must be on one device")
    if A.dim() != 3 or H.shape != (A.shape[0], A.shape[2], A.shape[2]) or Fm.shape != A.shape:
        raise ValueError(f"quad: expected H (G, D, D) and F like the anchor (G, R, D), got H {tuple(H.shape)}, "
                         f"F {tuple(Fm.shape)}, anchor {tuple(A.shape)}")
    geo = plan.geometry
    G, R, D = A.shape
    wc = geo.cols
    if G != geo.groups or D not in (wc, wc + 1) or tuple(plan.mask.shape) != (G, R, D):
        raise ValueError("plan: its geometry and mask do not match the quadratic")
    dt = A.dtype
    log_steps = history_steps(cfg)
    sched_f, sched_i = _schedule_arrays(plan, cfg, log_steps)
    steps = cfg.steps
    nm_step = plan.schedule.nm_step
    l1 = next((p for p in plan.penalties if isinstance(p, L1)), None)
    gl = next((p for p in plan.penalties if isinstance(p, GroupLasso)), None)
    l1_first = int(l1 is not None and gl is not None and plan.penalties.index(l1) < plan.penalties.index(gl))

    W = (A * plan.mask).contiguous()
    Wb = torch.empty_like(W)
    m = torch.zeros_like(W)
    v = torch.zeros_like(W) if cfg.solver == "adam" else None
    mask = plan.mask.to(torch.uint8).contiguous()
    TM, TN = ext.tile_shape()
    ntiles = G * (-(-R // TM)) * (-(-D // TN))
    log_part = torch.zeros(len(log_steps), ntiles, dtype=torch.float64, device=device)
    ws = torch.zeros(ext.gram_workspace_bytes(G, R, D, geo.group_in, _DTYPES[dt]), dtype=torch.uint8,
                     device=device)
    f_sched = torch.tensor(sched_f, dtype=torch.float64, device=device).contiguous()
    i_sched = torch.tensor(sched_i, dtype=torch.int64, device=device).contiguous()
    f0 = float(quad.f0)
    args = dict(dtype=_DTYPES[dt], device=device.index or 0,
                G=G, R=R, D=D, wc=wc, taps=geo.taps, group_in=geo.group_in, steps=steps,
                solver=0 if cfg.solver == "adam" else 1, beta1=float(cfg.betas[0]), beta2=float(cfg.betas[1]),
                eps=float(cfg.eps), momentum=float(cfg.momentum), two_s=2.0 * quad.scale,
                H=H.data_ptr(), F=Fm.data_ptr(), A=A.data_ptr(), W=W.data_ptr(), Wb=Wb.data_ptr(),
                m=m.data_ptr(), v=v.data_ptr() if v is not None else 0, mask=mask.data_ptr(),
                sched_f=f_sched.data_ptr(), sched_i=i_sched.data_ptr(), nm_step=nm_step,
                nm_n=plan.nm.n if plan.nm is not None else 0, nm_m=plan.nm.m if plan.nm is not None else 0,
                l1=float(l1.strength) if l1 is not None else 0.0,
                gl=float(gl.strength) if gl is not None else 0.0, l1_first=l1_first,
                f0=f0, nlog=len(log_steps), log_part=log_part.data_ptr() if log_steps else 0,
                workspace=ws.data_ptr(), workspace_bytes=ws.numel(), max_blocks=int(max_blocks))
    keep = [H, Fm, A, W, Wb, m, v, mask, log_part, ws, f_sched, i_sched]
    if plan.quant is not None:
        plan.init_scale(W, quad.row_values)
        scale = plan.scale.reshape(-1).to(dt).contiguous().clone()
        Rq = torch.bmm(A, H) - Fm  # the kernel subtracts the current bias column's share
        Rq = Rq.contiguous()
        best_W = W.clone()
        best_scale = scale.clone()
        best_val = torch.zeros(1, dtype=torch.float64, device=device)
        args.update(bits=plan.quant.bits, scale_mode=1 if plan.quant.per_channel else 2,
                    refit_every=max(1, steps // 10), best_from=plan.schedule.final_from, scale=scale.data_ptr(), Rq=Rq.data_ptr(),
                    best_W=best_W.data_ptr(), best_scale=best_scale.data_ptr(), best_val=best_val.data_ptr())
        keep += [scale, Rq, best_W, best_scale, best_val]
    if not emulated:
        with torch.cuda.device(device):
            args["stream"] = torch.cuda.current_stream(device).cuda_stream
            _launch(ext.gram_solve, args)
    else:
        _launch(ext.gram_solve, args)
    del keep  # the launch is stream-ordered: the caching allocator keeps the memory safe

    # Results and the plan's state, as gram_iterative leaves them.
    plan.mask = mask.bool()
    if plan.quant is not None:
        W = best_W
        plan.scale = best_scale.reshape(plan.scale.shape)
    history = []
    if log_steps:
        vals = ((log_part.sum(dim=1) + f0) * quad.scale).tolist()
        history = list(zip(log_steps, vals))
    return W, history


@register("gram_solve", "cuda")
def gram_solve(quad, plan, cfg):
    """The persistent CUDA solver; same contract as :func:`cdfast.layer.solvers.gram_iterative`."""
    return solve(quad, plan, cfg)
