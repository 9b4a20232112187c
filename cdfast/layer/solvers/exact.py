r"""The exact solver: the layer's quadratic solved directly, no step size, no schedule.

For a fixed support ``S`` the optimum is one linear solve per row,
``W_S = R_S H_SS⁻¹`` with ``R = A·H − F``; the support is chosen greedily by the
optimal-brain-surgeon cost of removing each input channel (channel budgets) or
each weight (weight budgets, N:M), and quantization is a GPTQ-style pass: columns
are rounded one at a time and each rounding error is fed forward into the columns
not yet rounded through the Cholesky factor of ``H⁻¹``, followed by closed-form
refits of the grid scale.
"""
from __future__ import annotations

import math

import torch

from ...dispatch import call
from ..constraints import expand_channels, nm_mask, quantize, topk_mask
from ..losses import Quadratic, robust_cholesky
from ..plan import ConstraintPlan

__all__ = ["exact_solve", "solve_on_support", "gptq_round"]


def solve_on_support(quad: Quadratic, support: torch.Tensor) -> torch.Tensor:
    """Minimise the quadratic with ``W[~support] = 0``: ``W_S = R_S H_SS⁻¹`` row by row.

    ``support`` is a boolean ``(G, C_out/G, D)`` tensor. Rows that share a support
    (channel pruning) are solved together with one factorisation.
    """
    H = quad.damped_H()
    R = torch.bmm(quad.anchor, quad.H) - quad.F
    out = torch.zeros_like(quad.anchor)
    for g in range(H.shape[0]):
        sup = support[g]
        if bool((sup == sup[:1]).all()):  # one support for every row
            idx = torch.nonzero(sup[0]).flatten()
            if idx.numel():
                L = robust_cholesky(H[g][idx][:, idx])
                out[g][:, idx] = torch.cholesky_solve(R[g][:, idx].t(), L).t()
            continue
        D = H.shape[-1]
        chunk = max(1, (1 << 27) // (D * D * H.element_size()))
        eye = torch.eye(D, dtype=H.dtype, device=H.device)
        for r0 in range(0, sup.shape[0], chunk):
            m = sup[r0:r0 + chunk].to(H.dtype)  # (r, D)
            Hr = m[:, :, None] * H[g][None] * m[:, None, :] + (1 - m)[:, :, None] * eye
            L = robust_cholesky(Hr)
            out[g][r0:r0 + chunk] = torch.cholesky_solve((R[g][r0:r0 + chunk] * m)[..., None], L)[..., 0]
    return out


def _select_channels(quad: Quadratic, plan: ConstraintPlan) -> torch.Tensor:
    """Greedy backward channel elimination by the group OBS cost ``tr(W_J [H⁻¹]_JJ⁻¹ W_Jᵀ)``."""
    geo = plan.geometry
    taps, k_target = geo.taps, plan.target_channels
    W = quad.minimizer()
    Hinv = torch.cholesky_inverse(robust_cholesky(quad.damped_H()))
    keep = torch.ones(geo.groups, geo.group_in, dtype=torch.bool, device=W.device)
    for g in range(geo.groups):
        w, hinv = W[g].clone(), Hinv[g].clone()
        alive = list(range(geo.group_in))
        while len(alive) > k_target:
            blocks = torch.stack([hinv[c * taps:(c + 1) * taps, c * taps:(c + 1) * taps] for c in alive])
            wj = torch.stack([w[:, c * taps:(c + 1) * taps] for c in alive])  # (n, rows, taps)
            inv = torch.linalg.inv(blocks)
            cost = (torch.bmm(wj, inv) * wj).sum(dim=(1, 2))
            j = int(torch.argmin(cost))
            c = alive.pop(j)
            J = slice(c * taps, (c + 1) * taps)
            # OBS update: remove channel c and compensate with the others.
            coef = inv[j]
            w -= (w[:, J] @ coef) @ hinv[J, :]
            hinv -= hinv[:, J] @ coef @ hinv[J, :]
            w[:, J] = 0
            keep[g, c] = False
    return keep


def _support(quad: Quadratic, plan: ConstraintPlan) -> torch.Tensor:
    geo = plan.geometry
    support = plan.mask.clone()  # all True but where a FixedSupport removed weights
    if plan.channel is not None:
        keep = _select_channels(quad, plan)
        support &= expand_channels(keep, geo, support.shape[-1]).expand_as(support)
    elif plan.weight is not None or plan.nm is not None:
        hinv_diag = torch.diagonal(torch.cholesky_inverse(robust_cholesky(quad.damped_H())),
                                   dim1=-2, dim2=-1)
        W = quad.minimizer()
        # Gradual: the density falls geometrically over the rounds, each re-solved exactly.
        # N:M drops one weight per group of m in each round.
        rounds = (16 if quad.H.shape[-1] <= 1200 else 4) if plan.weight is not None else plan.nm.m - plan.nm.n
        for r in range(1, rounds + 1):
            saliency = W.pow(2) / hinv_diag[:, None, :]
            saliency = torch.where(support, saliency, torch.full_like(saliency, -1.0))
            if plan.weight is not None:
                density = plan.weight.density ** (r / rounds)
                k = int(plan.numel * density + 1e-9)
                scores = saliency[..., :geo.cols]
                new = support.clone()
                new[..., :geo.cols] = topk_mask(scores, k)
            else:
                new = nm_mask(saliency, geo, plan.nm.m - r, plan.nm.m) & support
            support = new
            W = solve_on_support(quad, support)
    return support


def gptq_round(W: torch.Tensor, H: torch.Tensor, scale: torch.Tensor, bits: int, weight_cols: int,
               support: torch.Tensor, damping: float, block: int = 128) -> torch.Tensor:
    """GPTQ-style sequential rounding of one group's ``W`` (rows, D) with error feedback.

    Column ``j`` is rounded; its error divided by ``U_jj`` (``U`` the upper Cholesky
    factor of ``H⁻¹``) is subtracted from the later columns along ``U_j,:``. Pruned
    coordinates (``~support``) round to zero. Columns past ``weight_cols`` (a fitted
    bias) are not rounded but still absorb error.
    """
    W = W.clone()
    D = W.shape[-1]
    d = torch.diagonal(H).mean().clamp_min(torch.finfo(H.dtype).tiny)
    Hd = H + damping * d * torch.eye(D, dtype=H.dtype, device=H.device)
    U = robust_cholesky(torch.cholesky_inverse(robust_cholesky(Hd)), upper=True)
    sup = support.to(W.dtype)
    for b0 in range(0, D, block):
        b1 = min(D, b0 + block)
        Err = torch.zeros(W.shape[0], b1 - b0, dtype=W.dtype, device=W.device)
        for j in range(b0, b1):
            w = W[:, j]
            q = quantize(w, scale, bits)[1] * sup[:, j] if j < weight_cols else w
            e = (w - q) / U[j, j]
            W[:, j] = q
            W[:, j + 1:b1] -= e[:, None] * U[j, j + 1:b1][None, :]
            Err[:, j - b0] = e
        W[:, b1:] -= Err @ U[b0:b1, b1:]
    return W


def exact_solve(quad: Quadratic, plan: ConstraintPlan, backend: str | None = "auto", strict: bool | None = None):
    """The exact solver. Returns ``(W, history)`` with the loss after each phase.

    It works in float64 whatever the statistics' dtype: the linear solves on a
    nearly singular ``H`` need the digits, and they cost little next to the statistics.
    """
    out_dtype = quad.H.dtype
    quad = quad.to(torch.float64)
    if plan.scale is not None:
        plan.scale = plan.scale.to(torch.float64)

    support = _support(quad, plan)
    plan.mask = support
    W = solve_on_support(quad, support)
    history = [(0, float(quad.loss(W)))]
    if plan.quant is not None:
        geo = plan.geometry
        wc = geo.cols
        plan.init_scale(W, quad.row_values)
        best, best_loss = None, math.inf
        for _ in range(3):  # alternate rounding and closed-form scale refits
            Wq = torch.empty_like(W)
            for g in range(W.shape[0]):
                cols = torch.nonzero(support[g].any(0)).flatten()  # drop dead columns
                Hs = quad.H[g][cols][:, cols]
                sc = (plan.scale[g] if plan.scale.shape[0] > 1 else plan.scale[0]).reshape(-1)
                wcg = int((cols < wc).sum())
                _, sub = call("gptq_round", W.device, backend, strict, W[g][:, cols], Hs, sc, plan.quant.bits,
                              wcg, support[g][:, cols], quad.damping)
                Wq[g].zero_()
                Wq[g][:, cols] = sub
            codes = quantize(Wq[..., :wc], plan.scale, plan.quant.bits)[0]
            plan.scale = quad.best_scale(codes, plan.quant.levels, plan.quant.per_channel, plan.scale, Wq)
            Wq = plan.effective(torch.cat([codes.to(W.dtype) * plan.scale / plan.quant.levels, Wq[..., wc:]], -1))
            loss = float(quad.loss(Wq))
            history.append((len(history), loss))
            if loss < best_loss:
                best, best_loss, best_scale = Wq, loss, plan.scale.clone()
        W = best
        plan.scale = best_scale
    if plan.scale is not None:
        plan.scale = plan.scale.to(out_dtype)
    return W.to(out_dtype), history
