r"""Dual-path convolution with the loss, for the data form (SPEC §2.2).

A loss of the family has terms ``t = 1…T`` with weight ``w_t`` and student input
``Q_t = c_t·h^T + d_t·h^S`` (:class:`cdfast.layer.losses.LossSpec`). The student's paths of
all terms are stacked along the columns: ``X̃_g = [X_g(Q_1) … X_g(Q_T)]`` (``D × T·M``),
each tile mixed from ``h^T`` and ``h^S`` as it is gathered (implicit im2col, no copy).

**Forward + loss** (:func:`dual_conv_loss_kernel`), one implicit GEMM per group:

    Y_g = W_g · X̃_g (+ b)                                 (C_out/G × T·M)
    z = scale·Y + shift,  a = ReLU(z)           (activation objective; a = Y otherwise)
    r = a − Y^T_t                                (precomputed teacher outputs σ(A∗P_t + b))
    L = Σ_t w_t Σ r² / (N·C_out·H_out·W_out)
    dL/dY = 2·w_t·r·[z > 0]·scale / (N·C_out·H_out·W_out)

The epilogue writes ``dL/dY`` and one partial loss per program (the host sums them).
The same kernel computes the teacher outputs ``σ(A∗P_t + b)`` once per solve.

**Weight gradient** (:func:`conv_weight_grad_kernel`): ``dL/dW_g = dL/dY_g · X̃_gᵀ``,
re-gathering ``X̃`` (with the ones row when the bias is fitted, giving ``dL/db``).
"""
import triton
import triton.language as tl

from ._common import im2col_offsets

FWD_CONFIGS = (
    dict(BLOCK_O=32, BLOCK_M=64, BLOCK_K=32, num_warps=4, num_stages=2),
    dict(BLOCK_O=64, BLOCK_M=64, BLOCK_K=32, num_warps=4, num_stages=2),
)
WGRAD_CONFIGS = (
    dict(BLOCK_O=32, BLOCK_D=32, BLOCK_M=32, num_warps=4, num_stages=2),
    dict(BLOCK_O=64, BLOCK_D=64, BLOCK_M=32, num_warps=8, num_stages=2),
)


@triton.jit
def _mixed_tile(ht_ptr, hs_ptr, rows, cols_local, col_ok, cc, dd, g, C_in, H, W, Wo, L, group_in,
                D_cols, KW, TAPS, SH, SW, PH, PW, DH, DW,
                HAS_ONES: tl.constexpr, NEED_T: tl.constexpr, NEED_S: tl.constexpr):
    """The tile ``X_g(c·h^T + d·h^S)[rows, cols]`` with per-column ``c``, ``d``."""
    off, ok = im2col_offsets(rows, cols_local, col_ok, g, C_in, H, W, Wo, L, group_in, D_cols,
                             KW, TAPS, SH, SW, PH, PW, DH, DW)
    if NEED_T:
        q = cc[None, :] * tl.load(ht_ptr + off, mask=ok, other=0.0).to(tl.float32)
        if NEED_S:
            q += dd[None, :] * tl.load(hs_ptr + off, mask=ok, other=0.0).to(tl.float32)
    else:
        q = dd[None, :] * tl.load(hs_ptr + off, mask=ok, other=0.0).to(tl.float32)
    if HAS_ONES:  # c + d = 1 for every term
        q = tl.where((rows[:, None] == D_cols) & col_ok[None, :], 1.0, q)
    return q


@triton.jit
def dual_conv_loss_kernel(w_ptr, ht_ptr, hs_ptr, tgt_ptr, bias_ptr, scale_ptr, shift_ptr, coef_ptr,
                          dy_ptr, part_ptr,
                          R, Dw, M, TM, N, C_out, C_in, H, W, Wo, L, group_in, D_cols,
                          KW, TAPS, SH, SW, PH, PW, DH, DW, inv_numel,
                          HAS_ONES: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                          HAS_AFFINE: tl.constexpr, NEED_T: tl.constexpr, NEED_S: tl.constexpr,
                          WRITE_DY: tl.constexpr, WRITE_Y: tl.constexpr, BLOCK_O: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Tile ``(rows, cols)`` of ``Y_g``, its loss partial and ``dL/dY`` (see the module doc).

    ``coef`` holds ``(w_t, c_t, d_t)`` per term; ``tgt`` is ``(T, N, C_out, L)``;
    ``dy`` is ``(G, C_out/G, T·M)``. With ``WRITE_Y`` the kernel only writes ``σ(Y)``
    into ``tgt`` (the teacher outputs, computed with the same arithmetic as the
    student's so that their difference vanishes exactly where the weights agree).
    """
    pm = tl.program_id(0)  # the long axis (T·M can exceed a grid's y/z limit)
    po = tl.program_id(1)
    g = tl.program_id(2)
    rows = po * BLOCK_O + tl.arange(0, BLOCK_O)
    cols = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    col_ok = cols < TM
    t = cols // M
    ml = cols - t * M
    wt = tl.load(coef_ptr + 3 * t, mask=col_ok, other=0.0)
    cc = tl.load(coef_ptr + 3 * t + 1, mask=col_ok, other=0.0)
    dd = tl.load(coef_ptr + 3 * t + 2, mask=col_ok, other=0.0)

    acc = tl.zeros((BLOCK_O, BLOCK_M), dtype=tl.float32)
    w_rows = w_ptr + (g * R + rows)[:, None].to(tl.int64) * Dw
    for k0 in range(0, Dw, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        wt_tile = tl.load(w_rows + ks[None, :], mask=row_ok[:, None] & (ks[None, :] < Dw),
                          other=0.0).to(tl.float32)
        q = _mixed_tile(ht_ptr, hs_ptr, ks, ml, col_ok, cc, dd, g, C_in, H, W, Wo, L, group_in,
                        D_cols, KW, TAPS, SH, SW, PH, PW, DH, DW, HAS_ONES, NEED_T, NEED_S)
        acc += tl.dot(wt_tile, q, input_precision=PRECISION)

    ch = g * R + rows
    y = acc
    if HAS_BIAS:
        y += tl.load(bias_ptr + ch, mask=row_ok, other=0.0)[:, None]
    n = ml // L
    p = ml - n * L
    ok = row_ok[:, None] & col_ok[None, :]
    tgt_off = ((t[None, :].to(tl.int64) * N + n[None, :]) * C_out + ch[:, None]) * L + p[None, :]
    if WRITE_Y:
        if ACT:
            if HAS_AFFINE:
                y = y * tl.load(scale_ptr + ch, mask=row_ok, other=0.0)[:, None] + \
                    tl.load(shift_ptr + ch, mask=row_ok, other=0.0)[:, None]
            y = tl.maximum(y, 0.0)
        tl.store(tgt_ptr + tgt_off, y, mask=ok)
    else:
        _loss_epilogue(y, tgt_ptr, tgt_off, scale_ptr, shift_ptr, ch, row_ok, ok, wt, cols, TM,
                       part_ptr, dy_ptr, inv_numel, ACT, HAS_AFFINE, WRITE_DY)


@triton.jit
def _loss_epilogue(y, tgt_ptr, tgt_off, scale_ptr, shift_ptr, ch, row_ok, ok, wt, cols, TM,
                   part_ptr, dy_ptr, inv_numel,
                   ACT: tl.constexpr, HAS_AFFINE: tl.constexpr, WRITE_DY: tl.constexpr):
    """``r = σ(y) − target``; partial ``Σ w_t r²``; ``dL/dY = 2 w_t r σ'(y) / numel``."""
    target = tl.load(tgt_ptr + tgt_off, mask=ok, other=0.0)
    if ACT:
        if HAS_AFFINE:
            sc = tl.load(scale_ptr + ch, mask=row_ok, other=0.0)[:, None]
            z = y * sc + tl.load(shift_ptr + ch, mask=row_ok, other=0.0)[:, None]
            slope = tl.where(z > 0, sc, 0.0)
        else:
            z = y
            slope = tl.where(z > 0, 1.0, 0.0)
        r = tl.maximum(z, 0.0) - target
    else:
        r = y - target
        slope = 1.0
    r = tl.where(ok, r, 0.0)
    part = tl.sum(tl.sum(wt[None, :] * r * r, axis=1), axis=0)
    pid = (tl.program_id(2) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(0) + tl.program_id(0)
    tl.store(part_ptr + pid, part)
    if WRITE_DY:
        dy = (2.0 * inv_numel) * wt[None, :] * r * slope
        tl.store(dy_ptr + ch[:, None].to(tl.int64) * TM + cols[None, :], dy, mask=ok)


@triton.jit
def conv_weight_grad_kernel(dy_ptr, ht_ptr, hs_ptr, coef_ptr, out_ptr,
                            R, Dw, M, TM, C_in, H, W, Wo, L, group_in, D_cols,
                            KW, TAPS, SH, SW, PH, PW, DH, DW, chunks_per_split, n_split,
                            HAS_ONES: tl.constexpr, NEED_T: tl.constexpr, NEED_S: tl.constexpr,
                            BLOCK_O: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                            PRECISION: tl.constexpr):
    """``out[split, g, rows, ks] = Σ_m dY_g[rows, m] · X̃_g[ks, m]`` over the split's columns."""
    po = tl.program_id(0)
    pd = tl.program_id(1)
    gs = tl.program_id(2)
    g = gs // n_split
    sp = gs - g * n_split
    rows = po * BLOCK_O + tl.arange(0, BLOCK_O)
    ks = pd * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < R
    acc = tl.zeros((BLOCK_O, BLOCK_D), dtype=tl.float32)
    dy_rows = dy_ptr + (g * R + rows)[:, None].to(tl.int64) * TM
    m0 = sp * chunks_per_split * BLOCK_M
    for it in range(0, chunks_per_split):
        cols = m0 + it * BLOCK_M + tl.arange(0, BLOCK_M)
        col_ok = cols < TM
        t = cols // M
        ml = cols - t * M
        cc = tl.load(coef_ptr + 3 * t + 1, mask=col_ok, other=0.0)
        dd = tl.load(coef_ptr + 3 * t + 2, mask=col_ok, other=0.0)
        dy = tl.load(dy_rows + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        q = _mixed_tile(ht_ptr, hs_ptr, ks, ml, col_ok, cc, dd, g, C_in, H, W, Wo, L, group_in,
                        D_cols, KW, TAPS, SH, SW, PH, PW, DH, DW, HAS_ONES, NEED_T, NEED_S)
        acc += tl.dot(dy, tl.trans(q), input_precision=PRECISION)
    G = tl.num_programs(2) // n_split
    base = out_ptr + (sp * G + g).to(tl.int64) * R * Dw
    tl.store(base + rows[:, None] * Dw + ks[None, :], acc, mask=row_ok[:, None] & (ks[None, :] < Dw))
