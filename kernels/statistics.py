r"""Dual-path Gram statistics of a layer's two inputs in one pass (SPEC §2.1).

For the two inputs ``h^T``, ``h^S`` of a layer and mix coefficients ``(a, b, c, d)``

    x1 = a·X^T + b·X^S,     x2 = c·X^T + d·X^S           (X = implicit im2col of h)
    out[0] = x1 x1ᵀ,   out[1] = x2 x2ᵀ,   out[2] = x2 x1ᵀ        (each G × D × D)

(``cdfast.layer.statistics`` uses the error basis ``a, b, c, d = 1, 0, −1, 1``: ``x2 = E``).

One program owns a pair of row blocks ``(I, J)`` with ``I ≤ J`` of one group and a
range of columns ``m``. Per column tile it gathers the four input tiles
``h^T_I, h^S_I, h^T_J, h^S_J`` once, mixes them in registers, and feeds all
products from them:

    acc11 += x1_I x1_Jᵀ      acc22 += x2_I x2_Jᵀ      acc21 += x2_I x1_Jᵀ      acc12 += x1_I x2_Jᵀ

The two symmetric Grams are computed on upper-triangular block pairs only and
mirrored at the store (block ``(J, I)`` is the transpose of ``(I, J)``); the
cross Gram needs both ``(I, J)`` (``acc21``) and ``(J, I) = acc12ᵀ``. Accumulation
is float32 with IEEE products (no TF32). With ``SPLIT > 1`` programs own disjoint
column ranges and write partial Grams that the host sums.
"""
import triton
import triton.language as tl

from ._common import im2col_offsets

#: Tile configurations (launch picks one; tools/aot_compile.py compiles them all).
CONFIGS = (
    dict(BLOCK_D=32, BLOCK_M=32, num_warps=4, num_stages=2),
    dict(BLOCK_D=64, BLOCK_M=32, num_warps=8, num_stages=2),
)


@triton.jit
def dual_gram_kernel(ht_ptr, hs_ptr, out_ptr, pairs_ptr,
                     M, C_in, H, W, Wo, L, group_in, D_cols,
                     KW, TAPS, SH, SW, PH, PW, DH, DW, D,
                     a, b, c, d, chunks_per_split, split_stride,
                     HAS_ONES: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                     PRECISION: tl.constexpr):
    """``out[split, p, g]`` (``p`` = 0: x1x1ᵀ, 1: x2x2ᵀ, 2: x2x1ᵀ), tile pair ``pairs[pid]``."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    sp = tl.program_id(2)
    bi = tl.load(pairs_ptr + 2 * pid)
    bj = tl.load(pairs_ptr + 2 * pid + 1)
    ri = bi * BLOCK_D + tl.arange(0, BLOCK_D)
    rj = bj * BLOCK_D + tl.arange(0, BLOCK_D)

    acc11 = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    acc22 = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    acc21 = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    acc12 = tl.zeros((BLOCK_D, BLOCK_D), dtype=tl.float32)
    m0 = sp * chunks_per_split * BLOCK_M
    for it in range(0, chunks_per_split):
        cols = m0 + it * BLOCK_M + tl.arange(0, BLOCK_M)
        col_ok = cols < M
        off_i, ok_i = im2col_offsets(ri, cols, col_ok, g, C_in, H, W, Wo, L, group_in, D_cols,
                                     KW, TAPS, SH, SW, PH, PW, DH, DW)
        off_j, ok_j = im2col_offsets(rj, cols, col_ok, g, C_in, H, W, Wo, L, group_in, D_cols,
                                     KW, TAPS, SH, SW, PH, PW, DH, DW)
        ti = tl.load(ht_ptr + off_i, mask=ok_i, other=0.0).to(tl.float32)
        si = tl.load(hs_ptr + off_i, mask=ok_i, other=0.0).to(tl.float32)
        tj = tl.load(ht_ptr + off_j, mask=ok_j, other=0.0).to(tl.float32)
        sj = tl.load(hs_ptr + off_j, mask=ok_j, other=0.0).to(tl.float32)
        if HAS_ONES:  # the bias row: h^T = h^S = 1, so x1 = a + b and x2 = c + d
            one_i = (ri[:, None] == D_cols) & col_ok[None, :]
            one_j = (rj[:, None] == D_cols) & col_ok[None, :]
            ti = tl.where(one_i, 1.0, ti)
            si = tl.where(one_i, 1.0, si)
            tj = tl.where(one_j, 1.0, tj)
            sj = tl.where(one_j, 1.0, sj)
        x1i = a * ti + b * si
        x2i = c * ti + d * si
        x1j = a * tj + b * sj
        x2j = c * tj + d * sj
        acc11 += tl.dot(x1i, tl.trans(x1j), input_precision=PRECISION)
        acc22 += tl.dot(x2i, tl.trans(x2j), input_precision=PRECISION)
        acc21 += tl.dot(x2i, tl.trans(x1j), input_precision=PRECISION)
        acc12 += tl.dot(x1i, tl.trans(x2j), input_precision=PRECISION)

    ok = (ri[:, None] < D) & (rj[None, :] < D)
    base = out_ptr + sp.to(tl.int64) * split_stride + g.to(tl.int64) * D * D
    off_ij = ri[:, None] * D + rj[None, :]
    off_ji = ri[:, None] + rj[None, :] * D  # the mirrored block (J, I), element-wise transposed
    pstride = tl.num_programs(1).to(tl.int64) * D * D
    tl.store(base + off_ij, acc11, mask=ok)
    tl.store(base + pstride + off_ij, acc22, mask=ok)
    tl.store(base + 2 * pstride + off_ij, acc21, mask=ok)
    if bi != bj:
        tl.store(base + off_ji, acc11, mask=ok)
        tl.store(base + pstride + off_ji, acc22, mask=ok)
        tl.store(base + 2 * pstride + off_ji, acc12, mask=ok)
