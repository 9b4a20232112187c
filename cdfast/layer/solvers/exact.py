r"""The exact solver: the layer's quadratic solved directly, no step size, no schedule.

Every loss of the family is ``s·[tr((W − W*)·H·(W − W*)ᵀ) + c]`` (SPEC §2.1), so one
machinery serves them all, whatever the inputs (crossing changes ``W*`` and ``H``, not
the algorithm):

* **no budget, penalties**: for a fixed support ``S`` the optimum is one linear solve
  per row, ``W_S = R_S H_SS⁻¹`` with ``R = A·H − F`` (:func:`solve_on_support`); ``L1`` and
  ``GroupLasso`` are minimised by accelerated proximal gradient (:func:`penalized_solve`);
* **channel budgets**: the input channels are chosen by greedy optimal-brain-surgeon
  elimination in rounds of joint removals (:func:`_select_channels`), then one solve;
* **weight and N:M budgets** (:func:`_prune`): one SparseGPT-style column sweep
  (:mod:`.sweep`) that chooses the mask as it goes, with the layer's budget distributed
  over the column windows by the saliency ``t²·Ũ_jj²`` of the whole layer (SparseGPT gives
  every window the same share), then coordinate passes that re-fit the kept weights
  to the mask. The sweep never revisits a column, so the kept weights of early columns
  do not compensate what later columns lose; the passes recover most of the gap to the
  exact per-row re-solve (measured in ``bench/RESULTS.md``);
* **quantization** (:func:`_quantize`): the grid scale by a clipping search per output
  channel weighted by the sweep's pivots, one GPTQ-style sweep in act-order, then
  alternating closed-form refits of the scale and coordinate passes over the codes.

The sweeps run on ``(T, H_λ)``: ``H_λ = H + λI``, ``λ = δ·mean(diag H)`` with
``δ = max(damping, GPTQ_DAMPING, unseen)``, and ``T = A − F·H_λ⁻¹`` the damped optimum
(the teacher when the student's inputs equal the teacher's), so that directions the
samples do not see keep the teacher's weight. ``unseen`` is the energy per direction
that the calibration rows leave outside each other's span (leave-one-out, measured by
:class:`~cdfast.layer.statistics.LayerStatistics` when it has fewer rows than columns):
with ``M < D`` the Gram matrix says nothing about ``D − M`` directions that fresh inputs
do excite, and damping at their measured level keeps the sweeps from over-fitting the
calibration rows. Every heavy step (one factorisation per layer, the blocked sweeps) is
plain torch on the statistics' device and dtype.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ...dispatch import call
from ..constraints import expand_channels
from ..losses import Quadratic, robust_cholesky, row_dots
from ..plan import ConstraintPlan
from . import woodbury
from .sweep import (ColumnRule, WindowBudget, act_order, block_size, coordinate_pass, exchange_rounds,
                    grid_search_scale, nm_order, refit_scale, reverse_cholesky, sweep, transposed, upper_t_mul)

__all__ = ["exact_solve", "solve_on_support", "penalized_solve", "GPTQ_DAMPING"]

#: Least relative damping of ``H`` in the sweeps (GPTQ's and SparseGPT's default). The
#: sweep divides by the pivots of the factor of ``H``: with the solver's 1e-6 it chases
#: nearly unseen directions, and the rounded layer is worse even on the calibration rows
#: (W4 from 48 rows of a 128-input Linear: held-out error 5.5e-3 at 1e-6, 3.0e-3 at 1e-2,
#: where rounding the teacher gives 4.9e-3; at 512 rows 1.5e-3 vs 1.3e-3). 3e-2 rather
#: than GPTQ's 1e-2: on the ViT replica (tests/test_foreign_models.py) W4 at 1e-2 left the
#: network's output 0.128 from the teacher's on held-out inputs, above naive rounding's
#: 0.114 (0.103 against 0.112 even on the calibration inputs); at 3e-2 it is 0.087.
GPTQ_DAMPING = 3e-2
#: Coordinate passes after the pruning sweep and after the rounding sweep. Each costs
#: about two sweeps' worth of products; see bench/RESULTS.md for what they buy.
PRUNE_PASSES = 1
QUANT_PASSES = 2
#: Mask exchange rounds after the passes (:func:`.sweep.exchange_rounds`), at most
#: ``EXCHANGE_ROUNDS`` and only as many as ``EXCHANGE_WORK`` multiply-adds pay for (a round
#: costs about ``5·R·D²``). They lower the loss of every layer measured (a 768→768 Linear
#: at 50 %: held-out error 3.09e-3 after the passes, 2.96e-3 after one round, 2.64e-3 after
#: ten), but each costs two passes: within SparseGPT's time only layers of a few thousand
#: weights can afford them, where a gradual search finds much better masks than one sweep
#: (16→12 3×3 at 30 % density: loss 0.084 after the passes, 0.066 after the exchanges).
EXCHANGE_ROUNDS = 32
EXCHANGE_WORK = 5e7
#: Columns per window of the unstructured mask choice (SparseGPT's ``B_s``).
MASK_WINDOW = 128
#: Rounds of joint removals in the greedy channel selection (one channel per round when
#: fewer than this many are removed: the plain greedy order).
CHANNEL_ROUNDS = 32


def solve_on_support(quad: Quadratic, support: torch.Tensor) -> torch.Tensor:
    r"""Minimise the quadratic with ``W[~support] = 0``, damped towards the teacher.

    With the columns outside ``S`` fixed at zero, the optimum of
    ``L(W) + s·λ‖W_S − A_S‖²`` (``λ = δ·mean(diag H)``, the damping of
    :meth:`Quadratic.damped_H`) is, row by row,

        W_S = (R_S + λ·A_S)·(H_SS + λI)⁻¹,      R = A·H − F.

    Where ``H_SS`` is well conditioned this is the exact constrained optimum
    ``R_S H_SS⁻¹`` to within ``O(δ)``; along directions the samples do not see (fewer
    sampled rows than columns, ``M < D``, or dead channels) it keeps the teacher's
    weight instead of setting it to zero. An unconstrained solve of a layer whose
    teacher is already optimal returns the teacher.

    ``support`` is a boolean ``(G, C_out/G, D)`` tensor. Rows that share a support
    (channel pruning) are solved together with one factorisation.
    """
    H = quad.damped_H()
    lam = quad.damping_lambda()
    rhs = torch.bmm(quad.anchor, quad.H) - quad.F + lam[:, None, None] * quad.anchor
    out = torch.zeros_like(quad.anchor)
    for g in range(H.shape[0]):
        sup = support[g]
        if bool((sup == sup[:1]).all()):  # one support for every row
            idx = torch.nonzero(sup[0]).flatten()
            if idx.numel():
                L = robust_cholesky(H[g][idx][:, idx])
                out[g][:, idx] = torch.cholesky_solve(rhs[g][:, idx].t(), L).t()
            continue
        D = H.shape[-1]
        chunk = max(1, (1 << 27) // (D * D * H.element_size()))
        eye = torch.eye(D, dtype=H.dtype, device=H.device)
        for r0 in range(0, sup.shape[0], chunk):
            m = sup[r0:r0 + chunk].to(H.dtype)  # (r, D)
            Hr = m[:, :, None] * H[g][None] * m[:, None, :] + (1 - m)[:, :, None] * eye
            L = robust_cholesky(Hr)
            out[g][r0:r0 + chunk] = torch.cholesky_solve((rhs[g][r0:r0 + chunk] * m)[..., None], L)[..., 0]
    return out


class _BlockOps:
    """The ``sweep_block`` and ``coordinate_block`` operators for a device and backend (through
    :func:`cdfast.dispatch.call`, so a block a kernel does not take runs on torch)."""

    def __init__(self, device, backend, strict):
        self.args = (device, backend, strict)

    def sweep(self, *args) -> None:
        call("sweep_block", *self.args, *args)

    def coordinate(self, *args) -> None:
        call("coordinate_block", *self.args, *args)


def sweep_damping(quad: Quadratic) -> float:
    """``δ`` of the sweeps: ``max(damping, GPTQ_DAMPING, unseen)`` (see the module docstring)."""
    return max(quad.damping, GPTQ_DAMPING, quad.unseen)


@dataclass
class _SweepProblem:
    """A layer's sweep problem in sweep order and transposed: position ``p`` of group ``g``
    is the layer's column ``order[g, p]`` (the identity when ``order`` is None); ``T`` and
    the weights are ``(G, D, R)``."""

    T: torch.Tensor | None     # the target
    H: torch.Tensor            # H_λ, damped, in sweep order
    U: torch.Tensor            # upper triangular, H_λ = U·Uᵀ
    order: torch.Tensor | None  # (G, D)
    lam: torch.Tensor          # λ per group
    optimum: bool = True       # T is the damped optimum A − F·H_λ⁻¹ (not a given target)

    def to_sweep(self, X: torch.Tensor) -> torch.Tensor:
        """``(G, R, D)`` in layer order → ``(G, D, R)`` in sweep order."""
        Xt = transposed(X)
        if self.order is None:
            return Xt
        return torch.gather(Xt, 1, self.order[..., None].expand(Xt.shape))

    def back(self, Xt: torch.Tensor) -> torch.Tensor:
        """``(G, D, R)`` in sweep order → ``(G, R, D)`` in layer order."""
        if self.order is not None:
            Xt = torch.empty_like(Xt).scatter_(1, self.order[..., None].expand(Xt.shape), Xt)
        return transposed(Xt)


def _sweep_problem(quad: Quadratic, order: torch.Tensor | None, target: torch.Tensor | None = None) -> _SweepProblem:
    """``(T, H_λ, Ũ)`` in the column ``order`` (``(G, D)``, None: the layer's). ``T = A − F·H_λ⁻¹``
    unless ``target`` (layer order) is given; one factorisation of ``H_λ``."""
    G, R, D = quad.anchor.shape
    if order is None:
        H = quad.H.clone()
    else:
        H = torch.gather(quad.H, 1, order[..., None].expand(G, D, D))
        H = torch.gather(H, 2, order[:, None, :].expand(G, D, D))
    mean_diag = torch.diagonal(H, dim1=-2, dim2=-1).mean(-1)
    # a group whose inputs are all zero (a dead channel of a depthwise conv) has H = 0: any
    # weight is optimal, and λ = 1 keeps its sweep finite (it keeps the target)
    lam = torch.where(mean_diag > 0, sweep_damping(quad) * mean_diag, torch.ones_like(mean_diag))
    H.diagonal(dim1=-2, dim2=-1).add_(lam[:, None])
    U = reverse_cholesky(H)
    prob = _SweepProblem(None, H, U, order, lam, target is None)
    if target is not None:
        prob.T = prob.to_sweep(target)
    else:
        prob.T = prob.to_sweep(quad.anchor)
        if bool(quad.F.any()):  # T = A − F·H_λ⁻¹, with H_λ⁻¹ = U⁻ᵀU⁻¹ (transposed: Tᵀ = Aᵀ − H_λ⁻¹Fᵀ)
            y = torch.linalg.solve_triangular(U, prob.to_sweep(quad.F), upper=True)
            prob.T -= torch.linalg.solve_triangular(U.transpose(1, 2), y, upper=False)
    return prob


def _loss(quad: Quadratic, prob: _SweepProblem, Q: torch.Tensor, Y: torch.Tensor) -> float:
    """``L(W)`` from the whitened residual ``Y`` of the sweep problem, without a product:
    ``L/s = ‖Y‖² − ⟨A − T, F⟩ − λ‖W − A‖² + f₀`` when ``T = A − F·H_λ⁻¹`` (``‖Y‖²`` is the damped
    ``tr((W − T)·H_λ·(W − T)ᵀ)``); any other target falls back to the quadratic itself."""
    if not prob.optimum:
        return float(quad.loss(prob.back(Q)))
    with_F = bool(quad.F.any())
    A = prob.to_sweep(quad.anchor) if with_F else prob.T  # T = A when F = 0
    value = row_dots(Y, Y).sum() - (prob.lam.double() * row_dots(Q - A, Q - A).sum(-1)).sum() + quad.f0.double()
    if with_F:
        value = value - row_dots(A - prob.T, prob.to_sweep(quad.F)).sum()
    return float(quad.scale * value)


def _prune(quad: Quadratic, plan: ConstraintPlan, ops: "_BlockOps") -> tuple[torch.Tensor, torch.Tensor, float]:
    """Weight or N:M budget: the mask-choosing sweep, then coordinate passes on the mask.
    Returns ``(W, support, loss)`` in layer order."""
    geo = plan.geometry
    G, R, D = quad.anchor.shape
    wc = geo.cols
    topk = plan.ops["topk_mask"]
    if plan.nm is not None:
        m = plan.nm.m
        order = nm_order(wc, geo.taps, m, D, quad.H.device).expand(G, D)
        block, window = m * math.ceil(block_size(D) / m), m
    else:  # (MASK_WINDOW is a multiple of every block size)
        order, block, window = None, block_size(D), MASK_WINDOW
    prob = _sweep_problem(quad, order)
    fixed = None if bool(plan.mask.all()) else prob.to_sweep(plan.mask)  # a FixedSupport: never leave it
    mask = torch.ones(G, D, R, dtype=torch.bool, device=quad.H.device) if fixed is None else fixed.clone()
    if plan.nm is not None:
        budget = WindowBudget(prob.U, window, topk, nm=(plan.nm.n, m), cols=wc)
    else:  # the layer's budget, shared out over the windows by the saliency of the whole layer
        pivots = torch.diagonal(prob.U, dim1=-2, dim2=-1).pow(2)[:, :wc, None]
        score = prob.T[:, :wc].pow(2) * pivots
        if fixed is not None:
            score = torch.where(fixed[:, :wc], score, torch.full_like(score, -1.0))
        chosen = topk(score, int(plan.weight.density * plan.numel + 1e-9))
        windows = math.ceil(wc / window)
        if windows * window > wc:
            chosen = torch.nn.functional.pad(chosen, (0, 0, 0, windows * window - wc))
        keep = chosen.reshape(G, windows, -1).sum(-1)
        budget = WindowBudget(prob.U, window, topk, keep=keep, cols=wc, allowed=fixed)
    rule = ColumnRule(mask=mask, budget=budget)
    Q, Y = sweep(prob.T, prob.U, rule, block, residual=True, block_op=ops.sweep)
    for _ in range(PRUNE_PASSES):
        Q, Y = coordinate_pass(Q, Y, prob.U, prob.H, rule, block, block_op=ops.coordinate)
    if plan.weight is not None:  # exchanges: as many rounds as EXCHANGE_WORK allows
        rounds = min(EXCHANGE_ROUNDS, int(EXCHANGE_WORK // (5.0 * G * R * D * D)))
        Q, Y = exchange_rounds(Q, Y, prob.U, prob.H, rule, wc, rounds, block_op=ops.coordinate, allowed=fixed)
    return prob.back(Q), prob.back(rule.mask), _loss(quad, prob, Q, Y)


def _quantize(quad: Quadratic, plan: ConstraintPlan, W: torch.Tensor | None, support: torch.Tensor,
              target: torch.Tensor | None, ops: "_BlockOps") -> tuple[torch.Tensor, torch.Tensor, float]:
    """Round to the grid on ``support``: the clipping search (on ``W``, or on the sweep's
    target when None), one sweep in act-order, then refits of the scale alternating with
    coordinate passes.

    The sweep's target is the damped optimum ``T`` (or ``target``, a penalised solution).
    Columns that no row keeps (a channel budget, the channels of a ``FixedSupport``) go first in the sweep: fixing them at zero
    turns ``T`` into the optimum on the kept columns, and the rest of the sweep is the
    sweep of the restricted problem. Returns ``(W, scale, loss)``, ``scale`` shaped as
    ``plan.scale``.
    """
    geo, q = plan.geometry, plan.quant
    G, R, D = quad.anchor.shape
    wc = geo.cols
    first = None
    if not bool(support.all()):  # columns no row keeps (a channel budget, a FixedSupport's channels)
        first = ~support[..., :wc].any(dim=1)
    order = act_order(quad.H, D - wc, first)
    prob = _sweep_problem(quad, order, target)
    mask = None if bool(support.all()) else prob.to_sweep(support)
    pivots = torch.diagonal(prob.U, dim1=-2, dim2=-1).pow(2)[:, :wc, None]
    start = (prob.T if W is None else prob.to_sweep(W))[:, :wc]
    scale = grid_search_scale(start, pivots, q.bits, q.per_channel, None if mask is None else mask[:, :wc])
    rule = ColumnRule(mask, scale, q.bits, wc)
    block = block_size(D)
    Q = sweep(prob.T, prob.U, rule, block, block_op=ops.sweep)
    UT = upper_t_mul(prob.U, prob.T)
    _, Y = refit_scale(Q, rule, prob.U, UT, q.per_channel)
    for i in range(QUANT_PASSES):
        if i:
            _, Y = refit_scale(Q, rule, prob.U, UT, q.per_channel)
        Q, Y = coordinate_pass(Q, Y, prob.U, prob.H, rule, block, block_op=ops.coordinate)
    scale = rule.scale.transpose(1, 2)  # (G, R, 1)
    return prob.back(Q), (scale if q.per_channel else scale[:1, :1, :1]).contiguous(), _loss(quad, prob, Q, Y)


def _select_channels(quad: Quadratic, plan: ConstraintPlan) -> torch.Tensor:
    """Greedy backward channel elimination by the group OBS cost ``tr(W_J [H⁻¹]_JJ⁻¹ W_Jᵀ)``.

    Channels leave in at most ``CHANNEL_ROUNDS`` rounds: each round removes the cheapest
    ``⌈remaining/rounds left⌉`` together (one joint OBS update of the weight and of ``H⁻¹``, a
    matrix product), so the selection costs a few products of ``H⁻¹``'s size however many
    channels go; with fewer removals than rounds it is the one-at-a-time greedy order.
    """
    geo = plan.geometry
    t, C, k_target = geo.taps, geo.group_in, plan.target_channels
    W = quad.minimizer()
    Hinv = torch.cholesky_inverse(robust_cholesky(quad.damped_H()))
    keep = torch.ones(geo.groups, C, dtype=torch.bool, device=W.device)
    offsets = torch.arange(t, device=W.device)
    for g in range(geo.groups):
        w, hinv = W[g].clone(), Hinv[g].clone()
        rows = w.shape[0]
        alive = keep[g]
        for r in channel_rounds(C - k_target):
            idx = torch.nonzero(alive).flatten()
            blocks = hinv[:C * t, :C * t].reshape(C, t, C, t).diagonal(dim1=0, dim2=2).permute(2, 0, 1)[idx]
            wj = w[:, :C * t].reshape(rows, C, t).transpose(0, 1)[idx]  # (alive, rows, t)
            cost = (torch.bmm(wj, torch.linalg.inv(blocks)) * wj).sum(dim=(1, 2))
            drop = idx[torch.topk(cost, r, largest=False).indices]
            J = (drop[:, None] * t + offsets).flatten()
            coef = torch.linalg.inv(hinv[J][:, J])
            hJ = hinv[J]  # (|J|, D): OBS removal of the columns J, compensated by the others
            w -= (w[:, J] @ coef) @ hJ
            hinv -= hJ.t() @ coef @ hJ
            w[:, J] = 0
            alive[drop] = False
    return keep


def channel_rounds(total: int) -> list[int]:
    """Channels removed in each round when ``total`` go: at most ``CHANNEL_ROUNDS`` rounds,
    each removing ``⌈remaining/rounds left⌉``."""
    out, rounds = [], min(CHANNEL_ROUNDS, total)
    while total > 0:
        r = math.ceil(total / rounds)
        out.append(r)
        total, rounds = total - r, rounds - 1
    return out


def exact_solve(quad: Quadratic, plan: ConstraintPlan, backend: str | None = "auto", strict: bool | None = None,
                lowrank: bool = False):
    """The exact solver. Returns ``(W, history)`` with the loss after each phase.

    Linear solves on a support, the channel selection and the penalties work in float64
    (a nearly singular ``H`` needs the digits, and they cost little next to the
    statistics); the sweeps and coordinate passes, damped by at least ``GPTQ_DAMPING``,
    work in the statistics' dtype. ``backend``/``strict`` choose the implementations of
    the ``sweep_block`` and ``coordinate_block`` operators (:mod:`cdfast.dispatch`).
    ``lowrank``: solve on the factor of a low-rank quadratic, ``H`` never formed
    (:mod:`.woodbury`; column supports only: no weight or N:M budget, grid or penalty).
    """
    if lowrank:
        if quad.representation != "lowrank" or not woodbury.takes(plan.items):
            raise ValueError("solver: the exact solver works on the low-rank form for channel budgets and "
                             "channel supports only (no WeightPrune, NMSparsity, Quantize or penalties), "
                             "with fewer sampled rows than columns")
        W = woodbury.lowrank_solve(quad, plan, channel_rounds)
        return W, [(0, float(quad.loss(W)))]
    quad = quad.dense()
    ops = _BlockOps(quad.H.device, backend, strict)
    out_dtype = quad.H.dtype
    support = plan.mask.clone()  # all True but where a FixedSupport removed weights
    W, loss, target = None, None, None
    if plan.weight is not None or plan.nm is not None:
        W, support, loss = _prune(quad, plan, ops)
    elif plan.channel is not None or plan.penalties or plan.quant is None:
        quad64 = quad.to(torch.float64)
        if plan.channel is not None:
            keep = _select_channels(quad64, plan)
            support &= expand_channels(keep, plan.geometry, support.shape[-1]).expand_as(support)
        W = solve_on_support(quad64, support)
        if plan.penalties:
            W = penalized_solve(quad64, plan, W, support)
            support = support & (W != 0)  # what the penalties zeroed stays zero (through rounding too)
            target = W.to(out_dtype)
        W = W.to(out_dtype)
    plan.mask = support
    history = [] if W is None else [(0, loss if loss is not None else float(quad.loss(W)))]
    if plan.quant is not None:  # (without a budget or penalties the sweep starts from its own target)
        W, plan.scale, loss = _quantize(quad, plan, W, support, target, ops)
        history.append((len(history), loss))
    return W, history


def _max_eigenvalue(H: torch.Tensor, iters: int = 50) -> torch.Tensor:
    """An upper estimate of ``λ_max(H_g)`` per group by power iteration (×1.05 for safety)."""
    v = torch.ones(H.shape[0], H.shape[-1], 1, dtype=H.dtype, device=H.device)
    lam = torch.ones(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(iters):
        w = torch.bmm(H, v)
        lam = w.norm(dim=(1, 2))
        v = w / lam.clamp_min(torch.finfo(H.dtype).tiny)[:, None, None]
    return 1.05 * lam


def penalized_solve(quad: Quadratic, plan: ConstraintPlan, W0: torch.Tensor, support: torch.Tensor,
                    max_iter: int = 3000, tol: float = 1e-9) -> torch.Tensor:
    r"""Minimise ``L(W) + Σ λ_p·P_p(W)`` on ``support`` by accelerated proximal gradient (FISTA).

    ``L`` is the layer quadratic, damped towards the teacher as in :func:`solve_on_support`
    (``+ s·λ_δ‖W − A‖²``, which also makes it strongly convex when ``M < D``); the
    penalties are the plan's ``L1`` (``λ‖W‖₁``) and ``GroupLasso`` (``λ·Σ_i ‖W[:, i]‖₂`` over
    input channels), with the same ``λ`` as the iterative solvers' proximal steps. Their
    joint prox is the group shrink of the soft threshold (the sparse-group-lasso
    identity), so the order in the constraint list does not matter here. The step is
    ``1/Lip``, ``Lip = 2s·(λ_max(H) + λ_δ)``; iterations stop when an update moves ``W`` by
    less than ``tol`` relative to ``‖W‖`` (or after ``max_iter``, with restarts when the
    objective rises). Columns outside ``support`` stay zero.
    """
    from ..constraints import GroupLasso, L1, group_shrink, soft_threshold

    geo = plan.geometry
    l1 = sum(p.strength for p in plan.penalties if isinstance(p, L1))
    gl = sum(p.strength for p in plan.penalties if isinstance(p, GroupLasso))
    lam = quad.damping_lambda()[:, None, None]
    lip = 2 * quad.scale * (_max_eigenvalue(quad.H) + lam[:, 0, 0])
    step = (1.0 / lip)[:, None, None]
    mask = support.to(W0.dtype)
    wc = geo.cols

    def grad(W):
        delta = W - quad.anchor
        return 2 * quad.scale * (torch.baddbmm(quad.F, delta, quad.H) + lam * delta) * mask

    def prox(W):
        W = W.clone()
        if l1:
            W[..., :wc] = soft_threshold(W[..., :wc], step * l1)
        if gl:  # one threshold per group: the step may differ between groups
            for g in range(W.shape[0]):
                W[g:g + 1] = group_shrink(W[g:g + 1], _one_group(geo), float(step[g]) * gl)
        return W * mask

    def objective(W):
        delta = W - quad.anchor
        val = quad.loss(W) + quad.scale * (lam * delta * delta).sum()
        if l1:
            val = val + l1 * W[..., :wc].abs().sum()
        if gl:
            from ..constraints import channel_norms

            val = val + gl * channel_norms(W, geo).sum()
        return float(val)

    W = prox(W0 * mask)
    Y, t, prev = W.clone(), 1.0, objective(W)
    for _ in range(max_iter):
        W_new = prox(Y - step * grad(Y))
        val = objective(W_new)
        if val > prev:  # restart the momentum (O'Donoghue & Candès)
            Y, t = W.clone(), 1.0
            continue
        t_new = (1 + math.sqrt(1 + 4 * t * t)) / 2
        Y = W_new + ((t - 1) / t_new) * (W_new - W)
        moved = float((W_new - W).norm()) / max(float(W_new.norm()), torch.finfo(W.dtype).tiny)
        W, t, prev = W_new, t_new, val
        if moved < tol:
            break
    return W


def _one_group(geo):
    """``geo`` with one group: ``group_shrink`` on the slice ``W[g:g+1]`` of a grouped layer."""
    from dataclasses import replace

    return replace(geo, in_channels=geo.group_in, out_channels=geo.group_out, groups=1)


