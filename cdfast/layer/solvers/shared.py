r"""Channel selection for a set of channels that several layers consume (a channel group).

When a producer's output channel is removed, every layer that reads it (a
*consumer*: the next conv, the convs after a concatenation, a Linear after a
flatten, the groups of a grouped conv) loses the matching input columns. The
choice must therefore weigh all consumers at once. For consumer piece ``p`` with
quadratic ``L_p(W) = s_p·[tr((W − W*_p) H_p (W − W*_p)ᵀ) + c_p]`` (see
:mod:`cdfast.layer.losses`), removing the columns ``J`` of one unit from the current
weight ``W`` and re-solving the others raises the loss by the optimal-brain-surgeon
cost

    ΔL_p = s_p · tr(W_J [H_p⁻¹]_JJ⁻¹ W_Jᵀ),

and the units are removed one at a time, each time the one whose summed cost
``Σ_p ω_p ΔL_p`` is smallest, every piece then updated as after an OBS step
(``W ← W − W_J [H⁻¹]_JJ⁻¹ [H⁻¹]_J,:``, ``H⁻¹ ← H⁻¹ − [H⁻¹]_:,J [H⁻¹]_JJ⁻¹ [H⁻¹]_J,:``).
With one piece this is the exact solver's own channel selection.

A *unit* is what must go together: one channel, or one channel position in every
block of a grouped convolution. Blocks with quotas keep the same number of units
in each block (the output groups of a grouped conv, the heads of an attention).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..losses import Quadratic, robust_cholesky

__all__ = ["SelectionPiece", "pieces_of", "select_shared_channels"]


@dataclass
class SelectionPiece:
    """One consumer's quadratic restricted to one group: ``W`` (rows, D) at its optimum,
    ``Hinv`` (D, D), the columns of each unit ``cols`` (units, |J|; a unit the piece
    does not read has no row: ``units`` lists the unit ids of the rows) and its weight ω·s."""

    W: torch.Tensor
    Hinv: torch.Tensor
    units: torch.Tensor
    cols: torch.Tensor
    weight: float


def pieces_of(quad: Quadratic, units: torch.Tensor, cols: torch.Tensor, weight: float = 1.0,
              group: int = 0, row_weight: torch.Tensor | None = None) -> SelectionPiece:
    """The selection piece of group ``group`` of ``quad``: its unconstrained optimum ``W*``
    (damped, as the exact solver forms it) and ``H⁻¹``, in float64. ``row_weight`` (one
    per output row of the group) weighs each row's share of the OBS cost: the rows of
    ``W`` are scaled by its square root, which the OBS update, linear in each row, keeps."""
    quad = quad.to(torch.float64)
    W = quad.minimizer()[group]
    if row_weight is not None:
        W = W * row_weight.to(W).sqrt()[:, None]
    Hinv = torch.cholesky_inverse(robust_cholesky(quad.damped_H()[group]))
    return SelectionPiece(W.clone(), Hinv, units.to(W.device).long(), cols.to(W.device).long(),
                          float(weight) * quad.scale)


def select_shared_channels(pieces: list[SelectionPiece], n_units: int, keep: int,
                           blocks: torch.Tensor | None = None, costs: list[float] | None = None) -> torch.Tensor:
    """Greedy backward elimination of units over all ``pieces``; returns the kept units (bool).

    Args:
        pieces: the consumers' pieces (:func:`pieces_of`).
        n_units: number of units.
        keep: units to keep (per block when ``blocks`` is given: ``keep`` must then be a
            multiple of the number of blocks).
        blocks: block id of every unit; each block keeps ``keep / n_blocks`` units.
        costs: if given, the summed cost ``Σ_p ω_p ΔL_p`` of each removal is appended, in
            order: their running sum is the loss increase after each removal (the OBS
            costs are exact increments of the quadratics), a layer's error curve.
    """
    if not 1 <= keep <= n_units:
        raise ValueError(f"keep: expected 1..{n_units} units, got {keep}")
    alive = torch.ones(n_units, dtype=torch.bool)
    if blocks is None:
        blocks = torch.zeros(n_units, dtype=torch.long)
    n_blocks = int(blocks.max()) + 1
    if keep % n_blocks:
        raise ValueError(f"keep: {keep} units do not split evenly over {n_blocks} blocks")
    quota = keep // n_blocks
    state = [(p.W.clone(), p.Hinv.clone()) for p in pieces]
    for _ in range(n_units - keep):
        cost = torch.zeros(n_units, dtype=torch.float64)
        for p, (w, hinv) in zip(pieces, state):
            live = alive[p.units.cpu()]
            if not bool(live.any()):
                continue
            J = p.cols[live]                                              # (n, |J|)
            Hjj = hinv[J[:, :, None], J[:, None, :]]                      # (n, |J|, |J|)
            wj = w[:, J].permute(1, 0, 2)                                 # (n, rows, |J|)
            c = (torch.bmm(wj, torch.linalg.inv(Hjj)) * wj).sum(dim=(1, 2))
            cost.index_add_(0, p.units.cpu()[live], p.weight * c.cpu())
        left = torch.bincount(blocks[alive], minlength=n_blocks)
        candidates = alive & (left[blocks] > quota)
        cost[~candidates] = float("inf")
        u = int(torch.argmin(cost))
        if costs is not None:
            costs.append(float(cost[u]))
        alive[u] = False
        for p, (w, hinv) in zip(pieces, state):
            rows = torch.nonzero(p.units.cpu() == u).flatten()
            if not rows.numel():
                continue
            J = p.cols[int(rows[0])]
            coef = torch.linalg.inv(hinv[J][:, J])
            w -= (w[:, J] @ coef) @ hinv[J, :]
            hinv -= hinv[:, J] @ coef @ hinv[J, :]
            w[:, J] = 0
    return alive
