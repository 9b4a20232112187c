"""``distill_layer``: compress one layer by cross distillation."""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Iterable

import torch
import torch.nn as nn

from .. import dispatch
from .._validation import (all_finite, check_bool, check_dtype, check_finite_module, check_nonneg_float, check_pair,
                           check_positive_float, check_positive_int, check_unit_interval)
from .geometry import LayerGeometry
from .data_form import data_loss
from .forms import choose_form, exact_fits
from .losses import LOSS_CHUNK_ELEMENTS, ActivationSpec, LossSpec, Quadratic
from .constraints import NMSparsity, WeightPrune, normalize
from .plan import ConstraintPlan
from .selection import FoldedStatistics, LossChoice, candidate, choose_loss, describe, rule_of_thumb
from .solvers import SOLVERS, SolverConfig, data_iterative, exact_solve, gram_iterative, woodbury
from .statistics import LayerStatistics

__all__ = ["distill_layer", "DistillResult", "check_arguments"]

FORMS = ("auto", "gram", "lowrank", "data")
AUTO_FOLDS = 5  # held-out folds of loss="auto"
ITERATIVE = ("adam", "sgd")


@dataclass
class DistillResult:
    """What :func:`distill_layer` returns.

    Attributes:
        weight: the student weight, the teacher's shape and dtype; exact zeros where
            pruned, dequantized grid values where quantized.
        bias: the student bias (the teacher's unless ``fit_bias``), or None.
        mask: boolean, the weight's shape: True where a weight may be non-zero.
        kept_channels: indices of the kept input channels (channel pruning), else None.
        codes: int8 grid codes in ``[−L, L]`` (quantization), else None.
        scale: grid scale, ``weight = codes·scale/L``: shape ``(C_out,)`` per channel
            or ``()`` per layer; None without quantization.
        bits: bit width, or None.
        loss_before: the chosen loss at the teacher's weight compressed naively with the
            same mask (and rounded to the same grid): what the layer loses without
            distillation.
        loss_after: the chosen loss at ``weight``.
        loss_teacher: the chosen loss at the uncompressed teacher weight (0 for
            ``correction``/``imitation``/``cross``, whose terms compare like inputs).
        history: ``(step, loss)`` pairs during the solve.
        wall_time: seconds spent in ``distill_layer`` (statistics included).
        solver, form, backend: what ran (``adam``/``sgd``/``exact``/``none``; ``gram`` (the ``D × D``
            statistics), ``lowrank`` (the unfolded inputs kept instead, :mod:`cdfast.layer.forms`)
            or ``data``; ``torch``/``triton``/``cuda``/``cpp``).
        note: what the library did beyond the solve, if anything (e.g. that the naive
            compression was returned because the solve ended above it).
        loss: the loss that was minimised (``"nc"``, ``"cross(mu=0.9)"`` …).
        loss_choice: with ``loss="auto"``, what was chosen and why (a :class:`LossChoice`).
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    mask: torch.Tensor
    kept_channels: torch.Tensor | None
    codes: torch.Tensor | None
    scale: torch.Tensor | None
    bits: int | None
    loss_before: float
    loss_after: float
    loss_teacher: float
    history: list = field(repr=False)
    wall_time: float
    solver: str
    form: str
    backend: str
    steps: int
    note: str = ""
    loss: str = ""
    loss_choice: LossChoice | None = None

    @property
    def sparsity(self) -> float:
        """Fraction of weights that are exactly zero."""
        return float((self.weight == 0).float().mean())

    def apply_to(self, layer: nn.Module) -> nn.Module:
        """Copy the result into ``layer`` (a Conv2d/Linear of the teacher's shape).

        A bias fitted for a layer that has none (``fit_bias=True``) is added to the layer
        as a new parameter, so the layer computes exactly what ``loss_after`` measured.
        """
        if not isinstance(layer, (nn.Conv2d, nn.Linear)):
            raise TypeError(f"layer: expected nn.Conv2d or nn.Linear, got {type(layer).__name__}")
        if tuple(layer.weight.shape) != tuple(self.weight.shape):
            raise ValueError(f"layer: expected a weight of shape {tuple(self.weight.shape)}, "
                             f"got {tuple(layer.weight.shape)}")
        with torch.no_grad():
            layer.weight.copy_(self.weight)
            if self.bias is not None:
                if layer.bias is None:
                    layer.bias = nn.Parameter(self.bias.to(layer.weight).clone(),
                                              requires_grad=layer.weight.requires_grad)
                else:
                    layer.bias.copy_(self.bias)
        return layer


def _activation(activation) -> ActivationSpec | None:
    if activation is None or isinstance(activation, ActivationSpec):
        return activation
    if isinstance(activation, nn.modules.batchnorm._BatchNorm):
        return ActivationSpec.from_batchnorm(activation)
    raise TypeError(f"activation: expected None, a BatchNorm module or ActivationSpec, "
                    f"got {type(activation).__name__}")


def _collect_batches(h_teacher, h_student, batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if batches is not None:
        if h_teacher is not None or h_student is not None:
            raise ValueError("batches: pass either h_teacher/h_student or batches, not both")
        pairs = []
        for item in batches:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TypeError("batches: expected an iterable of (h_teacher, h_student) pairs")
            pairs.append((item[0], item[1]))
        if not pairs:
            raise ValueError("batches: expected at least one (h_teacher, h_student) pair, got none")
        return pairs
    if h_teacher is None or h_student is None:
        raise ValueError("h_teacher, h_student: both inputs are required (or pass batches=)")
    return [(h_teacher, h_student)]


def check_arguments(*, loss="cross", mu=0.6, alpha=0.5, beta=0.5, objective="linear", activation=None,
                    solver="auto", form="auto", steps=3000, lr=5e-4, momentum=0.9, log_every=0, damping=1e-6,
                    stats_dtype=torch.float32, fit_bias=False, strict=None, backend="auto",
                    compression=None) -> LossSpec:
    """Check :func:`distill_layer`'s settings (not its tensors), each error naming its argument;
    returns the :class:`LossSpec` (``nc`` standing in for ``loss="auto"``). :func:`cdfast.compress`
    calls it before any work, so a bad setting never fails after minutes of solving."""
    if not (isinstance(loss, str) and loss == "auto"):
        LossSpec(loss, mu, alpha, beta, objective)  # validates loss, mu, alpha, beta, objective
    spec = LossSpec("nc" if loss == "auto" else loss, mu, alpha, beta, objective, _activation(activation))
    if not isinstance(solver, str) or solver not in SOLVERS + ("auto",):
        raise ValueError(f"solver: expected 'auto' or one of {SOLVERS}, got {solver!r}")
    if not isinstance(form, str) or form not in FORMS:
        raise ValueError(f"form: expected one of {FORMS}, got {form!r}")
    if not isinstance(backend, str) or backend not in ("auto",) + dispatch.BACKENDS:
        raise ValueError(f"backend: expected 'auto' or one of {dispatch.BACKENDS}, got {backend!r}")
    check_positive_int("steps", steps)
    check_positive_float("lr", lr)
    check_unit_interval("momentum", momentum)
    check_positive_int("log_every", log_every, minimum=0)
    check_nonneg_float("damping", damping)
    check_dtype("stats_dtype", stats_dtype)
    check_bool("fit_bias", fit_bias)
    check_bool("strict", strict, allow_none=True)
    normalize(compression)
    return spec


def distill_layer(teacher_layer: nn.Module,
                  h_teacher: torch.Tensor | None = None,
                  h_student: torch.Tensor | None = None,
                  *,
                  batches: Iterable[tuple[torch.Tensor, torch.Tensor]] | None = None,
                  statistics: LayerStatistics | None = None,
                  loss: str = "cross",
                  mu: float = 0.6,
                  alpha: float = 0.5,
                  beta: float = 0.5,
                  objective: str = "linear",
                  activation: nn.Module | ActivationSpec | None = None,
                  compression=None,
                  solver: str = "auto",
                  steps: int = 3000,
                  lr: float = 5e-4,
                  momentum: float = 0.9,
                  form: str = "auto",
                  fit_bias: bool = False,
                  stats_dtype: torch.dtype = torch.float32,
                  damping: float = 1e-6,
                  backend: str = "auto",
                  strict: bool | None = None,
                  log_every: int = 0) -> DistillResult:
    r"""Fit one compressed layer to its teacher by cross distillation (SPEC §2–§4).

    Minimises the chosen loss of the family over the student weight ``W``,
    starting from the teacher's weight, under ``compression``.

    Args:
        teacher_layer: ``nn.Conv2d`` (any stride, padding, dilation, groups) or
            ``nn.Linear``; read, never modified.
        h_teacher: the layer's input in the teacher, ``N×C×H×W`` or ``N×F``.
        h_student: the same samples' input in the (partly compressed) student.
        batches: instead of the two tensors, an iterable of ``(h_teacher, h_student)``
            batches: streamed into the statistics (Gram form) or cycled through one
            per step (data form).
        statistics: a filled :class:`LayerStatistics` instead of inputs (Gram form).
        loss: ``"nc"``, ``"correction"``, ``"imitation"``, ``"cross"``, ``"soft"``, or ``"auto"``:
            ``cross`` μ = 0.9 where ``M/D < 2``, else ``nc``, unless the held-out ``nc`` loss
            over 5 folds of its samples (exact solver) shows another of ``nc``, ``cross``
            μ = 0.9, 0.7, 0.5 better by more than one standard error; ``result.loss_choice``
            says what and why
            (:mod:`cdfast.layer.selection`).
        mu: μ of ``cross``; alpha, beta: α, β of ``soft`` (all in [0, 1]).
        objective: ``"linear"`` (raw outputs, default) or ``"activation"`` (σ on both sides).
        activation: σ of the activation objective: a following BatchNorm (folded) or an
            :class:`ActivationSpec`; a plain ReLU when None.
        compression: a constraint of :mod:`cdfast.layer.constraints` or a list of them.
        solver: ``"exact"`` (the quadratic solved directly), ``"adam"`` (the authors'
            procedure), ``"sgd"`` (momentum), or ``"auto"`` (default): ``exact`` on the
            Gram form (on the low-rank factor for channel budgets where the ``D × D`` work
            would not fit, ``result.form == "lowrank"``), except for weight and N:M budgets
            (there Adam's 3000 steps end lower than the exact solver's sweeps, at a few
            hundred times their time: a 768→768 Linear at 50 %, held-out error 2.2e-3 against
            3.3e-3, ``bench/posttraining.py --adam``), ``adam`` on the data form.
            ``result.solver`` says which ran; ``"none"`` when nothing was to be done (no
            compression and a teacher that is already optimal, loss 0).
        steps: iterations of ``adam``/``sgd`` (the authors use 3000 on CIFAR-sized data).
        lr: learning rate (5e-4 as the authors' VGG setting; 1e-3 for ResNet-56).
        form: ``"gram"`` (cost per step independent of N), ``"lowrank"`` (the unfolded
            inputs instead of the Grams, when there are fewer sampled rows than columns),
            ``"data"`` (convolutions), or ``"auto"``: for the linear objective the cheaper of
            Gram and low-rank by counted cost (:mod:`cdfast.layer.forms`), data for the
            activation objective.
        fit_bias: also fit the bias (else it stays the teacher's); a layer without a bias
            gets one (:meth:`DistillResult.apply_to` adds it to the layer).
        stats_dtype: accumulation dtype of the statistics (float32 or float64).
        damping: relative damping δ of ``H`` where it is inverted (see :mod:`cdfast.layer.losses`).
        backend: ``"auto"``, ``"torch"``, ``"cpp"``, ``"triton"`` or ``"cuda"``.
        strict: raise instead of falling back when ``backend`` cannot run.
        log_every: history interval in steps (0: about 100 points).

    Returns:
        A :class:`DistillResult`.
    """
    start = time.perf_counter()
    geometry = LayerGeometry.of(teacher_layer)
    spec = check_arguments(loss=loss, mu=mu, alpha=alpha, beta=beta, objective=objective, activation=activation,
                           solver=solver, form=form, steps=steps, lr=lr, momentum=momentum, log_every=log_every,
                           damping=damping, stats_dtype=stats_dtype, fit_bias=fit_bias, strict=strict,
                           backend=backend, compression=compression)
    auto_loss = loss == "auto"
    check_finite_module("teacher_layer", teacher_layer)
    choose = form == "auto"
    if form == "auto":
        form = "gram" if objective == "linear" else "data"
    if form in ("gram", "lowrank") and objective != "linear":
        raise ValueError(f"form: the {form} form needs objective='linear'; use form='data'")
    items = normalize(compression)
    if solver == "exact" and form != "gram" and not (form == "lowrank" and woodbury.takes(items)):
        raise ValueError("solver: 'exact' works on the Gram form (objective='linear', form='gram'), or on the "
                         "low-rank form for channel budgets and channel supports (no WeightPrune, NMSparsity, "
                         "Quantize or penalties)")

    A_weight = teacher_layer.weight.detach()
    A_bias = teacher_layer.bias.detach() if teacher_layer.bias is not None else None

    if statistics is not None:
        if form not in ("gram", "lowrank"):
            raise ValueError("statistics: precomputed statistics need form='gram' or 'lowrank'")
        if not isinstance(statistics, (LayerStatistics, FoldedStatistics)):
            raise TypeError(f"statistics: expected LayerStatistics, got {type(statistics).__name__}")
        if statistics.geometry != geometry:
            raise ValueError("statistics: were accumulated for a layer of another shape")
        pairs = []
        stats = statistics
        fit_bias = (stats.parts[0] if isinstance(stats, FoldedStatistics) else stats).fit_bias
    else:
        pairs = _collect_batches(h_teacher, h_student, batches)
        for h_t, h_s in pairs:
            if isinstance(h_t, torch.Tensor) and h_t.device != A_weight.device:
                raise ValueError(f"h_teacher: expected the teacher layer's device {A_weight.device}, "
                                 f"got {h_t.device}")
            check_pair(geometry, h_t, h_s)
        pairs = [(h_t.detach(), h_s.detach()) for h_t, h_s in pairs]
    if solver in ("auto", "exact") and form in ("gram", "lowrank"):
        solver, form = _exact_or_iterative(solver, form, choose, items, geometry, fit_bias, statistics, pairs)
    elif solver == "auto":
        solver = "adam"
    cfg = SolverConfig(solver=solver, steps=steps, lr=lr, momentum=momentum, log_every=log_every)
    device = A_weight.device
    work_dtype = torch.float64 if stats_dtype == torch.float64 else torch.float32
    if lr > torch.finfo(work_dtype).max:
        raise ValueError(f"lr: expected at most {torch.finfo(work_dtype).max:.3g} for {work_dtype} weights, got {lr:g}")
    anchor = geometry.weight_matrix(A_weight.to(work_dtype),
                                    A_bias.to(work_dtype) if (fit_bias and A_bias is not None) else None)
    if fit_bias and A_bias is None:
        anchor = torch.cat([anchor, torch.zeros_like(anchor[..., :1])], dim=-1)
    plan = ConstraintPlan(compression, geometry, steps, anchor.shape[-1], device, work_dtype, backend, strict)

    choice = None
    if form in ("gram", "lowrank"):
        if statistics is None:
            samples = sum(h_t.shape[0] for h_t, _ in pairs)
            if auto_loss and solver == "exact" and form == "gram" and samples >= 2:
                stats = FoldedStatistics(geometry, folds=min(AUTO_FOLDS, samples), dtype=stats_dtype,
                                         fit_bias=fit_bias, backend=backend)
            else:
                stats = LayerStatistics(geometry, dtype=stats_dtype, fit_bias=fit_bias, backend=backend)
            stats.update_many(pairs)
        if isinstance(stats, FoldedStatistics):
            folded, stats = stats, stats.total()
        else:
            folded = None
        if auto_loss:
            if folded is not None and solver == "exact":
                def solve_final(q: Quadratic) -> torch.Tensor:
                    p = ConstraintPlan(compression, geometry, steps, anchor.shape[-1], device, work_dtype, backend,
                                       strict)
                    return _finalize(exact_solve(q, p, backend, strict)[0], p, q)[0]

                best, choice = choose_loss(folded, anchor.to(stats.dtype), solve_final, work_dtype, damping,
                                           quantized=plan.quant is not None)
            else:
                choice = rule_of_thumb(stats.rows, stats.dim, plan.quant is not None)
                best = candidate(choice.chosen)
            spec = LossSpec(best.name, best.mu, alpha, beta, objective, spec.activation)
        if stats.dtype == torch.float64 and work_dtype != torch.float64:  # promoted for extreme inputs
            work_dtype = torch.float64
            anchor = anchor.double()
            plan = ConstraintPlan(compression, geometry, steps, anchor.shape[-1], device, work_dtype, backend,
                                  strict)
        # the low-rank form runs on torch: a Gram-form kernel the caller asked for (or the
        # device offers) keeps the Gram form
        if choose and solver != "exact" and dispatch.resolve("gram_solve", device, backend, strict)[0] == "torch":
            form = choose_form(stats, spec, plan, geometry.group_out)
        if form == "lowrank" and stats.representation != "lowrank":
            raise ValueError(f"form: 'lowrank' keeps the unfolded inputs, which needs fewer sampled rows "
                             f"than columns; got {stats.rows} rows for {stats.dim} columns")
        # the exact solver forms H itself; its loss values are cheaper on the factor
        lowrank = form == "lowrank" or solver == "exact"
        quad = Quadratic.from_statistics(stats, spec, anchor, dtype=work_dtype, damping=damping, lowrank=lowrank,
                                         unseen=solver == "exact")
        loss_teacher = float(quad.teacher_loss())
        if not plan.items and loss_teacher == 0.0:  # the teacher is already optimal: nothing to solve
            W, history, backend_used, solver = anchor.clone(), [(0, 0.0)], "torch", "none"
        elif solver == "exact":
            W, history = exact_solve(quad, plan, backend, strict, lowrank=form == "lowrank")
            backend_used = "torch"
        elif form == "lowrank":  # plain torch products on any device
            W, history = gram_iterative(quad, plan, cfg)
            backend_used = "torch"
        else:
            backend_used, (W, history) = dispatch.call("gram_solve", device, backend, strict, quad, plan, cfg)
        W_final, codes, scale = _finalize(W, plan, quad)
        if solver == "exact" and plan.quant is None:
            # W_final is the solver's W (its zeros already on the mask), whose loss the exact
            # solver has computed (for a sweep, from its whitened residual): no product with H
            loss_after = history[-1][1]
        else:
            loss_after = float(quad.loss(W_final))
        loss_before = _naive_loss(quad, anchor, plan)
        W_final, codes, scale, loss_after, note = _never_worse_than_naive(
            W_final, codes, scale, loss_after, loss_before, anchor, plan, solver,
            lambda: float(quad.loss(torch.zeros_like(anchor))))
    else:
        if auto_loss:
            choice = rule_of_thumb(sum(geometry.rows(h_t) for h_t, _ in pairs), anchor.shape[-1],
                                   plan.quant is not None)
            best = candidate(choice.chosen)
            spec = LossSpec(best.name, best.mu, alpha, beta, objective, spec.activation)
        used: list[str] = []  # backends that ran the data_loss_grad op
        data = [(h_t.to(work_dtype), h_s.to(work_dtype)) for h_t, h_s in pairs]
        _check_data_form_range(data, work_dtype)
        bias_const = None if fit_bias else (A_bias.to(work_dtype) if A_bias is not None else None)
        targets = [dispatch.call("data_targets", device, backend, strict, anchor, h_t, h_s, geometry, spec,
                                 bias_const)[1] for h_t, h_s in data]

        def loss_fn(Wm: torch.Tensor, b: int) -> torch.Tensor:
            return data_loss(Wm, *data[b], targets[b], geometry, spec, bias_const, backend, strict, used)

        def mean_loss(Wm: torch.Tensor) -> float:
            with torch.no_grad():
                return sum(float(loss_fn(Wm, b)) for b in range(len(data))) / len(data)

        loss_teacher = mean_loss(anchor)
        W, history = data_iterative(loss_fn, anchor, plan, cfg, len(data))
        W_final, codes, scale = _finalize(W, plan, None)
        loss_after = mean_loss(W_final)
        loss_before = mean_loss(_naive(anchor, plan))
        W_final, codes, scale, loss_after, note = _never_worse_than_naive(
            W_final, codes, scale, loss_after, loss_before, anchor, plan, solver,
            lambda: mean_loss(torch.zeros_like(anchor)))
        backend_used = used[0] if used else "torch"

    if not (all_finite(W_final) and math.isfinite(loss_after) and math.isfinite(loss_before)):
        raise FloatingPointError(f"distill_layer: the {solver} solve produced a non-finite result "
                                 f"(loss {loss_before} -> {loss_after}); please report this with the layer's shapes")
    weight, bias = geometry.weight_tensor(W_final)
    if bias is None:
        bias = A_bias.clone() if A_bias is not None else None
    mask_w, _ = geometry.weight_tensor(plan.mask.to(torch.uint8))
    out_dtype = A_weight.dtype
    if codes is not None:
        codes_t = codes.reshape(weight.shape)
        scale_out = scale.reshape(-1) if plan.quant.per_channel else scale.reshape(())
    else:
        codes_t, scale_out = None, None
    return DistillResult(
        weight=weight.to(out_dtype).contiguous(),
        bias=bias.to(out_dtype) if bias is not None else None,
        mask=mask_w.bool().contiguous(),
        kept_channels=plan.kept_channels(),
        codes=codes_t,
        scale=scale_out,
        bits=plan.quant.bits if plan.quant is not None else None,
        loss_before=loss_before,
        loss_after=loss_after,
        loss_teacher=loss_teacher,
        history=history,
        wall_time=time.perf_counter() - start,
        solver=solver,
        form=form,
        backend=backend_used,
        steps=steps if solver in ITERATIVE else 0,
        note=note,
        loss=describe(spec),
        loss_choice=choice,
    )


def _exact_or_iterative(solver, form, choose, items, geometry, fit_bias, statistics, pairs) -> tuple[str, str]:
    """``(solver, form)`` for ``solver`` ``"auto"`` or ``"exact"`` on the Gram or low-rank form.

    ``auto`` picks the exact solver where it runs: on ``H`` when its ``D × D`` work fits
    (:func:`~cdfast.layer.forms.exact_fits`) and there is no weight or N:M budget; on the factor
    of ``H`` (:mod:`.solvers.woodbury`) for channel budgets and channel supports when the
    samples have fewer rows than columns and either the form asked for is the low-rank one or
    ``H`` does not fit. Otherwise Adam. An explicit ``exact`` with ``form="auto"`` moves to the
    factor likewise when ``H`` does not fit."""
    given = statistics.parts[0] if isinstance(statistics, FoldedStatistics) else statistics
    dim = geometry.cols + int(fit_bias or (given is not None and given.fit_bias))
    fits = exact_fits(geometry, dim)
    if isinstance(statistics, LayerStatistics):
        few_rows = statistics.representation == "lowrank"
    else:  # a FoldedStatistics sums Grams of its folds; fresh inputs are kept while rows < columns
        few_rows = statistics is None and sum(geometry.rows(h_t) for h_t, _ in pairs) < dim
    on_factor = woodbury.takes(items) and few_rows and (form == "lowrank" or (choose and not fits))
    if on_factor:
        return "exact", "lowrank"
    if solver == "exact" or (form == "gram" and fits and
                             not any(isinstance(c, (WeightPrune, NMSparsity)) for c in items)):
        return "exact", form
    return "adam", form


def _check_data_form_range(data, dtype: torch.dtype) -> None:
    """The data form squares raw layer outputs: refuse inputs whose squares leave ``dtype``'s range."""
    if dtype != torch.float32:
        return
    m = max(float(torch.maximum(h_t.abs().max(), h_s.abs().max())) for h_t, h_s in data)
    if m > 2.0 ** 30 or 0 < m < 2.0 ** -30:
        raise ValueError(f"h_teacher: inputs of magnitude {m:.3g} overflow or underflow the data form's "
                         "float32 losses; use form='gram' (which rescales them) or stats_dtype=torch.float64")


def _never_worse_than_naive(W, codes, scale, loss_after, loss_before, anchor, plan, solver, energy):
    """An iterative solve can end above naive compression (too few steps, too large a step):
    return the naive weights then, and say so. Penalties trade loss for structure, so their
    loss may legitimately rise: they are left as solved. ``energy()`` is the loss of the
    zero weight (the teacher's output energy): when the excess is below 1e-9 of it, the
    two are equal up to rounding (a layer the teacher already fits), so the naive weights
    are returned without a warning."""
    if plan.penalties or not loss_after > loss_before * (1 + 1e-9) + 1e-300:
        return W, codes, scale, loss_after, ""
    naive = _naive(anchor, plan)
    naive_codes = plan.codes(anchor * plan.mask) * plan.mask[..., :plan.geometry.cols] if plan.quant else None
    if loss_after - loss_before <= 1e-9 * abs(energy()):
        return naive, naive_codes, plan.scale, loss_before, ""
    note = (f"the {solver} solve ended above naive compression (loss {loss_after:.6g} > {loss_before:.6g}); "
            "the naive compression is returned")
    warnings.warn(f"cdfast: {note}", RuntimeWarning, stacklevel=3)
    return naive, naive_codes, plan.scale, loss_before, note


def _naive(anchor: torch.Tensor, plan: ConstraintPlan, rows: slice = slice(None)) -> torch.Tensor:
    """The teacher weight under the result's mask and grid, without any refit (its output rows ``rows``)."""
    W = anchor[:, rows] * plan.mask[:, rows]
    return plan.effective(W, rows) if plan.quant is not None else W


def _naive_loss(quad: Quadratic, anchor: torch.Tensor, plan: ConstraintPlan) -> float:
    """``L`` of :func:`_naive`; on the low-rank form a chunk of output rows at a time, so that a
    wide layer's naive weight (and its rounding's temporaries) is never whole."""
    if quad.H is not None:
        return float(quad.loss(_naive(anchor, plan)))
    R, D = anchor.shape[1:]
    step = max(1, LOSS_CHUNK_ELEMENTS // D)
    total = quad.scale * quad.f0.double()
    for r0 in range(0, R, step):
        rows = slice(r0, r0 + step)
        part = replace(quad, anchor=quad.anchor[:, rows], F=quad.F[:, rows], f0=torch.zeros_like(quad.f0))
        total = total + part.loss(_naive(anchor, plan, rows))
    return float(total)


def _finalize(W: torch.Tensor, plan: ConstraintPlan, quad: Quadratic | None):
    """Project the latent weight (the solver's, masked in place: a wide layer's weight is
    not copied): mask, then codes and (Gram form) a closed-form scale."""
    W = W.masked_fill_(plan.mask.logical_not(), 0)
    if plan.quant is None:
        return W, None, None
    wc = plan.geometry.cols
    codes = plan.codes(W)
    free = W[..., wc:]  # a fitted bias: not on the grid
    if quad is not None:  # the closed-form scale (and bias) for these codes
        plan.scale, free = quad.refit_grid(codes, plan.quant.levels, plan.quant.per_channel, plan.scale, W)
    L = plan.quant.levels
    vals = codes.to(W.dtype) * (plan.scale / L)
    W = torch.cat([vals, free.to(W.dtype)], dim=-1) if W.shape[-1] > wc else vals
    return W * plan.mask, codes * plan.mask[..., :wc], plan.scale
