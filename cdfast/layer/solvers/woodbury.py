r"""The exact solver on the low-rank form: ``H = Z·Zᵀ`` never formed (Woodbury identity).

With fewer sampled rows than columns (``M < D``) the quadratic keeps ``H`` as its factor
``Z`` (``D × K``, :attr:`~cdfast.layer.losses.Quadratic.factor`). For a support ``S`` of
columns that every row shares (a channel budget, a ``FixedSupport`` of channels, or no
budget at all) the damped solve of :func:`.exact.solve_on_support`,

    W_S = (R_S + λ·A_S)·(H_SS + λI)⁻¹,      R = A·H − F,

needs only ``(Z_S Z_Sᵀ + λI)⁻¹ = (I − Z_S·M⁻¹·Z_Sᵀ)/λ`` with ``M = λI + Z_SᵀZ_S`` (``K × K``).
Substituting ``R_S = A·Z·Z_Sᵀ − F_S`` and ``I − Z_SᵀZ_S·M⁻¹ = λ·M⁻¹``:

    W_S = A_S − F_S/λ + (A_O·Z_O + F_S·Z_S/λ)·M⁻¹·Z_Sᵀ,

``O`` the columns outside ``S``. Rows are independent, so they are solved a chunk at a time
in float64 (as the dense solver works): ``O(R·D·K + K³)`` work and, besides the result, the
memory of one chunk of rows, where the dense solver holds several ``D × D`` matrices.

The greedy channel selection (:func:`.exact._select_channels`) needs in each round the
optimum on the kept channels and the diagonal blocks ``[(H_SS + λI)⁻¹]_JJ = (I − Z_J·M⁻¹·Z_Jᵀ)/λ``
of every kept channel ``J``; both come from the formulas above, recomputed each round, so
the rounds remove the channels that the dense elimination (which reaches the same two
quantities by OBS updates) removes.
"""
from __future__ import annotations

import torch

from ..constraints import FixedSupport, GroupLasso, L1, NMSparsity, Quantize, WeightPrune, expand_channels
from ..losses import Quadratic, robust_cholesky

__all__ = ["takes", "lowrank_solve"]

#: float64 elements per chunk of rows (8 MB): the working memory of a solve.
CHUNK_ELEMENTS = 1 << 20


def takes(items) -> bool:
    """Whether the low-rank exact solver handles these (normalized) constraints: supports of
    whole columns only (a channel budget, a ``FixedSupport`` of channels, or none)."""
    return not any(isinstance(c, (WeightPrune, NMSparsity, Quantize, GroupLasso, L1)) or
                   (isinstance(c, FixedSupport) and c.channels is None) for c in items)


class _Group:
    """One group's factor ``Z`` and damping ``λ``, with the optimum on a column support."""

    def __init__(self, quad: Quadratic, g: int, with_F: bool):
        self.quad, self.g, self.with_F = quad, g, with_F
        self.Z = quad.factor[g].to(torch.float64)
        self.lam = float(quad.damping_lambda()[g])

    def inverse(self, keep: torch.Tensor) -> torch.Tensor:
        """The Cholesky factor of ``M = λI + Z_SᵀZ_S`` for the columns ``keep`` (bool, ``D``)."""
        Zs = self.Z[keep]
        M = Zs.t() @ Zs
        M.diagonal().add_(self.lam)
        return robust_cholesky(M)

    def optimum(self, keep: torch.Tensor, L: torch.Tensor):
        """Yield ``(rows, W_S)``: the optimum on the columns ``keep`` (float64), a chunk of rows at a time."""
        quad, g, lam = self.quad, self.g, self.lam
        Zs, Zo = self.Z[keep], self.Z[~keep]
        R, D = quad.anchor.shape[1:]
        step = max(1, CHUNK_ELEMENTS // D)
        for r0 in range(0, R, step):
            rows = slice(r0, min(R, r0 + step))
            a = quad.anchor[g, rows].to(torch.float64)
            u = a[:, ~keep] @ Zo
            w = a[:, keep]
            if self.with_F:
                f = quad.F[g, rows][:, keep].to(torch.float64)
                u.addmm_(f, Zs, alpha=1.0 / lam)
                w.sub_(f, alpha=1.0 / lam)
            w.addmm_(torch.cholesky_solve(u.t(), L).t(), Zs.t())  # + u·M⁻¹·Z_Sᵀ
            yield rows, w


def _select(group: _Group, keep_cols: torch.Tensor, C: int, taps: int, target: int, rounds) -> torch.Tensor:
    """Greedy backward elimination of input channels by the OBS cost ``tr(W_J [H_λ⁻¹]_JJ⁻¹ W_Jᵀ)``,
    in the rounds of :func:`.exact.channel_rounds`. Returns the kept channels (bool, ``C``)."""
    alive = keep_cols[:C * taps].reshape(C, taps).any(-1)
    extra = keep_cols[C * taps:]  # a fitted bias column: always kept
    eye = torch.eye(taps, dtype=torch.float64, device=alive.device)
    for r in rounds(int(alive.sum()) - target):
        idx = torch.nonzero(alive).flatten()
        keep = torch.cat([alive.repeat_interleave(taps), extra])
        L = group.inverse(keep)
        Zj = group.Z[:C * taps].reshape(C, taps, -1)[idx]  # (n, t, K)
        MiZj = torch.cholesky_solve(Zj.reshape(-1, Zj.shape[-1]).t(), L).t().reshape(Zj.shape)
        blocks = (eye - torch.bmm(Zj, MiZj.transpose(1, 2))) / group.lam  # [H_λ,SS⁻¹]_JJ
        moments = torch.zeros(len(idx), taps, taps, dtype=torch.float64, device=alive.device)
        for _, w in group.optimum(keep, L):
            wj = w[:, :len(idx) * taps].reshape(w.shape[0], len(idx), taps)
            moments += torch.einsum("rnt,rnu->ntu", wj, wj)  # Σ_rows W_Jᵀ W_J
        cost = (torch.linalg.inv(blocks) * moments).sum(dim=(1, 2))
        alive[idx[torch.topk(cost, r, largest=False).indices]] = False
    return alive


def lowrank_solve(quad: Quadratic, plan, rounds) -> torch.Tensor:
    """The exact solve of :mod:`.exact` for column supports, on the factor. Sets ``plan.mask``
    (an expanded view, the kept columns of every row) and returns ``W`` in the quadratic's dtype.

    ``rounds(n)`` gives the channels removed per round when ``n`` go (:func:`.exact.channel_rounds`).
    """
    geo = plan.geometry
    G, R, D = quad.anchor.shape
    with_F = bool(quad.F.any())
    cols = plan.mask[:, 0, :].clone()  # (G, D): every row shares its support here
    out = torch.zeros_like(quad.anchor)
    for g in range(G):
        group = _Group(quad, g, with_F)
        if plan.channel is not None:
            kept = _select(group, cols[g], geo.group_in, geo.taps, plan.target_channels, rounds)
            cols[g] &= expand_channels(kept[None], geo, D)[0, 0]
        if not bool(cols[g].any()):
            continue
        L = group.inverse(cols[g])
        for rows, w in group.optimum(cols[g], L):
            out[g, rows, cols[g]] = w.to(out.dtype)
    plan.mask = cols[:, None, :].expand(G, R, D)
    return out
