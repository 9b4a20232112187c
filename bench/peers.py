r"""The public post-training solvers cdfast's exact solver is measured against.

GPTQ (Frantar, Ashkboos, Hoefler, Alistarh, "GPTQ: Accurate Post-Training Quantization
for Generative Pre-trained Transformers", ICLR 2023, arXiv:2210.17323) and SparseGPT
(Frantar, Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
One-Shot", ICML 2023, arXiv:2301.00774), written for this benchmark from the papers'
algorithms (GPTQ's Algorithm 1, SparseGPT's Algorithm 1), not taken from their code.
They live in ``bench/`` only: the library never imports them.

Both minimise the layer reconstruction ``‖W·X − W₀·X‖²`` = ``tr((W − W₀)·H·(W − W₀)ᵀ)``
with ``H = X·Xᵀ`` (the paper's factor 2 cancels), one output row at a time but all rows
at once, by one **column sweep**:

* ``H`` is damped by 1 % of its mean diagonal (both papers' default); inputs that the
  samples never excite (``H_jj = 0``) get ``H_jj = 1`` and a zero weight.
* ``U`` is the upper Cholesky factor of ``H⁻¹`` (``H⁻¹ = Uᵀ·U``). Row ``j`` of ``U``
  divided by ``U_jj`` is the optimal-brain-surgeon update of the columns after ``j``
  when column ``j`` is fixed, with the columns before ``j`` already fixed.
* Columns are taken in order, in blocks of ``B = 128``: column ``j`` is rounded
  (GPTQ) or its pruned entries set to zero (SparseGPT); the error ``e = (w_j − q_j)/U_jj``
  updates the rest of the block at once (``W_{:,j:b} −= e·U_{j,j:b}``) and the columns
  after the block lazily, with one matrix product per block (``W_{:,b:} −= E·U_{block,b:}``).

GPTQ options: ``act_order`` (columns in order of decreasing ``H_jj``, the paper's
"act-order" heuristic) and ``clip_search``: the per-output-channel scale chosen by the
grid search of the GPTQ reference implementation (shrink factors ``1, 0.99, …, 0.21`` of
``max|w|``, the one with the least ``Σ|w − q|^2.4`` on the unchanged weights); without
it the scale is ``max|w|`` per channel. The grid is cdfast's symmetric one
(``s·{0, ±1/L, …, ±1}``, :func:`cdfast.layer.constraints.quantize`), so both solvers
round to the same set of values.

SparseGPT: unstructured, the mask chosen adaptively every ``Bs = 128`` columns as the
``(1 − p)`` fraction of the block's weights with the largest ``w²/U_jj²`` (on the
partly updated weights); ``n:m``, in each group of ``m`` consecutive columns the ``n``
weights with the smallest ``w²/U_jj²`` of each row are pruned when the sweep reaches
the group. cdfast's ``n:m`` groups run over input channels at a fixed kernel tap
(``NMSparsity``), so for a convolution the columns are first permuted to put each
group's columns next to each other (the sweep is the same algorithm in any column
order); :func:`nm_order` gives that order.
"""
from __future__ import annotations

import torch

from cdfast.layer.constraints import quantize

__all__ = ["prepare_hessian", "inverse_cholesky_upper", "gptq", "sparsegpt", "clip_search_scale", "nm_order"]

BLOCK = 128
DAMP = 0.01


def prepare_hessian(H: torch.Tensor, W: torch.Tensor, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H + λI, W)`` with dead inputs handled as the papers do (``H_jj = 1``, ``W_{:,j} = 0``)."""
    H = H.clone()
    W = W.clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    lam = damp * torch.diagonal(H).mean()
    H.diagonal().add_(lam)
    return H, W


def inverse_cholesky_upper(H: torch.Tensor) -> torch.Tensor:
    """``U`` upper triangular with ``H⁻¹ = Uᵀ·U``: Cholesky of ``H``, its inverse, Cholesky again."""
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    return torch.linalg.cholesky(Hinv, upper=True)


def clip_search_scale(W: torch.Tensor, bits: int, steps: int = 80, norm: float = 2.4) -> torch.Tensor:
    """Per output channel, the scale ``r·max|w|`` (``r = 1, 0.99, …``) with the least
    ``Σ|w − q(w)|^norm``: the clipping search of the GPTQ reference implementation."""
    amax = W.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    best = amax.clone()
    best_err = torch.full_like(amax, float("inf"))
    for k in range(steps):
        s = amax * (1 - k / 100)
        err = (W - quantize(W, s, bits)[1]).abs_().pow_(norm).sum(dim=1, keepdim=True)
        better = err < best_err
        best = torch.where(better, s, best)
        best_err = torch.where(better, err, best_err)
    return best


def _sweep(W: torch.Tensor, U: torch.Tensor, column_fn, block: int = BLOCK) -> torch.Tensor:
    """The blocked column sweep: ``column_fn(j, w_j, W_block, j_in_block, U)`` returns the
    fixed value of column ``j`` (it may read the block's current weights)."""
    W = W.clone()
    R, D = W.shape
    for b0 in range(0, D, block):
        b1 = min(D, b0 + block)
        Wb = W[:, b0:b1].clone()  # the block, contiguous; written back after
        E = torch.empty(R, b1 - b0, dtype=W.dtype, device=W.device)
        for i in range(b1 - b0):
            j = b0 + i
            w = Wb[:, i].clone()
            q = column_fn(j, w, Wb, i)
            e = (w - q) / U[j, j]
            Wb[:, i] = q
            Wb[:, i + 1:] -= e[:, None] * U[j, j + 1:b1][None, :]
            E[:, i] = e
        W[:, b0:b1] = Wb
        if b1 < D:
            W[:, b1:] -= E @ U[b0:b1, b1:]
    return W


def gptq(W0: torch.Tensor, H: torch.Tensor, bits: int, act_order: bool = False, clip_search: bool = False,
         block: int = BLOCK, damp: float = DAMP) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ on ``W0`` ``(R, D)`` with ``H`` ``(D, D)``. Returns ``(W, scale)``: the quantized
    weight (grid values) and its per-channel scale ``(R, 1)``."""
    H, W = prepare_hessian(H, W0, damp)
    scale = clip_search_scale(W, bits) if clip_search else W.abs().amax(dim=1, keepdim=True).clamp_min(1e-12)
    perm = None
    if act_order:
        perm = torch.argsort(torch.diagonal(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    U = inverse_cholesky_upper(H)
    Q = _sweep(W, U, lambda j, w, Wb, i: quantize(w[:, None], scale, bits)[1][:, 0], block)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q, scale


def nm_order(cols: int, taps: int, m: int) -> torch.Tensor:
    """Column order that puts each ``m``-group of cdfast's ``NMSparsity`` (``m`` consecutive
    input channels at one kernel tap; column = channel·taps + tap) next to each other."""
    c = torch.arange(cols // taps)
    t = torch.arange(taps)
    groups = c.reshape(-1, m)  # (channel blocks, m)
    return (groups[:, None, :] * taps + t[None, :, None]).reshape(-1)


def sparsegpt(W0: torch.Tensor, H: torch.Tensor, density: float | None = None, nm: tuple[int, int] | None = None,
              taps: int = 1, block: int = BLOCK, damp: float = DAMP) -> torch.Tensor:
    """SparseGPT on ``W0`` ``(R, D)``: keep ``density`` of the weights (unstructured, the
    mask chosen per block of ``block`` columns) or ``n`` of every ``m`` (``nm = (n, m)``)."""
    H, W = prepare_hessian(H, W0, damp)
    perm = None
    if nm is not None and taps > 1:
        perm = nm_order(W.shape[1], taps, nm[1])
        W, H = W[:, perm], H[perm][:, perm]
    U = inverse_cholesky_upper(H)
    R, D = W.shape
    d2 = torch.diagonal(U).pow(2)
    mask = torch.ones_like(W, dtype=torch.bool)

    def column(j, w, Wb, i):
        if nm is not None:
            n, m = nm
            if j % m == 0:  # choose the group's pruned weights now, on the updated weights
                score = Wb[:, i:i + m].pow(2) / d2[j:j + m]
                drop = torch.topk(score, m - n, dim=1, largest=False).indices
                mask[:, j:j + m].scatter_(1, drop, False)
        elif j % block == 0:  # the block's mask, on the weights as updated so far
            cols = min(block, D - j)
            score = Wb[:, i:i + cols].pow(2) / d2[j:j + cols]
            prune = int(score.numel() * (1 - density))
            if prune:
                idx = torch.topk(score.flatten(), prune, largest=False).indices
                blk = torch.ones(score.numel(), dtype=torch.bool, device=W.device)
                blk[idx] = False
                mask[:, j:j + cols] = blk.view_as(score)
        return w * mask[:, j]

    out = _sweep(W, U, column, block) * mask
    if perm is not None:
        out = out[:, torch.argsort(perm)]
    return out
