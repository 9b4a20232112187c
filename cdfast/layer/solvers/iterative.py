r"""The iterative solvers (``adam``, ``sgd``) on either form: one loop, several engines.

They follow the authors' per-layer procedure (SPEC §4): Adam (or SGD with
momentum) on the layer weight, the gradient and optimizer state masked where the
weight is pruned, the constraint schedule of
:class:`~cdfast.layer.plan.ConstraintPlan` applied after every step. Step ``i``
(0-based) does, in this order:

1. ``g = ∇L(Q(W))`` (``Q`` the straight-through quantizer, identity otherwise);
2. ``g, m, v ← g·mask, m·mask, v·mask``;  one Adam step with ``lr_i``;
3. the schedule: for ``i ≤ T·ramp`` the budget shrinks linearly and the mask is
   recomputed from the new weight; proximal maps for penalties;
4. ``lr_{i+1} = lr·lr_drop`` once ``i > T·ramp + 1`` for channel budgets.

:func:`run_iterative` is that loop, written once. What differs between backends
and forms is how a step is executed, so each supplies an *engine*:

* :class:`TorchGramEngine`: the Gram form, ``∇L = 2s·(ΔH + F)`` (one small GEMM
  whatever the sample count), in plain PyTorch; the oracle of the other engines;
* :class:`DataEngine`: the data form, convolutions on the raw features through
  the ``data_loss_grad`` op (any backend);
* the Triton engine (``cdfast._backends.triton``): each step one fused kernel.

The persistent CUDA solver runs the same loop on the device and reads the same
:class:`~cdfast.layer.plan.StepSchedule`.

**Best projected iterate.** Straight-through steps can jump across rounding
boundaries and worsen the projected weight, so with quantization the loop keeps
the best iterate seen — counting only iterates that already satisfy the final
constraint (``step ≥ schedule.final_from``): an early iterate, before the budget
has shrunk, has a lower loss only because it is not yet pruned.

Once a channel mask is final the pruned columns can never change again, so the
Gram engines go on with the compacted problem (kept columns only): the same
iterates, a fraction of the work.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..losses import LOSS_CHUNK_ELEMENTS, Quadratic
from ..plan import ConstraintPlan

__all__ = ["SolverConfig", "run_iterative", "gram_iterative", "data_iterative", "TorchGramEngine",
           "DataEngine", "ITERATIVE_SOLVERS", "history_steps"]

ITERATIVE_SOLVERS = ("adam", "sgd")


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


def history_steps(cfg: SolverConfig) -> list[int]:
    """The steps whose loss goes into the history: every ``log_every``-th and the last."""
    every = cfg.log_every if cfg.log_every > 0 else max(1, cfg.steps // 100)
    return [i for i in range(cfg.steps) if i % every == 0 or i == cfg.steps - 1]


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
        self.t += 1
        self.update(W, grad, lr, mask)

    def update(self, W: torch.Tensor, grad: torch.Tensor, lr: float, mask: torch.Tensor | None,
               rows: slice = slice(None)) -> None:
        """Step ``self.t``'s update of the output rows ``rows`` (``grad`` holds those rows): a
        wide layer's step can then go a chunk of rows at a time, its gradient never whole."""
        W, m, v = W[:, rows], self.m[:, rows], None if self.v is None else self.v[:, rows]
        if mask is not None:
            mask = mask[:, rows]
            grad = grad.mul_(mask)  # the engines' own gradient: masked in place
            m.mul_(mask)
            if v is not None:
                v.mul_(mask)
        cfg = self.cfg
        if v is None:  # SGD with momentum (dampening 0, as torch.optim.SGD)
            if self.t == 1:
                m.copy_(grad)
            else:
                m.mul_(cfg.momentum).add_(grad)
            W.add_(m, alpha=-lr)
            return
        b1, b2 = cfg.betas
        if self._fused and W.is_contiguous():
            # torch's fused Adam kernel: the same update as torch.optim.Adam in one pass
            # instead of eight elementwise launches (a small layer's step is launch-bound).
            self._step.fill_(self.t)
            torch._fused_adam_([W], [grad], [m], [v], [], [self._step], lr=lr, beta1=b1, beta2=b2,
                               weight_decay=0.0, eps=cfg.eps, amsgrad=False, maximize=False)
            return
        m.lerp_(grad, 1 - b1)
        v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        step_size = lr / (1 - b1 ** self.t)
        denom = (v.sqrt() / math.sqrt(1 - b2 ** self.t)).add_(cfg.eps)
        W.addcdiv_(m, denom, value=-step_size)


# ------------------------------------------------------------------- the loop
def _check_finite(value: torch.Tensor, step: int, cfg: SolverConfig) -> None:
    """A diverging run stops with an error that names what to change (never NaN weights)."""
    v = float(value)
    if not math.isfinite(v):
        hint = " (or momentum)" if cfg.solver == "sgd" else ""
        raise ValueError(f"lr: the {cfg.solver} iterates diverged (loss {v} at step {step}) with lr={cfg.lr:g}"
                         f"{hint}; lower it, or use solver='exact'")


def run_iterative(engine, plan: ConstraintPlan, cfg: SolverConfig):
    """The iterative solve, for any engine. Returns ``(W_latent, history)``.

    ``history`` is a list of ``(step, loss)``; the loss of step ``i`` is the layer loss
    at the weight whose gradient step ``i`` takes. An engine provides ``W`` (its
    current latent weight), ``step``, ``after_step``, ``refit_scale``, ``snapshot``
    and ``result`` (see :class:`TorchGramEngine`), and may provide ``compact`` (the
    Gram engines) and ``run_steady`` (the Triton engine's CUDA graphs).
    """
    sched = plan.schedule
    logged = set(history_steps(cfg))
    history: list[tuple[int, torch.Tensor]] = []
    quant = plan.quant is not None
    if quant:
        plan.init_scale(engine.W, engine.row_loss)
    refit_every = max(1, cfg.steps // 10)
    best, best_value = None, math.inf
    i = 0
    while i < cfg.steps:
        if i >= sched.final_from:
            engine.compact()
        lr = cfg.lr * sched.lr_factor[i]
        ran = engine.run_steady(i, logged, history) if not quant else 0
        if ran:
            i += ran
            if history:
                _check_finite(history[-1][1], history[-1][0], cfg)
            continue
        track = quant and i >= sched.final_from
        value = engine.step(i, lr, want_value=track or i in logged, keep_previous=track)
        if i in logged:
            history.append((i, value))
            _check_finite(value, i, cfg)  # a synchronisation only at the ~100 logged steps
        if track and float(value) < best_value:
            best_value, best = float(value), engine.snapshot()
        engine.after_step(i, lr)
        if quant and (i + 1) % refit_every == 0:
            engine.refit_scale()
        i += 1
    if best is not None:
        engine.restore(best)
    return engine.result(history)


# ------------------------------------------------------------ Gram form, torch
class TorchGramEngine:
    """Steps of the Gram-form solve in plain PyTorch (the ``torch`` backend's ``gram_solve``)."""

    def __init__(self, quad: Quadratic, plan: ConstraintPlan, cfg: SolverConfig):
        self.full_quad = self.quad = quad
        self.plan, self.cfg = plan, cfg
        self.W = quad.anchor * plan.mask  # masked coordinates start (and stay) at zero
        self.opt = _Optimizer(cfg, self.W)
        self.cols: torch.Tensor | None = None  # kept columns once compacted
        self.prev: torch.Tensor | None = None
        self.two_s = 2.0 * quad.scale
        self._mask_all = bool(plan.mask.all())

    # -- what the loop needs to know
    @property
    def row_loss(self):
        return self.quad.row_values

    @property
    def weight_cols(self) -> int:
        """Grid columns of the (possibly compacted) weight: a fitted bias column excluded."""
        g = self.plan.geometry
        return g.cols if self.cols is None else int((self.cols < g.cols).sum())

    def compact(self) -> None:
        """Go on with the kept columns only (a final channel mask, nothing else that moves)."""
        if self.cols is not None or not self.plan.compactable:
            return
        self.cols = torch.nonzero(self.plan.mask[0, 0]).flatten()
        self._restrict(self.cols)

    def _restrict(self, cols: torch.Tensor) -> None:
        self.quad = self.full_quad.restrict(cols)
        self.W = self.W[..., cols].contiguous()
        self.opt.compact(cols)

    def run_steady(self, i: int, logged, history) -> int:
        return 0

    def _mask(self) -> torch.Tensor | None:
        return None if (self.cols is not None or self._mask_all) else self.plan.mask

    def effective(self, rows: slice = slice(None)) -> torch.Tensor:
        """The weight the loss sees (its output rows ``rows``): the quantized latent weight."""
        plan = self.plan
        if plan.quant is None:
            return self.W[:, rows]
        scale = plan.scale[:, rows] if plan.scale.shape[1] > 1 else plan.scale
        vals = plan.project(self.W[:, rows], scale, self.weight_cols)
        mask = self._mask()
        return vals if mask is None else vals * mask[:, rows]

    # -- one step
    def step(self, i: int, lr: float, want_value: bool, keep_previous: bool) -> torch.Tensor | None:
        q = self.quad
        if keep_previous:
            self.prev = self.W.clone()
        if q.H is None:
            return self._lowrank_step(lr, want_value)
        G, value = q.step_terms(self.effective() - q.anchor, self.two_s, want_value)
        self.opt.step(self.W, G, lr, self._mask())
        return value + q.f0.double() if want_value else None

    def _lowrank_step(self, lr: float, want_value: bool):
        """The step on the low-rank form a chunk of output rows at a time (a row's gradient
        depends on that row alone): a wide layer's step holds no temporary of the weight's
        size, its gradient included."""
        q = self.quad
        R, D = self.W.shape[1:]
        step = max(1, LOSS_CHUNK_ELEMENTS // D)
        value = q.f0.double() if want_value else None
        mask = self._mask()
        self.opt.t += 1
        for r0 in range(0, R, step):
            rows = slice(r0, r0 + step)
            G, part = q.step_terms(self.effective(rows) - q.anchor[:, rows], self.two_s, want_value, rows)
            if want_value:
                value = value + part
            self.opt.update(self.W, G, lr, mask, rows)
        return value

    def after_step(self, i: int, lr: float) -> None:
        if self.cols is None and self.plan.after_step(self.W, i, lr):
            self._mask_all = bool(self.plan.mask.all())

    def refit_scale(self) -> None:
        plan, q = self.plan, self.quad
        L, wc = plan.quant.levels, self.weight_cols
        if q.H is not None or not plan.quant.per_channel:
            plan.scale = q.best_scale(plan.codes(self.W, wc), L, plan.quant.per_channel, plan.scale, self.W)
            return
        # per-channel scales on the low-rank form: each row's own, a chunk of rows at a time
        scale = plan.scale.clone()
        step = max(1, LOSS_CHUNK_ELEMENTS // self.W.shape[-1])
        for r0 in range(0, self.W.shape[1], step):
            rows = slice(r0, r0 + step)
            W = self.W[:, rows]
            part = replace(q, anchor=q.anchor[:, rows], F=q.F[:, rows])
            scale[:, rows] = part.best_scale(plan.codes(W, wc, rows), L, True, plan.scale[:, rows], W)
        plan.scale = scale

    # -- the best iterate
    def snapshot(self):
        return self._hand_over_prev(), self.plan.scale.clone(), self.cols

    def _hand_over_prev(self) -> torch.Tensor:
        """The iterate before the last step, for keeps: handed over, not copied (the next
        tracked step copies ``W`` afresh), so a wide layer holds one such copy, not two."""
        prev, self.prev = self.prev, None
        return prev

    def restore(self, snap) -> None:
        self.W, self.plan.scale, self.cols = snap

    def result(self, history):
        """``(W, history)`` with ``W`` scattered back to every column of the layer."""
        W = self.W
        if self.cols is not None:
            full = torch.zeros_like(self.full_quad.anchor)
            full[..., self.cols] = W
            W = full
        return W, [(s, self.full_quad.scale * float(v)) for s, v in history]


def gram_iterative(quad: Quadratic, plan: ConstraintPlan, cfg: SolverConfig):
    """Adam / SGD on the Gram-form quadratic, in PyTorch. Returns ``(W_latent, history)``."""
    return run_iterative(TorchGramEngine(quad, plan, cfg), plan, cfg)


# ------------------------------------------------------------------ data form
class DataEngine:
    """Steps of the data-form solve: ``loss_fn(W_matrix, batch_index)`` is differentiable
    in ``W`` (the ``data_loss_grad`` op of any backend), cycled over the batches."""

    row_loss = None  # the data form has no per-row quadratic: scales by rounding error

    def __init__(self, loss_fn, anchor: torch.Tensor, plan: ConstraintPlan, cfg: SolverConfig,
                 num_batches: int):
        self.loss_fn, self.plan, self.cfg, self.num_batches = loss_fn, plan, cfg, num_batches
        self.W = anchor * plan.mask
        self.opt = _Optimizer(cfg, self.W)
        self.prev: torch.Tensor | None = None

    def compact(self) -> None:
        pass

    def run_steady(self, i: int, logged, history) -> int:
        return 0

    def step(self, i: int, lr: float, want_value: bool, keep_previous: bool) -> torch.Tensor:
        plan = self.plan
        We = plan.effective(self.W).detach().requires_grad_(True)
        loss = self.loss_fn(We, i % self.num_batches)
        (grad,) = torch.autograd.grad(loss, We)
        if keep_previous:
            self.prev = self.W.clone()
        self.opt.step(self.W, grad, lr, None if plan.mask.all() else plan.mask)
        return loss.detach()

    def after_step(self, i: int, lr: float) -> None:
        self.plan.after_step(self.W, i, lr)

    def refit_scale(self) -> None:
        pass  # no closed form on raw features: the grid keeps the scale init_scale chose

    def snapshot(self):
        return self.prev.clone()

    def restore(self, snap) -> None:
        self.W = snap

    def result(self, history):
        return self.W, [(s, float(v)) for s, v in history]


def data_iterative(loss_fn, anchor: torch.Tensor, plan: ConstraintPlan, cfg: SolverConfig,
                   num_batches: int):
    """Adam / SGD on the data form. Returns ``(W_latent, history)``."""
    return run_iterative(DataEngine(loss_fn, anchor, plan, cfg, num_batches), plan, cfg)
