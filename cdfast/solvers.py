r"""Layer solvers: iterative (``adam``, ``sgd``) on either form, and ``exact``.

**Iterative solvers** follow the authors' per-layer procedure (SPEC §4): Adam
(or SGD with momentum) on the layer weight, the gradient and the optimizer state
masked where the weight is pruned, the constraint schedule of
:class:`~cdfast.constraints.ConstraintPlan` applied after every step. Step ``i``
(0-based) of the authors' code does, in this order:

1. ``g = ∇L(Q(W))`` (``Q`` the straight-through quantizer, identity otherwise);
2. ``g, m, v ← g·mask, m·mask, v·mask``;  one Adam step with ``lr_i``;
3. the schedule: for ``i ≤ T·ramp`` the budget shrinks linearly and the mask is
   recomputed from the new weight; proximal maps for penalties;
4. ``lr_{i+1} = lr·lr_drop`` once ``i > T·ramp + 1`` for channel budgets.

In the Gram form the gradient is ``2s·(ΔH + F)`` (:class:`~cdfast.losses.Quadratic`):
one small GEMM whatever the sample count. Once a channel mask is fixed the
pruned columns can never change again, so the remaining steps run on the
compacted problem (kept columns only): the same iterates, a fraction of the work.

**The exact solver** works on the quadratic. For a fixed support ``S`` the optimum
is one linear solve per row, ``W_S = R_S H_SS⁻¹`` with ``R = A·H − F``; the support is
chosen greedily by the optimal-brain-surgeon cost of removing each input channel
(channel budgets) or each weight (weight budgets, N:M), and quantization is a
GPTQ-style pass: columns are rounded one at a time and each rounding error is fed
forward into the columns not yet rounded through the Cholesky factor of ``H⁻¹``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .constraints import ConstraintPlan, expand_channels, nm_mask, quantize
from .losses import Quadratic, robust_cholesky

__all__ = ["SolverConfig", "gram_iterative", "data_iterative", "exact_solve", "refit_scale"]

SOLVERS = ("adam", "sgd", "exact")


@dataclass
class SolverConfig:
    """Settings of the iterative solvers (defaults: the authors' VGG settings)."""

    solver: str = "adam"
    steps: int = 3000
    lr: float = 5e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    momentum: float = 0.9
    log_every: int = 0  # 0 → about 100 points of history


_FUSED_ADAM: dict = {}  # (dtype, device type) → whether torch._fused_adam_ runs there


def _fused_adam_works(like: torch.Tensor) -> bool:
    """Whether ``torch._fused_adam_`` runs for this dtype and device (checked once each)."""
    key = (like.dtype, like.device.type)
    if key not in _FUSED_ADAM:
        try:
            p = torch.zeros(2, dtype=like.dtype, device=like.device)
            g = torch.ones_like(p)
            torch._fused_adam_([p], [g], [torch.zeros_like(p)], [torch.zeros_like(p)], [],
                               [torch.ones((), device=like.device)], lr=0.1, beta1=0.9, beta2=0.999,
                               weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
            _FUSED_ADAM[key] = bool(torch.allclose(p, torch.full_like(p, -0.1)))
        except (AttributeError, RuntimeError, NotImplementedError):
            _FUSED_ADAM[key] = False
    return _FUSED_ADAM[key]


class _Optimizer:
    """Adam or SGD+momentum on one tensor with masked state (torch.optim's formulas)."""

    def __init__(self, cfg: SolverConfig, like: torch.Tensor):
        self.cfg = cfg
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like) if cfg.solver == "adam" else None
        self.t = 0
        self._fused = self.v is not None and _fused_adam_works(like)
        self._step = torch.zeros((), dtype=torch.float32, device=like.device)

    def compact(self, cols: torch.Tensor) -> None:
        self.m = self.m[..., cols].contiguous()
        if self.v is not None:
            self.v = self.v[..., cols].contiguous()

    def step(self, W: torch.Tensor, grad: torch.Tensor, lr: float, mask: torch.Tensor | None) -> None:
        if mask is not None:
            grad = grad * mask
            self.m.mul_(mask)
            if self.v is not None:
                self.v.mul_(mask)
        self.t += 1
        cfg = self.cfg
        if self.v is None:  # SGD with momentum (dampening 0, as torch.optim.SGD)
            if self.t == 1:
                self.m.copy_(grad)
            else:
                self.m.mul_(cfg.momentum).add_(grad)
            W.add_(self.m, alpha=-lr)
            return
        b1, b2 = cfg.betas
        if self._fused:
            # torch's fused Adam kernel: the same update as torch.optim.Adam in one pass
            # instead of eight elementwise launches (a small layer's step is launch-bound).
            self._step.fill_(self.t)
            torch._fused_adam_([W], [grad], [self.m], [self.v], [], [self._step], lr=lr, beta1=b1, beta2=b2,
                               weight_decay=0.0, eps=cfg.eps, amsgrad=False, maximize=False)
            return
        self.m.lerp_(grad, 1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        step_size = lr / (1 - b1 ** self.t)
        denom = (self.v.sqrt() / math.sqrt(1 - b2 ** self.t)).add_(cfg.eps)
        W.addcdiv_(self.m, denom, value=-step_size)


def _log_every(cfg: SolverConfig) -> int:
    return cfg.log_every if cfg.log_every > 0 else max(1, cfg.steps // 100)


def _row_loss_fn(quad: Quadratic):
    """Per-row value of the quadratic (without ``f₀``), for choosing grid scales."""
    def row_loss(vals: torch.Tensor) -> torch.Tensor:
        delta = vals - quad.anchor
        return (delta * (torch.bmm(delta, quad.H) + 2 * quad.F)).sum(-1)
    return row_loss


def refit_scale(codes: torch.Tensor, quad: Quadratic, levels: int, per_channel: bool,
                old: torch.Tensor, weight_cols: int) -> torch.Tensor:
    r"""Closed-form grid scale for fixed codes ``z = codes/L``.

    Minimising ``(s·z − a)H(s·z − a)ᵀ + 2(s·z − a)fᵀ`` over ``s`` gives
    ``s = z·rᵀ / (z H zᵀ)`` with ``r`` the row of ``R = A·H − F`` (summed over rows
    for a per-layer scale). Rows with all-zero codes keep their old scale.
    """
    z = codes.to(quad.H.dtype) / levels
    D = quad.H.shape[-1]
    if weight_cols < D:  # the bias column is not on the grid: it enters as a constant
        z = torch.cat([z, torch.zeros_like(z[..., : D - weight_cols])], dim=-1)
    R = quad.R
    if weight_cols < D:  # move the fixed bias contribution to the right-hand side
        b = torch.zeros_like(quad.anchor)
        b[..., weight_cols:] = quad.anchor[..., weight_cols:]
        R = R - torch.bmm(b, quad.H)
    num = (z * R).sum(-1, keepdim=True)
    den = (torch.bmm(z, quad.H) * z).sum(-1, keepdim=True)
    if not per_channel:
        num, den = num.sum().reshape(1, 1, 1), den.sum().reshape(1, 1, 1)
    ok = (den > 0) & (num > 0)
    return torch.where(ok, num / den.clamp_min(torch.finfo(den.dtype).tiny), old)


# ----------------------------------------------------------- Gram form, iterative
def gram_iterative(quad: Quadratic, plan: ConstraintPlan, cfg: SolverConfig):
    """Adam / SGD on the Gram-form quadratic. Returns ``(W_latent, history)``.

    ``history`` is a list of ``(step, loss)`` pairs; the loss is the layer loss at
    the weight the step's gradient was taken at.
    """
    A, H, Fm = quad.anchor, quad.H, quad.F
    W = A.clone()
    opt = _Optimizer(cfg, W)
    every = _log_every(cfg)
    hist_steps, hist_vals = [], []
    refit_every = max(1, cfg.steps // 10)
    if plan.quant is not None:
        plan.init_scale(W, _row_loss_fn(quad))
    two_s = 2.0 * quad.scale

    cols = None  # kept columns once the problem is compacted
    full_quad = quad
    best_value, best_W, best_scale, best_cols = math.inf, None, None, None
    for i in range(cfg.steps):
        # Compact when nothing but Adam will touch the pruned columns again.
        if (cols is None and plan.channel is not None and plan.mask_fixed and not plan.penalties
                and plan.geometry.groups == 1 and i > plan.ramp_end):
            cols = torch.nonzero(plan.mask[0, 0]).flatten()
            quad = quad.restrict(cols)
            W, A, H, Fm = W[..., cols].contiguous(), quad.anchor, quad.H, quad.F
            opt.compact(cols)
        mask = None if cols is not None or plan.mask.all() else plan.mask
        We = W if plan.quant is None else _effective(plan, W, cols, mask)
        delta = We - A
        G = torch.baddbmm(Fm, delta, H)
        if i % every == 0 or i == cfg.steps - 1 or plan.quant is not None:
            value = (delta * (G + Fm)).sum() + quad.f0
            if i % every == 0 or i == cfg.steps - 1:
                hist_steps.append(i)
                hist_vals.append(value)
            if plan.quant is not None and float(value) < best_value:
                # Straight-through steps can jump across rounding boundaries and
                # worsen the projected weight: keep the best projected iterate.
                best_value, best_W, best_scale, best_cols = float(value), W.clone(), plan.scale.clone(), cols
        opt.step(W, G.mul_(two_s), cfg.lr * plan.lr_factor(i), mask)
        if cols is None:
            plan.after_step(W, i, cfg.lr * plan.lr_factor(i))
        if plan.quant is not None and (i + 1) % refit_every == 0:
            wc = plan.geometry.cols if cols is None else _weight_cols(plan, cols)
            codes = plan.ops["quantize"](W[..., :wc], plan.scale, plan.quant.bits)[0]
            plan.scale = refit_scale(codes, quad, plan.quant.levels, plan.quant.per_channel, plan.scale, wc)
    if plan.quant is not None:
        W, cols, plan.scale = best_W, best_cols, best_scale
    return expand_result(W, cols, full_quad, hist_steps, hist_vals)


def expand_result(W: torch.Tensor, cols: torch.Tensor | None, full_quad: Quadratic, hist_steps: list,
                  hist_vals: list):
    """Scatter a compacted solution back to the layer's columns; history as ``(step, loss)``."""
    if cols is not None:
        full = torch.zeros_like(full_quad.anchor)
        full[..., cols] = W
        W = full
    return W, [(s, float(full_quad.scale * v)) for s, v in zip(hist_steps, hist_vals)]


def _weight_cols(plan: ConstraintPlan, cols: torch.Tensor) -> int:
    return int((cols < plan.geometry.cols).sum())


def _effective(plan: ConstraintPlan, W: torch.Tensor, cols, mask) -> torch.Tensor:
    if cols is None:
        return plan.effective(W)
    wc = _weight_cols(plan, cols)
    _, vals = plan.ops["quantize"](W[..., :wc], plan.scale, plan.quant.bits)
    return torch.cat([vals, W[..., wc:]], dim=-1) if wc < W.shape[-1] else vals


# ----------------------------------------------------------- data form, iterative
def data_iterative(loss_fn, anchor: torch.Tensor, plan: ConstraintPlan, cfg: SolverConfig,
                   num_batches: int):
    """Adam / SGD on the data form. ``loss_fn(W_matrix, batch_index)`` is differentiable."""
    W = anchor.clone()
    opt = _Optimizer(cfg, W)
    every = _log_every(cfg)
    history = []
    if plan.quant is not None:
        plan.init_scale(W)
    for i in range(cfg.steps):
        mask = None if plan.mask.all() else plan.mask
        We = plan.effective(W).detach().requires_grad_(True)
        loss = loss_fn(We, i % num_batches)
        (grad,) = torch.autograd.grad(loss, We)
        if i % every == 0 or i == cfg.steps - 1:
            history.append((i, float(loss.detach())))
        opt.step(W, grad, cfg.lr * plan.lr_factor(i), mask)
        plan.after_step(W, i, cfg.lr * plan.lr_factor(i))
    return W, history


# ----------------------------------------------------------------- exact solver
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
    support = torch.ones_like(quad.anchor, dtype=torch.bool)
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
                new[..., :geo.cols] = _topk_bool(scores, k)
            else:
                new = nm_mask(saliency, geo, plan.nm.m - r, plan.nm.m) & support
            support = new
            W = solve_on_support(quad, support)
    return support


def _topk_bool(scores: torch.Tensor, k: int) -> torch.Tensor:
    flat = scores.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[torch.topk(flat, k, sorted=False).indices] = True
    return mask.view_as(scores)


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
    L = 2 ** (bits - 1) - 1
    sup = support.to(W.dtype)
    for b0 in range(0, D, block):
        b1 = min(D, b0 + block)
        Err = torch.zeros(W.shape[0], b1 - b0, dtype=W.dtype, device=W.device)
        for j in range(b0, b1):
            w = W[:, j]
            if j < weight_cols:
                q = torch.clamp(torch.round(w / scale * L), -L, L) * (scale / L) * sup[:, j]
            else:
                q = w
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
    from .dispatch import call

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
        plan.init_scale(W, _row_loss_fn(quad))
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
            plan.scale = refit_scale(codes, quad, plan.quant.levels, plan.quant.per_channel, plan.scale, wc)
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
