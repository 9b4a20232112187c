r"""Column sweeps and coordinate passes on the layer quadratic: the exact solver's engine.

Every loss of the family is ``s·[tr((W − T)·H·(W − T)ᵀ) + c]`` (SPEC §2.1, the
canonical form of :class:`~cdfast.layer.losses.Quadratic`), so rounding a layer to a
grid or pruning it to a mask is the same problem for every loss: bring each output row
``w`` onto the constraint set at the least ``(w − t)·H·(w − t)ᵀ``. The functions here
work on ``(T, H)`` with ``H`` already damped (positive definite), all rows and all
groups at once, in a transposed layout ``(G, D, R)`` whose column ``j`` is contiguous.

**The factor.** ``H = Ũ·Ũᵀ`` with ``Ũ`` upper triangular: the Cholesky factor of ``H``
with its columns taken from the last backwards (:func:`reverse_cholesky`, one
factorisation; ``Ũ⁻¹`` is the factor of ``H⁻¹`` that GPTQ and SparseGPT form with three).
The loss is ``‖Y‖²`` with the *whitened residual* ``Y = (W − T)·Ũ``.

**The sweep** (GPTQ, Frantar et al. 2022; SparseGPT, Frantar & Alistarh 2023) fixes the
columns one after the other, each time moving the columns not yet fixed to their
optimum given the fixed ones. The value column ``j`` takes once the columns before it
are fixed at ``q_i`` is

    w_j = t_j + Σ_{i<j} (t_i − q_i)·Ũ_ij / Ũ_jj,

the papers' update written with ``Ũ`` instead of the factor of ``H⁻¹``, and fixing it adds
``Ũ_jj²·(w_j − q_j)²`` to the loss: column ``j`` of ``Y`` is ``Ũ_jj·(q_j − w_j)``. The sums are
accumulated lazily, one matrix product per block of columns (:func:`block_size`). A :class:`ColumnRule`
decides ``q_j`` from ``w_j`` (rounding, a mask, or both), and a :class:`WindowBudget` may
choose the mask on the way from the values a window of columns would take given the
fixed ones (:func:`obs_values`), as SparseGPT does.

**A coordinate pass** then minimises the loss exactly over one column at a time, all rows
at once: ``w_j ← fix(w_j − g_j/H_jj)``, ``g = (W − T)·H = Y·Ũᵀ``. The sweep never revisits a
column, so the kept weights of early columns never answer what later columns lose; the
passes do. They keep ``Y`` rather than the gradient (the gradient of a block is one product
with ``Ũ``'s rows, and ``Y`` comes free out of the sweep).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..losses import robust_cholesky

__all__ = ["BLOCK", "block_size", "transposed", "reverse_cholesky", "ColumnRule", "WindowBudget", "sweep",
           "coordinate_pass", "obs_values", "grid_search_scale", "refit_scale", "upper_t_mul", "nm_order", "act_order",
           "exchange_rounds", "sweep_block", "coordinate_block"]

#: Columns per block of the lazy updates (the in-block work is elementwise, the rest one
#: matrix product per block).
BLOCK = 32
#: Most columns per block (:func:`block_size`).
MAX_BLOCK = 128
#: Rows per block of the triangular products (:func:`upper_t_mul`).
TRI_BLOCK = 256


def block_size(columns: int) -> int:
    """Columns per block of the sweeps and passes over ``columns`` columns: ``BLOCK``, doubled
    while it stays within ``2·√columns`` (at most ``MAX_BLOCK``). Each block streams the
    columns after it once (∝ columns²/block) and works inside itself column by column
    (∝ columns·block): one thread, a 4096-column layer's pass takes 2.9-3.6 s at 128 against
    4.1 s at 32, a 768-column one 0.07-0.10 s at 32 against 0.13-0.18 s at 128 (loaded machine)."""
    n = BLOCK
    while 2 * n <= min(MAX_BLOCK, 2 * math.sqrt(columns)):
        n *= 2
    return n


def transposed(X: torch.Tensor) -> torch.Tensor:
    """``X.transpose(1, 2)`` as a new contiguous tensor. On the CPU it is copied in square
    tiles of ``TRI_BLOCK``: a plain strided copy of a large matrix misses the cache on every
    element (a 4096 × 4096 float32 matrix: 0.27 s plain, 0.10 s in tiles, one thread)."""
    G, n, m = X.shape
    if X.device.type != "cpu" or n * m <= TRI_BLOCK * TRI_BLOCK:
        return X.transpose(1, 2).contiguous()
    out = torch.empty(G, m, n, dtype=X.dtype, device=X.device)
    for i in range(0, n, TRI_BLOCK):
        for j in range(0, m, TRI_BLOCK):
            out[:, j:j + TRI_BLOCK, i:i + TRI_BLOCK] = X[:, i:i + TRI_BLOCK, j:j + TRI_BLOCK].transpose(1, 2)
    return out


def reverse_cholesky(H: torch.Tensor) -> torch.Tensor:
    """``Ũ`` upper triangular with ``H = Ũ·Ũᵀ`` (batched): the Cholesky factor of ``H`` with
    its columns taken in reverse order."""
    # LAPACK returns its factor column-major: the upper factor of flip(H) is, read row by row,
    # the lower one, so flipping that view gives Ũ row-major without a transposing copy
    U = robust_cholesky(torch.flip(H, (-2, -1)), upper=True)
    return torch.flip(U.transpose(-2, -1), (-2, -1)).contiguous()


def upper_t_mul(U: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """``Uᵀ·X`` for ``U`` ``(G, D, D)`` upper triangular and ``X`` ``(G, D, R)``, in blocks that
    skip ``U``'s zeros (half the products of a dense multiplication)."""
    D = U.shape[-1]
    out = torch.empty_like(X)
    for b0 in range(0, D, TRI_BLOCK):
        b1 = min(D, b0 + TRI_BLOCK)
        torch.bmm(U[:, :b1, b0:b1].transpose(1, 2), X[:, :b1], out=out[:, b0:b1])
    return out


def obs_values(W: torch.Tensor, T: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """The values columns ``j0 … j1`` take when every column before ``j0`` is fixed.

    ``W``, ``T`` are the columns' lazily accumulated values and targets, ``(G, n, R)``;
    ``U`` is ``Ũ[j0:j1, j0:j1]``. The sweep's running values hold
    ``t_j + (Σ_{i<j0} Δ_i Ũ_ij)/Ũ_jj``, exact for the first column only; the optimum of all
    ``n`` given the fixed ones is ``t + (Σ_i Δ_i Ũ_i,·)·Ũ_ww⁻¹`` (the top-left block of
    ``Ũ⁻¹`` is the inverse of ``Ũ``'s).
    """
    d = torch.diagonal(U, dim1=-2, dim2=-1)
    y = (W - T) * d[..., None]
    return T + torch.linalg.solve_triangular(U.transpose(-2, -1), y, upper=False)


class ColumnRule:
    """How a sweep or a coordinate pass fixes a column from the value it would take.

    Args:
        mask: ``(G, D, R)`` boolean, True where a weight may be non-zero, or None.
        scale: ``(G, 1, R)`` grid scale per row (or the same value everywhere), or None.
        bits: grid bit width (with ``scale``).
        grid_cols: columns ``j < grid_cols`` are rounded; the later ones (a fitted bias) are free.
        budget: a :class:`WindowBudget` that chooses ``mask`` during a sweep, or None.

    Fixing column ``j`` of value ``w``: ``q = clamp(round(w/s·L), −L, L)·s/L`` on the grid
    columns, then ``q·m_j``.
    """

    def __init__(self, mask: torch.Tensor | None = None, scale: torch.Tensor | None = None, bits: int = 0,
                 grid_cols: int = 0, budget: "WindowBudget | None" = None):
        self.maskf = None if mask is None else mask.to(torch.get_default_dtype())
        self.budget = budget
        self.grid_cols = grid_cols
        self.set_scale(scale, bits)

    @property
    def mask(self) -> torch.Tensor | None:
        return None if self.maskf is None else self.maskf > 0

    def set_scale(self, scale: torch.Tensor | None, bits: int = 0) -> None:
        self.scale = scale
        self.inv = self.step = None
        self.levels = 0.0
        if scale is not None:
            self.bits = bits
            self.levels = float(2 ** (bits - 1) - 1)
            self.step = (scale / self.levels)[:, 0].contiguous()  # (G, R)
            self.inv = (self.levels / scale)[:, 0].contiguous()

    def prepare(self, like: torch.Tensor) -> None:
        """The mask in ``like``'s dtype for the coming pass."""
        if self.maskf is not None and self.maskf.dtype != like.dtype:
            self.maskf = self.maskf.to(like.dtype).contiguous()

    def block(self, s0: int, s1: int) -> tuple:
        """The per-block arguments of the block operators: ``(mask, inv, step, levels, grid)``."""
        return (None if self.maskf is None else self.maskf[:, s0:s1], self.inv, self.step, self.levels,
                max(0, min(s1, self.grid_cols) - s0) if self.scale is not None else 0)


class WindowBudget:
    """Chooses the mask window by window during a sweep, from the values the window's
    columns would take given the fixed ones (SparseGPT's adaptive mask selection).

    ``keep`` is ``(G, windows)``: weights to keep per group and window (a layer budget
    shared out over the windows), or ``nm = (n, m)``: keep ``n`` of every ``m`` columns of
    each row (``window = m``; the block operator chooses, group by group). A weight's score
    is ``v²·Ũ_jj²``, the loss its removal adds (its optimal-brain-surgeon saliency). Columns
    from ``cols`` on (a fitted bias) are never pruned; weights where ``allowed`` ``(G, D, R)``
    is False (a fixed support) are never kept. ``topk(scores, k)`` is the top-k mask operator
    (the dispatcher's ``topk_mask``).
    """

    def __init__(self, U: torch.Tensor, window: int, topk: Callable, keep: torch.Tensor | None = None,
                 nm: tuple[int, int] | None = None, cols: int | None = None, allowed: torch.Tensor | None = None):
        self.window, self.topk, self.keep, self.nm, self.allowed = window, topk, keep, nm, allowed
        self.pivots = torch.diagonal(U, dim1=-2, dim2=-1).pow(2).contiguous()  # (G, D)
        self.cols = U.shape[-1] if cols is None else cols

    def choose(self, maskf: torch.Tensor, j0: int, W: torch.Tensor, T: torch.Tensor, U: torch.Tensor) -> None:
        n = min(W.shape[1], self.cols - j0)
        if n <= 0:
            return
        score = obs_values(W, T, U)[:, :n].pow_(2).mul_(self.pivots[:, j0:j0 + n, None])
        if self.allowed is not None:  # weights outside a fixed support are never chosen
            score = torch.where(self.allowed[:, j0:j0 + n], score, torch.full_like(score, -1.0))
        for g in range(score.shape[0]):
            maskf[g, j0:j0 + n] = self.topk(score[g], int(self.keep[g, j0 // self.window]))


# ------------------------------------------------------------- the block operators
def sweep_block(W: torch.Tensor, T: torch.Tensor, V: torch.Tensor, D: torch.Tensor, Y: torch.Tensor | None,
                mask: torch.Tensor | None, inv: torch.Tensor | None, step: torch.Tensor | None, levels: float,
                grid: int, nm: tuple | None = None) -> None:
    """Fix the ``n`` columns of one block of a sweep, in place (the ``sweep_block`` op).

    ``W``, ``T``, ``D``, ``Y``, ``mask`` are ``(G, n, R)`` rows of the transposed weight, its
    target, ``Δ = T − Q``, the residual before scaling (``w − q``, or None) and the mask;
    ``V`` ``(G, n, n)`` holds ``Ũ_ij/Ũ_jj``; ``inv``, ``step`` ``(G, R)`` are ``L/s`` and ``s/L``
    (None: no grid), applied to the first ``grid`` columns. ``nm = (m, n_keep, U, pivots,
    cols)``: at each ``m``-th column before ``cols`` the mask of the next ``m`` columns keeps
    the ``n_keep`` largest ``v²·pivot`` of each row, ``v`` from :func:`obs_values` with ``U``
    ``(G, n, n)``. Column ``i`` becomes ``q_i``, then the later columns of the block take
    ``Δ_i·V_i,·``.
    """
    n = W.shape[1]
    cols_W, cols_T, cols_D = W.unbind(1), T.unbind(1), D.unbind(1)
    cols_Y = Y.unbind(1) if Y is not None else None
    cols_m = mask.unbind(1) if mask is not None else None
    Dk = D.split(1, dim=1)
    for i in range(n):
        if nm is not None and i % nm[0] == 0 and i < nm[4]:
            m, keep, U, piv, _ = nm
            score = obs_values(W[:, i:i + m], T[:, i:i + m], U[:, i:i + m, i:i + m]).pow_(2)
            score.mul_(piv[:, i:i + m, None])
            idx = torch.topk(score, keep, dim=1).indices
            mask[:, i:i + m] = torch.zeros_like(score).scatter_(1, idx, 1.0)
        w = cols_W[i]
        if Y is not None:
            cols_Y[i].copy_(w)
        if inv is not None and i < grid:
            w.mul_(inv).round_().clamp_(-levels, levels).mul_(step)
        if mask is not None:
            w.mul_(cols_m[i])
        torch.sub(cols_T[i], w, out=cols_D[i])
        if Y is not None:
            cols_Y[i].sub_(w)
        if i + 1 < n:
            W[:, i + 1:].baddbmm_(V[:, i, i + 1:, None], Dk[i])


def coordinate_block(W: torch.Tensor, g: torch.Tensor, H: torch.Tensor, neg_inv: torch.Tensor, D: torch.Tensor,
                     mask: torch.Tensor | None, inv: torch.Tensor | None, step: torch.Tensor | None, levels: float,
                     grid: int) -> None:
    """One block of a coordinate pass, in place (the ``coordinate_block`` op).

    ``W``, ``g``, ``D``, ``mask`` are ``(G, n, R)``: the block's rows of the transposed
    weight, of the gradient ``H·(W − T)ᵀ``, of the change made, and of the mask; ``H`` the
    block's ``(G, n, n)`` diagonal block; ``neg_inv`` ``(G, n)`` is ``−1/H_jj``. Column ``i``
    moves to ``fix(w + g·neg_inv)`` (grid as in :func:`sweep_block`, then the mask) and the
    gradient of the block's later columns follows the change.
    """
    n = W.shape[1]
    cols_W, cols_g, cols_D = W.unbind(1), g.unbind(1), D.unbind(1)
    cols_m = mask.unbind(1) if mask is not None else None
    cols_n = neg_inv[..., None].unbind(1)
    Hk, Dk = H.split(1, dim=2), D.split(1, dim=1)
    for i in range(n):
        w, d = cols_W[i], cols_D[i]
        d.copy_(w)
        w.addcmul_(cols_g[i], cols_n[i])
        if inv is not None and i < grid:
            w.mul_(inv).round_().clamp_(-levels, levels).mul_(step)
        if mask is not None:
            w.mul_(cols_m[i])
        d.sub_(w).neg_()
        if i + 1 < n:
            g[:, i + 1:].baddbmm_(Hk[i][:, i + 1:], Dk[i])


def sweep(T: torch.Tensor, U: torch.Tensor, rule: ColumnRule, block: int = BLOCK, residual: bool = False,
          block_op: Callable = sweep_block) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fix every column of the target ``T`` ``(G, D, R)`` in order; ``U`` is ``Ũ`` ``(G, D, D)``.

    Returns the fixed weight ``(G, D, R)`` (and, with ``residual``, the whitened residual
    ``Y`` transposed, ``Ũᵀ·(Q − T)ᵀ``, for :func:`coordinate_pass`). A budget on ``rule``
    chooses the mask at the start of each of its windows: windows of ``block`` columns or
    more (a multiple of it) here, N:M groups (``block`` a multiple of ``m``) inside the block
    operator. ``block_op`` is the ``sweep_block`` operator (the dispatcher's, or this
    module's torch one).
    """
    G, D, R = T.shape
    d = torch.diagonal(U, dim1=-2, dim2=-1)
    V = (U / d[:, None, :]).contiguous()  # V_ij = Ũ_ij / Ũ_jj
    W = T.clone()
    Dl = torch.empty_like(T)  # Δ = T − Q, column by column
    Y = torch.empty_like(T) if residual else None
    rule.prepare(T)
    budget = rule.budget
    for s0 in range(0, D, block):
        s1 = min(D, s0 + block)
        nm = None
        if budget is not None and budget.nm is not None:
            nm = (budget.window, budget.nm[0], U[:, s0:s1, s0:s1], budget.pivots[:, s0:s1], budget.cols - s0)
        elif budget is not None and s0 % budget.window == 0:
            j1 = min(D, s0 + budget.window)
            budget.choose(rule.maskf, s0, W[:, s0:j1], T[:, s0:j1], U[:, s0:j1, s0:j1])
        block_op(W[:, s0:s1], T[:, s0:s1], V[:, s0:s1, s0:s1], Dl[:, s0:s1], None if Y is None else Y[:, s0:s1],
                 *rule.block(s0, s1), nm)
        if s1 < D:
            W[:, s1:].baddbmm_(V[:, s0:s1, s1:].transpose(1, 2), Dl[:, s0:s1])
    if not residual:
        return W
    return W, Y.mul_(-d[..., None])


def coordinate_pass(W: torch.Tensor, Y: torch.Tensor, U: torch.Tensor, H: torch.Tensor, rule: ColumnRule,
                    block: int = BLOCK, block_op: Callable = coordinate_block) -> tuple[torch.Tensor, torch.Tensor]:
    """One cyclic pass of exact minimisation over each column in turn, in place.

    ``W`` is the weight ``(G, D, R)``, ``Y`` the whitened residual ``Ũᵀ·(W − T)ᵀ`` ``(G, D, R)``,
    ``U`` the factor and ``H = U·Uᵀ`` (only its diagonal blocks are read). Each column moves
    to ``fix(w − g/H_jj)``, ``g = H·(W − T)ᵀ``: for a mask the exact optimum of the column,
    for a grid the grid point nearest to it (the best of a one-dimensional quadratic). The
    loss never rises. ``block_op`` is the ``coordinate_block`` operator. Returns ``(W, Y)``.
    """
    G, D, R = W.shape
    rule.prepare(W)
    neg_inv = (-1.0 / torch.diagonal(H, dim1=-2, dim2=-1)).contiguous()  # (G, D)
    Ds = torch.empty(G, block, R, dtype=W.dtype, device=W.device)
    for s0 in range(0, D, block):
        s1 = min(D, s0 + block)
        Dn = Ds[:, :s1 - s0]
        gs = torch.bmm(U[:, s0:s1, s0:], Y[:, s0:])  # the block's gradient: rows of Ũ times Y
        block_op(W[:, s0:s1], gs, H[:, s0:s1, s0:s1], neg_inv[:, s0:s1], Dn, *rule.block(s0, s1))
        Y[:, s0:].baddbmm_(U[:, s0:s1, s0:].transpose(1, 2), Dn)
    return W, Y


def exchange_rounds(W: torch.Tensor, Y: torch.Tensor, U: torch.Tensor, H: torch.Tensor, rule: ColumnRule,
                    cols: int, rounds: int, share: float = 0.1, block_op: Callable = coordinate_block,
                    allowed: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Improve a budget mask by exchanges that keep its size, each round kept only if it lowers the loss.

    At an optimum on the mask the kept weight ``w_j`` costs about ``w_j²·H_jj`` to remove and
    a pruned one gains ``g_j²/H_jj`` when freed (``g = (W − T)·H``). Each round swaps the
    pairs (cheapest kept, most promising pruned) whose gain exceeds the cost, at most
    ``share`` of the kept weights, among the first ``cols`` columns; the freed weights start
    at their one-coordinate optimum and a coordinate pass refits the new mask. The first
    round that does not lower ``‖Y‖²`` is undone and ends the search. ``W``, ``Y``, ``rule``
    as for :func:`coordinate_pass`; weights where ``allowed`` is False are never freed.
    Returns ``(W, Y)`` (``rule.maskf`` holds the mask).
    """
    dH = torch.diagonal(H, dim1=-2, dim2=-1)[..., None]
    best = float((Y * Y).sum())
    for _ in range(rounds):
        keep = rule.maskf[:, :cols] > 0
        count = max(1, int(share * int(keep.sum())))
        g = torch.bmm(U, Y)[:, :cols]
        w = W[:, :cols]
        cost = torch.where(keep, w * w * dH[:, :cols], torch.full_like(w, math.inf)).reshape(-1)
        closed = keep if allowed is None else keep | ~allowed[:, :cols]  # a fixed support's zeros stay
        gain = torch.where(closed, torch.full_like(w, -math.inf), g * g / dH[:, :cols]).reshape(-1)
        cost, out = torch.topk(cost, min(count, cost.numel()), largest=False)
        gain, into = torch.topk(gain, min(count, gain.numel()))
        n = int((gain > cost[:gain.numel()]).sum())
        if n == 0:
            break
        maskf, Wn = rule.maskf.clone(), W.clone()
        m, wv = maskf[:, :cols].reshape(-1).clone(), Wn[:, :cols].reshape(-1).clone()
        free = (-g / dH[:, :cols]).reshape(-1)
        m[out[:n]], m[into[:n]] = 0.0, 1.0
        wv[out[:n]], wv[into[:n]] = 0.0, free[into[:n]]
        maskf[:, :cols], Wn[:, :cols] = m.view_as(w), wv.view_as(w)
        trial = ColumnRule(maskf > 0)
        Yn = Y + upper_t_mul(U, Wn - W)
        Wn, Yn = coordinate_pass(Wn, Yn, U, H, trial, block_op=block_op)
        value = float((Yn * Yn).sum())
        if not value < best:
            break
        best, W, Y, rule.maskf = value, Wn, Yn, trial.maskf
    return W, Y


def grid_search_scale(T: torch.Tensor, weights: torch.Tensor, bits: int, per_channel: bool,
                      mask: torch.Tensor | None = None, ratios: int = 17) -> torch.Tensor:
    """The clipping search: per row (or per layer) the scale ``r·max|t|``, ``r ∈ [0.2, 1]``,
    with the least ``Σ_j weights_j·(t_j − q(t_j))²``.

    ``T`` is ``(G, D, R)`` (grid columns only), ``weights`` ``(G, D, 1)``: with the sweep's
    pivots ``Ũ_jj²`` the criterion is the loss the sweep would add if it rounded every column
    of ``T`` without feeding the errors forward. Returns ``(G, 1, R)``.
    """
    from ..constraints import quantize

    if mask is not None:
        T = T * mask
    amax = T.abs().amax(dim=1, keepdim=True)
    if not per_channel:
        amax = amax.amax(dim=(0, 2), keepdim=True).expand_as(amax)
    amax = amax.clamp_min(torch.finfo(T.dtype).tiny)
    best, best_err = amax, None
    for r in torch.linspace(0.2, 1.0, ratios).tolist():
        s = amax * r
        err = (T - quantize(T, s, bits)[1]).pow_(2).mul_(weights).sum(dim=1, keepdim=True)
        if not per_channel:
            err = err.sum().expand_as(err)
        if best_err is None:
            best, best_err = s, err
        else:
            better = err < best_err
            best, best_err = torch.where(better, s, best), torch.where(better, err, best_err)
    return best


def refit_scale(Q: torch.Tensor, rule: ColumnRule, U: torch.Tensor, UT: torch.Tensor,
                per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The closed-form scale for the codes of ``Q`` and the whitened residual at it.

    With ``w = [s·z, u]`` (``z`` the codes over ``L`` on the grid columns, ``u`` the free
    columns held), ``Y(s) = s·Ũᵀzᵀ + Ũᵀ[0, u]ᵀ − Ũᵀtᵀ`` and the loss ``‖Y‖²`` is least at
    ``s = −⟨a, b⟩/‖a‖²``, ``a = Ũᵀzᵀ``, ``b`` the rest, per row (sums over rows for a per-layer
    scale). ``UT = Ũᵀ·T``. Rows without a positive optimum keep their scale. Returns
    ``(scale, Y)``; ``Q`` is rescaled in place.
    """
    gc = rule.grid_cols
    old = rule.scale
    Z = torch.zeros_like(Q)
    Z[:, :gc] = Q[:, :gc] / old
    a = upper_t_mul(U, Z)
    b = -UT
    if gc < Q.shape[1]:
        b = b + torch.bmm(U[:, gc:].transpose(1, 2), Q[:, gc:])
    num, den = -(a * b).sum(1, keepdim=True), (a * a).sum(1, keepdim=True)
    if not per_channel:
        num, den = num.sum().expand_as(num), den.sum().expand_as(den)
    ok = (num > 0) & (den > 0)
    scale = torch.where(ok, num / den.clamp_min(torch.finfo(den.dtype).tiny), old)
    Q[:, :gc] *= scale / old
    rule.set_scale(scale, rule.bits)
    return scale, a.mul_(scale).add_(b)


def act_order(H: torch.Tensor, free: int = 0, first: torch.Tensor | None = None) -> torch.Tensor:
    """Per group, the columns by decreasing ``H_jj`` (GPTQ's act-order), ``(G, D)``; the columns
    where ``first`` ``(G, D − free)`` is True before all others, the last ``free`` columns last."""
    G, D = H.shape[0], H.shape[-1]
    key = -torch.diagonal(H, dim1=-2, dim2=-1)[:, :D - free]
    if first is not None:
        key = torch.where(first, torch.full_like(key, -math.inf), key)
    order = torch.argsort(key, dim=1, stable=True)
    return torch.cat([order, torch.arange(D - free, D, device=H.device).expand(G, free)], dim=1)


def nm_order(cols: int, taps: int, m: int, total: int, device=None) -> torch.Tensor:
    """The column order that makes every ``m``-group of ``NMSparsity`` (``m`` consecutive
    input channels at one kernel tap; column = channel·taps + tap) contiguous; columns past
    ``cols`` (a fitted bias) last."""
    c = torch.arange(cols // taps, device=device).reshape(-1, m)
    t = torch.arange(taps, device=device)
    order = (c[:, None, :] * taps + t[None, :, None]).reshape(-1)
    return torch.cat([order, torch.arange(cols, total, device=device)])
