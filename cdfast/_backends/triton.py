r"""The Triton backend: host-side launchers of the kernels in :mod:`cdfast.kernels`.

Ops registered under ``"triton"`` (:mod:`cdfast.dispatch`):

``statistics``       one-pass dual-path Grams with implicit im2col (float32 only)
``data_targets``     data-form teacher outputs (the forward kernel, once per solve)
``data_loss_grad``   data-form loss and its weight gradient (two implicit GEMMs)
``gram_solve``       the Adam/SGD Gram-form solver, one fused GEMM step per iteration
``soft_threshold``, ``group_shrink``, ``quantize``   the projection operators
``topk_mask``        selection has no Triton kernel: the torch top-k is reused

The kernels run on CUDA tensors, or on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` was set before the kernels were first imported. Arguments a
kernel does not handle (float64, …) raise :class:`~cdfast.dispatch.Unsupported` so
that :func:`cdfast.dispatch.call` runs the torch path; the projection operators,
which the solvers call directly, delegate such inputs to torch themselves.
All matrix products use IEEE float32 (``input_precision="ieee"``; set
``CDFAST_TRITON_PRECISION=tf32x3`` to trade a little accuracy for tensor cores).
"""
from __future__ import annotations

import math
import os

import torch
import triton  # noqa: F401  (ModuleNotFoundError here marks the backend unavailable)

from ..dispatch import Unsupported, register, register_probe
from ..layer import constraints as C
from ..layer.geometry import LayerGeometry
from ..layer.losses import ActivationSpec
from ..layer.solvers.iterative import ITERATIVE_SOLVERS, TorchGramEngine, run_iterative

__all__ = ["statistics", "data_loss_grad", "gram_solve"]


def _probe() -> str | None:
    if torch.cuda.is_available():
        return None
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return ("no CUDA device (set TRITON_INTERPRET=1 before importing cdfast to run the Triton "
            "kernels in the CPU interpreter)")


register_probe("triton", _probe)


def _kernels():
    """The kernel modules, imported on first use. Their ``@triton.jit`` decorators read
    ``TRITON_INTERPRET`` when they run, so the modules are reloaded if it changed since."""
    import importlib  # noqa: PLC0415

    from cdfast.kernels import _common, conv, gram, statistics as stats  # noqa: PLC0415

    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if interpret != (type(gram.gram_step_kernel).__name__ == "InterpretedFunction"):
        for mod in (_common, stats, conv, gram):
            importlib.reload(mod)
    return stats, conv, gram


def _empty(*shape, dtype=torch.float32, device=None) -> torch.Tensor:
    """Allocation of every kernel output (the tests poison it to catch unwritten elements)."""
    return torch.empty(*shape, dtype=dtype, device=device)


def _precision() -> str:
    return os.environ.get("CDFAST_TRITON_PRECISION", "ieee")


def _launch_opts(cfg: dict) -> tuple[dict, dict]:
    """Split a config into constexpr block sizes and launch options."""
    blocks = {k: v for k, v in cfg.items() if k.isupper()}
    opts = {k: cfg[k] for k in ("num_warps", "num_stages") if k in cfg}
    return blocks, opts


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _target_programs(device: torch.device) -> int:
    """Programs that fill the device (2 per SM on CUDA; 1 in the interpreter)."""
    if device.type != "cuda":
        return 1
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _check_float32(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype == torch.float64:
            raise Unsupported("the Triton kernels compute in float32; float64 runs on the torch path")


# ------------------------------------------------------------ layer geometry
def _conv_dims(geometry: LayerGeometry, h: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``h`` as a contiguous ``N × C × H × W`` tensor and the implicit-im2col sizes."""
    g = geometry
    if g.kind == "linear":
        h = h.reshape(-1, g.in_channels)
        n = h.shape[0]
        dims = dict(N=n, M=n, C_in=g.in_channels, H=1, W=1, Wo=1, L=1, KW=1, TAPS=1,
                    SH=1, SW=1, PH=0, PW=0, DH=1, DW=1)
    else:
        n, _, hh, ww = h.shape
        ho, wo = g.output_hw(hh, ww)
        dims = dict(N=n, M=n * ho * wo, C_in=g.in_channels, H=hh, W=ww, Wo=wo, L=ho * wo,
                    KW=g.kernel_size[1], TAPS=g.taps, SH=g.stride[0], SW=g.stride[1],
                    PH=g.padding[0], PW=g.padding[1], DH=g.dilation[0], DW=g.dilation[1])
    dims.update(group_in=g.group_in, D_cols=g.cols)
    return h.contiguous(), dims


def _geo_args(d: dict) -> list:
    return [d["C_in"], d["H"], d["W"], d["Wo"], d["L"], d["group_in"], d["D_cols"],
            d["KW"], d["TAPS"], d["SH"], d["SW"], d["PH"], d["PW"], d["DH"], d["DW"]]


def _splits(n_chunks: int, programs: int, device: torch.device, force: int | None,
            min_chunks: int = 8) -> tuple[int, int]:
    """Split a reduction of ``n_chunks`` tiles over programs: ``(splits, chunks_per_split)``."""
    if force is not None:
        split = max(1, min(int(force), n_chunks))
    else:
        want = _cdiv(_target_programs(device), max(1, programs))
        split = max(1, min(want, n_chunks // min_chunks))
    per = _cdiv(n_chunks, split)
    return _cdiv(n_chunks, per), per


# ---------------------------------------------------------------- statistics
@register("statistics", "triton")
def statistics(h_teacher: torch.Tensor, h_student: torch.Tensor, geometry: LayerGeometry,
               fit_bias: bool, dtype: torch.dtype, mix=(1.0, 0.0, 0.0, 1.0), *,
               split: int | None = None) -> torch.Tensor:
    """``(3, G, D, D)`` float32: ``[x1x1ᵀ, x2x2ᵀ, x2x1ᵀ]`` (see :mod:`cdfast.kernels.statistics`)."""
    if dtype != torch.float32:
        raise Unsupported(f"the Triton statistics kernel accumulates in float32, not {dtype}")
    kstats, _, _ = _kernels()
    ht, dims = _conv_dims(geometry, h_teacher)
    hs, _ = _conv_dims(geometry, h_student)
    if ht.dtype == torch.float64:  # the torch path also rounds the inputs to float32 first
        ht, hs = ht.float(), hs.float()
    dev = ht.device
    G, D = geometry.groups, geometry.cols + int(fit_bias)
    cfg = kstats.CONFIGS[1] if D > 32 else kstats.CONFIGS[0]
    blocks, opts = _launch_opts(cfg)
    nb = _cdiv(D, blocks["BLOCK_D"])
    pairs = torch.tensor([(i, j) for i in range(nb) for j in range(i, nb)], dtype=torch.int32,
                         device=dev)
    n_chunks = _cdiv(dims["M"], blocks["BLOCK_M"])
    n_split, per = _splits(n_chunks, pairs.shape[0] * G, dev, split)
    out = _empty(n_split, 3, G, D, D, dtype=torch.float32, device=dev)
    a, b, c, d = (float(x) for x in mix)
    kstats.dual_gram_kernel[(pairs.shape[0], G, n_split)](
        ht, hs, out, pairs, dims["M"], *_geo_args(dims), D, a, b, c, d, per, 3 * G * D * D,
        HAS_ONES=bool(fit_bias), PRECISION=_precision(), **blocks, **opts)
    return out[0] if n_split == 1 else out.sum(0)


# ---------------------------------------------------------------- data form
class _DataPass:
    """Shared launch arguments of the data-form kernels for one weight matrix and one
    batch; ``student`` selects the terms' student mixes ``(c, d)`` or teacher mixes ``(a, b)``."""

    def __init__(self, W, h_teacher, h_student, geometry, spec, bias, student: bool):
        _check_float32(W, h_teacher, h_student)
        terms = spec.terms
        self.ht, self.dims = _conv_dims(geometry, h_teacher)
        self.hs, _ = _conv_dims(geometry, h_student)
        self.dev = dev = self.ht.device
        self.G, self.R, self.Dw = W.shape
        self.has_ones = self.Dw == geometry.cols + 1
        self.W = W.detach().float().contiguous()
        self.M = self.dims["M"]
        self.TM = len(terms) * self.M
        mixes = [(t.weight, t.c, t.d) if student else (t.weight, t.a, t.b) for t in terms]
        self.coef = torch.tensor(mixes, dtype=torch.float32, device=dev)
        self.need_t = any(m[1] != 0.0 for m in mixes)
        self.need_s = any(m[2] != 0.0 for m in mixes)
        self.act = spec.objective == "activation"
        sigma = spec.activation or ActivationSpec()
        self.affine = self.act and sigma.scale is not None
        self.has_bias = bias is not None and not self.has_ones
        self.bias = bias.detach().float().contiguous() if self.has_bias else self.W
        self.sc = sigma.scale.to(device=dev, dtype=torch.float32).contiguous() if self.affine else self.W
        self.sh = sigma.shift.to(device=dev, dtype=torch.float32).contiguous() if self.affine else self.W
        self.geo = _geo_args(self.dims)
        self.out_channels = geometry.out_channels

    def forward(self, kconv, tgt, dy, inv_numel: float, write_dy: bool, write_y: bool) -> torch.Tensor:
        blocks, opts = _launch_opts(kconv.FWD_CONFIGS[1] if self.R > 32 else kconv.FWD_CONFIGS[0])
        grid = (_cdiv(self.TM, blocks["BLOCK_M"]), _cdiv(self.R, blocks["BLOCK_O"]), self.G)
        part = _empty(grid[0] * grid[1] * grid[2], dtype=torch.float32, device=self.dev)
        kconv.dual_conv_loss_kernel[grid](
            self.W, self.ht, self.hs, tgt, self.bias, self.sc, self.sh, self.coef,
            dy if dy is not None else part, part,
            self.R, self.Dw, self.M, self.TM, self.dims["N"], self.out_channels, *self.geo, inv_numel,
            HAS_ONES=self.has_ones, HAS_BIAS=self.has_bias, ACT=self.act, HAS_AFFINE=self.affine,
            NEED_T=self.need_t, NEED_S=self.need_s, WRITE_DY=write_dy, WRITE_Y=write_y,
            PRECISION=_precision(), **blocks, **opts)
        return part


@register("data_targets", "triton")
def data_targets(A: torch.Tensor, h_teacher: torch.Tensor, h_student: torch.Tensor,
                 geometry: LayerGeometry, spec, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher outputs ``σ(A∗P_t + b)`` of every term, stacked: ``(T, *output_shape)``.

    Computed by the data-form forward kernel itself, so that where the student's
    weight equals the teacher's on the same input the residual is exactly zero.
    """
    _, kconv, _ = _kernels()
    ps = _DataPass(A, h_teacher, h_student, geometry, spec, bias, student=False)
    if geometry.kind == "linear":
        y_shape = (*h_teacher.shape[:-1], geometry.out_channels)
    else:
        y_shape = (h_teacher.shape[0], geometry.out_channels,
                   *geometry.output_hw(h_teacher.shape[2], h_teacher.shape[3]))
    out = _empty((len(spec.terms), *y_shape), dtype=torch.float32, device=ps.dev)
    ps.forward(kconv, out, None, 1.0, False, True)
    return out.to(A.dtype)


@register("data_loss_grad", "triton")
def data_loss_grad(W: torch.Tensor, h_teacher: torch.Tensor, h_student: torch.Tensor,
                   targets: torch.Tensor, geometry: LayerGeometry, spec, bias: torch.Tensor | None = None,
                   need_grad: bool = True, *, split: int | None = None):
    """Data-form loss and ``dL/dW`` (matrix view); see :mod:`cdfast.kernels.conv`."""
    _check_float32(targets)
    _, kconv, _ = _kernels()
    ps = _DataPass(W, h_teacher, h_student, geometry, spec, bias, student=True)
    tg = targets.detach().float().contiguous()
    numel = tg[0].numel()
    dy = _empty(ps.G, ps.R, ps.TM, dtype=torch.float32, device=ps.dev) if need_grad else None
    part = ps.forward(kconv, tg, dy, 1.0 / numel, bool(need_grad), False)
    loss = part.sum() / numel
    if not need_grad:
        return loss, None
    G, R, Dw = ps.G, ps.R, ps.Dw
    wcfg = kconv.WGRAD_CONFIGS[1] if (R > 32 and Dw > 32) else kconv.WGRAD_CONFIGS[0]
    blocks, opts = _launch_opts(wcfg)
    tiles = _cdiv(R, blocks["BLOCK_O"]) * _cdiv(Dw, blocks["BLOCK_D"]) * G
    n_split, per = _splits(_cdiv(ps.TM, blocks["BLOCK_M"]), tiles, ps.dev, split)
    out = _empty(n_split, G, R, Dw, dtype=torch.float32, device=ps.dev)
    grid = (_cdiv(R, blocks["BLOCK_O"]), _cdiv(Dw, blocks["BLOCK_D"]), G * n_split)
    kconv.conv_weight_grad_kernel[grid](
        dy, ps.ht, ps.hs, ps.coef, out, R, Dw, ps.M, ps.TM, *ps.geo, per, n_split,
        HAS_ONES=ps.has_ones, NEED_T=ps.need_t, NEED_S=ps.need_s, PRECISION=_precision(),
        **blocks, **opts)
    grad = out[0] if n_split == 1 else out.sum(0)
    return loss, grad.to(W.dtype)


# ------------------------------------------------------- projection operators
_ELEMENTWISE_BLOCK = 1024


def _one_scalar_table(value: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([value], dtype=torch.float32, device=device),
            torch.zeros(1, dtype=torch.int32, device=device))


@register("soft_threshold", "triton")
def soft_threshold(w: torch.Tensor, threshold: float) -> torch.Tensor:
    """``sign(w)·max(|w| − t, 0)`` (float32; other dtypes use the torch operator)."""
    if w.dtype != torch.float32:
        return C.soft_threshold(w, threshold)
    _, _, kgram = _kernels()
    src = w.contiguous()
    out = _empty(src.shape, dtype=src.dtype, device=src.device)
    n = src.numel()
    if n:
        kgram.soft_threshold_kernel[(_cdiv(n, _ELEMENTWISE_BLOCK),)](
            src, out, n, float(threshold), BLOCK=_ELEMENTWISE_BLOCK)
    return out


_MAX_TAPS = 128


def _prox_blocks(kgram, taps: int) -> tuple[dict, dict]:
    bt = triton.next_power_of_2(taps)
    for cfg in kgram.PROX_CONFIGS:
        if cfg["BLOCK_T"] == bt:
            return _launch_opts(cfg)
    raise Unsupported(f"kernels of {taps} taps exceed the channel-prox configurations")


def _channel_prox(W: torch.Tensor, geometry: LayerGeometry, mode: int, params: torch.Tensor,
                  counter: torch.Tensor, thr_col: int, norms: torch.Tensor | None = None) -> torch.Tensor:
    """Launch :func:`channel_prox_kernel` on the contiguous ``(G, R, D)`` tensor ``W``."""
    _, _, kgram = _kernels()
    g = geometry
    if norms is None:
        norms = _empty(g.groups, g.group_in, dtype=torch.float32, device=W.device)
    blocks, opts = _prox_blocks(kgram, g.taps)
    kgram.channel_prox_kernel[(g.groups * g.group_in,)](
        W, norms, params, counter, W.shape[1], W.shape[2], g.group_in, g.taps, params.shape[-1],
        thr_col, torch.finfo(torch.float32).tiny, MODE=mode, **blocks, **opts)
    return norms


@register("group_shrink", "triton")
def group_shrink(W: torch.Tensor, geometry: LayerGeometry, threshold: float) -> torch.Tensor:
    """``W_i ← max(1 − t/‖W_i‖₂, 0)·W_i`` per input channel (float32, at most 128 taps;
    else the torch operator)."""
    if W.dtype != torch.float32 or geometry.taps > _MAX_TAPS:
        return C.group_shrink(W, geometry, threshold)
    out = W.contiguous().clone()
    params, counter = _one_scalar_table(float(threshold), W.device)
    _channel_prox(out.view(geometry.groups, -1, W.shape[-1]), geometry, 1, params, counter, 0)
    return out


@register("quantize", "triton")
def quantize(W: torch.Tensor, scale: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, values)`` on the grid ``scale·{0, ±1/L, …, ±1}`` (float32; else torch)."""
    if W.dtype != torch.float32 or scale.dtype != torch.float32:
        return C.quantize(W, scale, bits)
    _, _, kgram = _kernels()
    src = W.contiguous()
    cols = src.shape[-1]
    s = scale.expand(*src.shape[:-1], 1).contiguous()
    codes = _empty(src.shape, dtype=torch.int8, device=src.device)
    vals = _empty(src.shape, dtype=src.dtype, device=src.device)
    n = src.numel()
    if n:
        kgram.quantize_kernel[(_cdiv(n, _ELEMENTWISE_BLOCK),)](
            src, s, codes, vals, n, cols, float(2 ** (bits - 1) - 1), 1, BLOCK=_ELEMENTWISE_BLOCK)
    return codes, vals


# Selection (top-k) has no Triton kernel; the triton backend reuses torch's.
register("topk_mask", "triton")(C.topk_mask)


# ----------------------------------------------------------- Gram-form solver
_GRAPH_STEPS = 32  # steps per captured CUDA graph (even: the weight buffers alternate)
_RING = 2 * _GRAPH_STEPS  # loss-partial slots (a value is reduced before its slot is reused)

#: Tests set this to run the graph segments' launch sequence eagerly off CUDA.
_EMULATE_GRAPHS = False


def _graphs_wanted(device: torch.device) -> bool:
    if os.environ.get("CDFAST_CUDA_GRAPHS", "1") == "0":
        return False
    return device.type == "cuda" or _EMULATE_GRAPHS


class TritonGramEngine(TorchGramEngine):
    """The Gram-form steps of :func:`cdfast.layer.solvers.run_iterative` on the Triton kernels.

    Each step is one fused launch (:func:`cdfast.kernels.gram.gram_step_kernel`: the
    GEMM, the loss partials, the masked optimizer update and, where nothing else runs
    after the step, the L1 prox); the schedule's channel norms and the proximal maps
    are :func:`channel_prox_kernel` launches. The weight lives in two buffers (the
    kernel reads all of ``W`` while it writes the next one), so the iterate a step
    started from is the other buffer. Per-step scalars (``lr``, Adam's bias
    corrections, thresholds) come from a device table indexed by a device step
    counter: on CUDA the steady phase (no schedule, no quantizer) runs as captured
    CUDA graphs of ``_GRAPH_STEPS`` steps.

    Everything else — the loop, compaction, the best iterate, scale refits, the
    result — is the torch engine's, so the iterates are the same to float32 rounding.
    """

    def __init__(self, quad, plan, cfg, kgram):
        self.k = kgram
        self.adam = cfg.solver == "adam"
        self.dev = quad.anchor.device
        self.full_quad = quad
        self.plan, self.cfg = plan, cfg
        self.cols = None
        self.two_s = 2.0 * quad.scale
        self._mask_all = bool(plan.mask.all())
        G, R, D = quad.anchor.shape
        self.part_stride = G * _cdiv(R, 32) * _cdiv(D, 32)  # the most programs any config uses
        self.part = torch.zeros(_RING, self.part_stride, dtype=torch.float32, device=self.dev)
        self.counter = torch.zeros(1, dtype=torch.int32, device=self.dev)
        table = plan.schedule.optimizer_table(cfg.lr, cfg.betas)
        self.params = torch.tensor([[*row, *(row[0] * p.strength for p in plan.penalties)] for row in table],
                                   dtype=torch.float32, device=self.dev)
        g = plan.geometry
        self.norms = torch.zeros(g.groups, g.group_in, dtype=torch.float32, device=self.dev)
        self._set_quad(quad, quad.anchor * plan.mask, None, None)
        self._fuse = False
        self.steady_from = plan.schedule.final_from + 1 if plan.schedule.final_from else 0
        self.use_graphs = _graphs_wanted(self.dev) and plan.quant is None
        self.graph = None
        self.warm = 0  # eager steps run in the steady phase (capture waits for two: all compiled)

    # -- state: the quadratic, two weight buffers, the optimizer moments
    def _set_quad(self, quad, W, m, v) -> None:
        self.quad = quad
        self.A, self.H, self.F = (t.contiguous() for t in (quad.anchor, quad.H, quad.F))
        self.bufs = [W.contiguous(), _empty(W.shape, dtype=W.dtype, device=W.device)]
        self.cur = 0
        self.part.zero_()  # fewer programs from now on: no stale partial sums
        self.m = torch.zeros_like(W) if m is None else m.contiguous()
        self.v = (torch.zeros_like(W) if v is None else v.contiguous()) if self.adam else self.m

    def _restrict(self, cols) -> None:
        self._set_quad(self.full_quad.restrict(cols), self.W[..., cols], self.m[..., cols],
                       self.v[..., cols] if self.adam else None)

    @property
    def W(self) -> torch.Tensor:
        return self.bufs[self.cur]

    @W.setter
    def W(self, value: torch.Tensor) -> None:
        self.bufs[self.cur] = value.contiguous()

    @property
    def prev(self) -> torch.Tensor:
        """The iterate the last step started from (the other buffer)."""
        return self.bufs[1 - self.cur]

    def _hand_over_prev(self) -> torch.Tensor:
        return self.prev.clone()  # the other buffer is written by the next step

    # -- launches
    def _launch(self, mask, wc: int, fuse_l1: bool) -> None:
        """The fused GEMM step at the device counter's index."""
        k, plan, cfg = self.k, self.plan, self.cfg
        W, Wn = self.bufs[self.cur], self.bufs[1 - self.cur]
        G, R, D = W.shape
        blocks, opts = _launch_opts(k.STEP_CONFIGS[1] if (R > 32 and D > 32) else k.STEP_CONFIGS[0])
        grid = (_cdiv(R, blocks["BLOCK_R"]), _cdiv(D, blocks["BLOCK_N"]), G)
        quant = plan.quant is not None
        scale = plan.scale.contiguous() if quant else W
        b1, b2 = cfg.betas
        k.gram_step_kernel[grid](
            W, Wn, self.A, self.H, self.F, self.m, self.v,
            mask if mask is not None else W, scale, self.params, self.counter, self.part,
            R, D, wc, self.params.shape[1], self.part_stride, _RING, self.two_s,
            1.0 - b1, b2, 1.0 - b2, cfg.eps, cfg.momentum,
            float(plan.quant.levels) if quant else 1.0,
            1 if (quant and scale.numel() > 1) else 0,
            ADAM=self.adam, HAS_MASK=mask is not None, QUANT=quant, FUSE_L1=fuse_l1,
            PRECISION=_precision(), **blocks, **opts)
        self.cur = 1 - self.cur

    def _penalty(self, j: int) -> None:
        """Proximal map of penalty ``j`` on the current weight, threshold from the table."""
        p = self.plan.penalties[j]
        mode = 2 if isinstance(p, C.L1) else 1
        _channel_prox(self.W, self.plan.geometry, mode, self.params, self.counter, self.k.P_THR0.value + j,
                      self.norms)

    def _penalties(self, lr: float) -> None:
        for j, p in enumerate(self.plan.penalties):
            if (j == 0 and self._fuse) or lr * p.strength == 0:
                continue
            self._penalty(j)

    def channel_norms(self) -> torch.Tensor:
        return _channel_prox(self.W, self.plan.geometry, 0, self.params, self.counter, 0, self.norms)

    def value(self, i: int) -> torch.Tensor:
        """``Σ Δ⊙(G+F) + f₀`` of step ``i`` (a device scalar; no synchronisation)."""
        return self.part[i % _RING].sum() + self.quad.f0

    # -- the engine interface
    def step(self, i: int, lr: float, want_value: bool, keep_previous: bool):
        plan = self.plan
        first = plan.penalties[0] if plan.penalties else None
        # L1 first and nothing of the schedule after this step: fuse its prox into the step.
        self._fuse = (self.cols is None and isinstance(first, C.L1) and not plan.schedule.changes_mask(i)
                      and lr * first.strength != 0)
        self._launch(self._mask(), self.weight_cols, self._fuse)
        return self.value(i) if want_value else None

    def after_step(self, i: int, lr: float) -> None:
        plan = self.plan
        if self.cols is None:
            # ConstraintPlan.after_step's order: schedule, penalties, then the new mask.
            changed = plan.update_mask(self.W, i, norms_fn=self.channel_norms)
            self._penalties(lr)
            if changed:
                self.W.mul_(plan.mask)
                self._mask_all = bool(plan.mask.all())
        self.counter.add_(1)
        if i >= self.steady_from:
            self.warm += 1

    def run_steady(self, i: int, logged, history) -> int:
        """On CUDA, ``_GRAPH_STEPS`` steady steps as one CUDA-graph replay (0: not here)."""
        if not (self.use_graphs and i >= self.steady_from and self.warm >= 2
                and self.cfg.steps - i >= _GRAPH_STEPS):
            return 0
        if self.graph is None:
            self.graph = self._capture(i, self.cfg.lr * self.plan.schedule.lr_factor[i])
        self.graph.replay()
        history.extend((s, self.value(s)) for s in range(i, i + _GRAPH_STEPS) if s in logged)
        return _GRAPH_STEPS

    def _capture(self, i: int, lr: float):
        """Capture ``_GRAPH_STEPS`` steady steps (kernels, penalties, counter) in a CUDA graph.

        Reached once two eager steps of the steady phase have run (every kernel is
        compiled, so nothing compiles during capture). The kernels read their per-step
        scalars through the device counter, so one graph serves every later run of
        steps; the weight buffers alternate an even number of times per graph.
        """
        first = self.plan.penalties[0] if self.plan.penalties else None
        self._fuse = self.cols is None and isinstance(first, C.L1) and lr * first.strength != 0
        mask, wc = self._mask(), self.weight_cols

        def launches():
            start = self.cur
            for _ in range(_GRAPH_STEPS):
                self._launch(mask, wc, self._fuse)
                self._penalties(lr)
                self.counter.add_(1)
            assert self.cur == start  # an even number of ping-pong steps

        if self.dev.type != "cuda":
            return _EagerGraph(launches)
        torch.cuda.synchronize(self.dev)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            launches()
        return graph


class _EagerGraph:
    """Stand-in for a CUDA graph off CUDA (tests): ``replay`` runs the launches eagerly."""

    def __init__(self, launches):
        self.launches = launches

    def replay(self) -> None:
        self.launches()


@register("gram_solve", "triton")
def gram_solve(quad, plan, cfg):
    """:func:`cdfast.layer.solvers.gram_iterative` with each step one fused Triton launch."""
    if quad.H is None:
        raise Unsupported("the low-rank form (H as a factor) runs on the torch engine")
    _check_float32(quad.H, quad.F, quad.anchor)
    if cfg.solver not in ITERATIVE_SOLVERS:
        raise Unsupported(f"solver {cfg.solver!r} is not an iterative Gram solver")
    _, _, kgram = _kernels()
    if plan.channel is not None or plan.penalties:  # fail before any state changes
        _prox_blocks(kgram, plan.geometry.taps)
    return run_iterative(TritonGramEngine(quad, plan, cfg, kgram), plan, cfg)
