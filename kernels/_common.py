r"""Device helpers shared by the cdfast Triton kernels (all ``@triton.jit``, inlined).

**Implicit im2col.** A Conv2d with ``G`` groups, kernel ``k_h × k_w``, stride ``s``,
padding ``p`` and dilation ``δ`` sees its input ``h`` (``N × C_in × H × W``, contiguous)
through the matrix ``X_g`` (``D × M``, ``D = (C_in/G)·k_h·k_w``, ``M = N·H_out·W_out``) of
:mod:`cdfast.layer.geometry`:

    row  d = (c·k_h + i)·k_w + j            (input channel c of group g, kernel tap (i, j))
    col  m = (n·H_out + y)·W_out + x         (sample n, output pixel (y, x))
    X_g[d, m] = h[n, g·C_in/G + c, y·s_h − p_h + i·δ_h, x·s_w − p_w + j·δ_w]   (0 outside)

A Linear layer is the same map with ``H = W = H_out = W_out = k = 1`` (``h`` viewed as
``N × F × 1 × 1``). With ``HAS_ONES`` the row ``d = D_cols`` is the constant 1 that fits
a bias. No unfolded copy is ever written: the kernels gather their tiles of ``X``
straight from ``h``.
"""
import triton
import triton.language as tl


@triton.jit
def im2col_offsets(rows, cols, col_ok, g, C_in, H, W, Wo, L, group_in, D_cols,
                   KW, TAPS, SH, SW, PH, PW, DH, DW):
    """Offsets into ``h`` and the validity mask of the tile ``X_g[rows, cols]``.

    ``rows`` (BLOCK_R,) and ``cols`` (BLOCK_C,) index ``X_g``; ``col_ok`` marks the
    columns inside ``[0, M)``. Returns ``(offsets, mask)`` of shape (BLOCK_R, BLOCK_C).
    """
    c = rows // TAPS
    r = rows - c * TAPS
    ki = r // KW
    kj = r - ki * KW
    n = cols // L
    p = cols - n * L
    oy = p // Wo
    ox = p - oy * Wo
    iy = oy[None, :] * SH - PH + ki[:, None] * DH
    ix = ox[None, :] * SW - PW + kj[:, None] * DW
    ch = g * group_in + c
    ok = (rows[:, None] < D_cols) & col_ok[None, :] & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    off = ((n[None, :].to(tl.int64) * C_in + ch[:, None]) * H + iy) * W + ix
    return off, ok


@triton.jit
def round_half_even(x):
    """``torch.round``: nearest integer, ties to even (exact for every float32)."""
    f = tl.floor(x)
    d = x - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def grid_code(w, s, levels):
    """``clamp(round(w / s · L), −L, L)`` as a float (the integer code of ``w``)."""
    q = round_half_even(tl.math.div_rn(w, s) * levels)
    return tl.minimum(tl.maximum(q, -levels), levels)


@triton.jit
def grid_project(w, s, levels):
    """``code(w) · (s / L)``: the value of ``w`` on the grid ``s·{0, ±1/L, …, ±1}``, bit
    for bit as :func:`cdfast.layer.constraints.quantize` on the CPU (on CUDA, torch forms
    ``s / L`` as ``s · (1/L)``: the values may differ there by one ulp, the codes never)."""
    return grid_code(w, s, levels) * tl.math.div_rn(s, levels + tl.zeros_like(s))


@triton.jit
def soft_threshold(w, t):
    """Prox of ``t·|w|``: ``sign(w)·max(|w| − t, 0)``."""
    mag = tl.maximum(tl.abs(w) - t, 0.0)
    sgn = tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))
    return sgn * mag
