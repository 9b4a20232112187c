r"""The Gram-form solver step (SPEC §2.1, §3, §4) and the projection operators.

**One step** (:func:`gram_step_kernel`) of ``cdfast.layer.solvers.gram_iterative`` for the
quadratic ``L(W) = s·[tr(ΔHΔᵀ) + 2tr(ΔFᵀ) + f₀]``, ``Δ = Q(W) − A``, per group:

    G   = Δ·H + F                                  (the GEMM; Δ formed as W tiles load)
    ℓ   = Σ Δ ⊙ (G + F)                            (partial per program: the loss at Q(W))
    g   = 2s·G ⊙ mask,    m ← m ⊙ mask,    v ← v ⊙ mask
    Adam:  m ← m + (1−β₁)(g − m);   v ← β₂v + (1−β₂)g²
           W' = W − (lr/(1−β₁ᵗ))·m / (√v / √(1−β₂ᵗ) + ε)
    SGD:   m ← μ·m + g;   W' = W − lr·m
    L1 (optionally fused):  W' ← sign(W')·max(|W'| − lr·λ, 0)        (weight columns only)

``Q`` is the identity, or the straight-through grid projection
``Q(w) = clamp(round(w/s·L), −L, L)·s/L`` (masked) on the weight columns. The GEMM
reads ``W`` across all columns while the epilogue rewrites columns of it, so the
new weight goes to a second buffer (the host swaps them). Per-step scalars
(``lr``, the bias corrections, thresholds) are read from a device table at the
index held by a device step counter, so a run of steps can be captured in one
CUDA graph.

**Per-channel prox** (:func:`channel_prox_kernel`): one program per input channel
``i`` of a group reduces ``‖W[:, i]‖₂`` over all rows and taps, stores it, and
optionally applies the group-lasso prox ``W_i ← max(1 − t/‖W_i‖₂, 0)·W_i`` (or the
elementwise L1 prox on its columns).
"""
import triton
import triton.language as tl

from ._common import grid_code, grid_project, soft_threshold

#: Columns of the per-step parameter table: lr, Adam step size, √(1−β₂ᵗ), then thresholds.
P_LR, P_STEP, P_BC2, P_THR0 = (tl.constexpr(i) for i in range(4))

STEP_CONFIGS = (
    dict(BLOCK_R=32, BLOCK_N=32, BLOCK_K=32, num_warps=4, num_stages=2),
    dict(BLOCK_R=64, BLOCK_N=64, BLOCK_K=32, num_warps=4, num_stages=2),
)
PROX_CONFIGS = tuple(dict(BLOCK_R=64, BLOCK_T=t, num_warps=4, num_stages=1) for t in (1, 2, 4, 8, 16, 32, 64, 128))
ELEMENTWISE_CONFIGS = (dict(BLOCK=1024, num_warps=4, num_stages=1),)


@triton.jit
def _effective(w, cols, WC, s, levels, mk, QUANT: tl.constexpr, HAS_MASK: tl.constexpr):
    """The weight the loss sees: the grid projection on weight columns (masked)."""
    if QUANT:
        w = tl.where(cols[None, :] < WC, grid_project(w, s, levels), w)
        if HAS_MASK:
            w = tl.where(mk, w, 0.0)
    return w


@triton.jit
def gram_step_kernel(w_ptr, wn_ptr, a_ptr, h_ptr, f_ptr, m_ptr, v_ptr, mask_ptr, qscale_ptr,
                     params_ptr, counter_ptr, part_ptr,
                     R, D, WC, n_params, part_stride, ring, two_s, one_m_b1, b2, one_m_b2, eps, momentum,
                     levels, scale_row_stride,
                     ADAM: tl.constexpr, HAS_MASK: tl.constexpr, QUANT: tl.constexpr,
                     FUSE_L1: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Tile ``(rows, cols)`` of one solver step; see the module docstring.

    Layouts: ``W, A, F, m, v, mask`` are ``(G, R, D)``, ``H`` is ``(G, D, D)``, the grid
    scale ``(G·R)`` rows with stride ``scale_row_stride`` (0: one per layer).
    """
    step = tl.load(counter_ptr)
    prm = params_ptr + step * n_params
    pr = tl.program_id(0)
    pn = tl.program_id(1)
    g = tl.program_id(2)
    rows = pr * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < R
    col_ok = cols < D
    base = g.to(tl.int64) * R * D
    row_off = base + rows[:, None] * D
    h_base = h_ptr + g.to(tl.int64) * D * D
    s = tl.zeros((BLOCK_R, 1), dtype=tl.float32)
    if QUANT:
        s = tl.load(qscale_ptr + (g * R + rows)[:, None] * scale_row_stride, mask=row_ok[:, None],
                    other=1.0)

    acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        ok = row_ok[:, None] & (ks[None, :] < D)
        w = tl.load(w_ptr + row_off + ks[None, :], mask=ok, other=0.0)
        mk = ok
        if HAS_MASK:
            mk = tl.load(mask_ptr + row_off + ks[None, :], mask=ok, other=0) != 0
        w = _effective(w, ks, WC, s, levels, mk, QUANT, HAS_MASK)
        delta = w - tl.load(a_ptr + row_off + ks[None, :], mask=ok, other=0.0)
        h = tl.load(h_base + ks[:, None] * D + cols[None, :],
                    mask=(ks[:, None] < D) & col_ok[None, :], other=0.0)
        acc += tl.dot(delta, h, input_precision=PRECISION)

    ok = row_ok[:, None] & col_ok[None, :]
    off = row_off + cols[None, :]
    f = tl.load(f_ptr + off, mask=ok, other=0.0)
    grad = acc + f
    w_old = tl.load(w_ptr + off, mask=ok, other=0.0)
    mk = ok
    if HAS_MASK:
        mk = tl.load(mask_ptr + off, mask=ok, other=0) != 0
    delta = _effective(w_old, cols, WC, s, levels, mk, QUANT, HAS_MASK) - tl.load(a_ptr + off, mask=ok,
                                                                                 other=0.0)
    part = tl.sum(tl.sum(tl.where(ok, delta * (grad + f), 0.0), axis=1), axis=0)
    pid = (g * tl.num_programs(1) + pn) * tl.num_programs(0) + pr
    tl.store(part_ptr + (step % ring) * part_stride + pid, part)

    grad = grad * two_s
    m = tl.load(m_ptr + off, mask=ok, other=0.0)
    if HAS_MASK:
        grad = tl.where(mk, grad, 0.0)
        m = tl.where(mk, m, 0.0)
    if ADAM:
        v = tl.load(v_ptr + off, mask=ok, other=0.0)
        if HAS_MASK:
            v = tl.where(mk, v, 0.0)
        m = m + one_m_b1 * (grad - m)
        v = v * b2 + one_m_b2 * grad * grad
        denom = tl.math.div_rn(tl.sqrt_rn(v), tl.load(prm + P_BC2) + tl.zeros_like(v)) + eps
        w_new = w_old + tl.math.div_rn(-tl.load(prm + P_STEP) * m, denom)
        tl.store(v_ptr + off, v, mask=ok)
    else:
        m = m * momentum + grad
        w_new = w_old + (-tl.load(prm + P_LR)) * m
    if FUSE_L1:
        w_new = tl.where(cols[None, :] < WC, soft_threshold(w_new, tl.load(prm + P_THR0)), w_new)
    tl.store(m_ptr + off, m, mask=ok)
    tl.store(wn_ptr + off, w_new, mask=ok)


@triton.jit
def channel_prox_kernel(w_ptr, norms_ptr, params_ptr, counter_ptr, R, D, group_in, TAPS,
                        n_params, thr_col, tiny,
                        MODE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_T: tl.constexpr):
    """Program ``(g, i)``: ``norms[g, i] = ‖W_g[:, i·k²:(i+1)·k²]‖₂``; then
    ``MODE`` 0: nothing more, 1: group-lasso prox, 2: L1 prox on those columns.
    The threshold is ``params[counter, thr_col]``. ``W`` is ``(G, R, D)``, in place.
    """
    pid = tl.program_id(0)
    g = pid // group_in
    c = pid - g * group_in
    taps = tl.arange(0, BLOCK_T)
    cols = c * TAPS + taps
    t_ok = taps < TAPS
    base = w_ptr + g.to(tl.int64) * R * D
    thr = tl.load(params_ptr + tl.load(counter_ptr) * n_params + thr_col)
    if MODE == 2:
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            ok = (rows[:, None] < R) & t_ok[None, :]
            ptr = base + rows[:, None] * D + cols[None, :]
            w = tl.load(ptr, mask=ok, other=0.0)
            tl.store(ptr, soft_threshold(w, thr), mask=ok)
    else:
        sq = tl.zeros((BLOCK_R, BLOCK_T), dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rows = r0 + tl.arange(0, BLOCK_R)
            ok = (rows[:, None] < R) & t_ok[None, :]
            w = tl.load(base + rows[:, None] * D + cols[None, :], mask=ok, other=0.0)
            sq += w * w
        norm = tl.sqrt_rn(tl.sum(tl.sum(sq, axis=1), axis=0))
        tl.store(norms_ptr + pid, norm)
        if MODE == 1:
            factor = tl.maximum(1.0 - tl.math.div_rn(thr, tl.maximum(norm, tiny)), 0.0)
            for r0 in range(0, R, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                ok = (rows[:, None] < R) & t_ok[None, :]
                ptr = base + rows[:, None] * D + cols[None, :]
                w = tl.load(ptr, mask=ok, other=0.0)
                tl.store(ptr, w * factor, mask=ok)


@triton.jit
def quantize_kernel(w_ptr, s_ptr, codes_ptr, vals_ptr, n, cols, levels, scale_row_stride,
                    BLOCK: tl.constexpr):
    """``codes = clamp(round(w/s·L), −L, L)`` (int8) and ``vals = codes·s/L`` for ``w``
    of shape ``(rows, cols)``, ``s`` one per row (stride 1) or one in all (stride 0)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    w = tl.load(w_ptr + offs, mask=ok, other=0.0)
    s = tl.load(s_ptr + (offs // cols) * scale_row_stride, mask=ok, other=1.0)
    q = grid_code(w, s, levels)
    tl.store(vals_ptr + offs, q * tl.math.div_rn(s, levels + tl.zeros_like(s)), mask=ok)
    tl.store(codes_ptr + offs, q.to(tl.int8), mask=ok)


@triton.jit
def soft_threshold_kernel(w_ptr, out_ptr, n, t, BLOCK: tl.constexpr):
    """``out = sign(w)·max(|w| − t, 0)``."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n
    tl.store(out_ptr + offs, soft_threshold(tl.load(w_ptr + offs, mask=ok, other=0.0), t), mask=ok)
