r"""``loss="auto"``: each layer chooses how much to cross from a held-out split of its samples.

Crossing (``cross``) trades fidelity to the teacher's target for robustness when a
layer sees too few sampled rows to pin its weights down; plain layer-wise
distillation (``nc``) fits the target exactly. Which is better depends on the layer
(the study in ``docs/RESULTS.md``: crossing lowers held-out drift in every conv with
``M/D < 2`` and in almost none with ``M/D ≥ 2``), and the library can measure it:

* the samples are dealt round-robin into ``F`` folds, each with its own
  :class:`~cdfast.layer.statistics.LayerStatistics` (:class:`FoldedStatistics`);
* for every candidate loss and every fold ``f``, the layer is solved on the other
  folds' statistics and scored on fold ``f``. :func:`cdfast.compress` scores it by the
  whole model's output error on the fold's samples (the candidate written into the
  student, the layers after it still the teacher's), which sees what a layer's choice
  does downstream; :func:`cdfast.distill_layer` alone, which has no model, by the
  ``nc`` loss — the student's output on its own input against the teacher's on the
  teacher's input, which is what the next layer will see;
* the prior (:func:`rule_of_thumb`) is the study's rule — ``cross``, μ = 0.9, where
  ``M/D < 2``, else ``nc`` — and ``nc`` for a quantized layer; the candidate with the
  lowest summed held-out score replaces it only when it wins by more than one standard
  error of the paired per-fold differences (:func:`choose_loss`), and the choice is
  solved on all the samples.

Why the model's output: on VGG at K = 1 each layer's own held-out ``nc`` loss preferred
μ = 0.5 in three middle convs by 3.8–12 standard errors, and the network lost 2.5
points; scored by the output, ``auto`` is within 0.2 points of the better of ``nc``
and ``cross`` in all 16 cells of the grid in ``docs/RESULTS.md`` (three draws each).

In the Gram form a fold's statistics are just a sum over its samples, so the split
costs no extra pass over the data, only ``F`` times the memory of one set of Grams
and ``F × candidates`` solves (scored by the output, as many forwards of one fold;
``F = 5``: on synthetic layers with 24–400 rows, the choice's held-out error was within
3.8 % of the better of ``nc`` and ``cross`` in 12 of 12 cases, against 25 % in one case
with 3 folds). With fewer than two samples, or an iterative solver (whose solves are
too slow to repeat), the layer falls back to the prior.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .geometry import LayerGeometry
from .losses import LossSpec, Quadratic
from .statistics import LayerStatistics

__all__ = ["AUTO_CANDIDATES", "FoldedStatistics", "LossChoice", "candidate", "choose_loss", "prefer_prior", "rule_of_thumb"]

#: The losses ``loss="auto"`` chooses among: plain layer-wise distillation and crossing
#: with decreasing weight on the correction term.
AUTO_CANDIDATES = (LossSpec("nc"), LossSpec("cross", mu=0.9), LossSpec("cross", mu=0.7), LossSpec("cross", mu=0.5))

#: Below this many rows per weight column the study found crossing to help.
CROSSING_BELOW_M_OVER_D = 2.0


def describe(spec: LossSpec) -> str:
    return "nc" if spec.name == "nc" else f"{spec.name}(mu={spec.mu:g})"


@dataclass
class LossChoice:
    """What ``loss="auto"`` chose for a layer, and why."""

    chosen: str
    rule: str                                    # "held-out", "M/D …" or "quantized"
    scores: dict = field(default_factory=dict)   # candidate → summed held-out score
    why: str = ""                                # what decided between the prior and the folds
    criterion: str = "nc loss"                   # what the folds scored: "nc loss" or "output error"

    def __str__(self) -> str:
        if self.rule == "held-out":
            ranked = ", ".join(f"{k} {v:.4g}" for k, v in sorted(self.scores.items(), key=lambda kv: kv[1]))
            return f"{self.chosen} ({self.why}; held-out {self.criterion} over folds: {ranked})"
        return f"{self.chosen} ({self.rule})"


class FoldedStatistics:
    """:class:`LayerStatistics` of ``folds`` disjoint sets of samples, dealt round-robin.

    Use it like :class:`LayerStatistics` (``update``, ``all_reduce``); :meth:`total`
    gives the statistics of all samples, :meth:`without` those of all folds but one.
    With ``period=N`` the samples are views of ``N`` images, view-major (sample ``s``
    is a view of image ``s mod N``, :func:`cdfast.model.augment.views`): the fold is
    dealt by image, so every view of an image falls in the same fold
    (:meth:`fold_of`).

    ``score(W, f)``, if given, is how :func:`choose_loss` scores a candidate solved
    without fold ``f`` on that fold (lower is better); by default, the ``nc`` loss of
    the fold's statistics. :func:`cdfast.compress` passes the model's output error on
    the fold's samples, which sees what a layer's choice does downstream.
    """

    def __init__(self, layer, folds: int = 3, period: int | None = None,
                 score: Callable[[torch.Tensor, int], float] | None = None, **kwargs):
        if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
            raise ValueError(f"folds: expected an int >= 2, got {folds!r}")
        if period is not None and (isinstance(period, bool) or not isinstance(period, int) or period < folds):
            raise ValueError(f"period: expected None or an int >= folds ({folds}), got {period!r}")
        self.parts = [LayerStatistics(layer, **kwargs) for _ in range(folds)]
        self.geometry: LayerGeometry = self.parts[0].geometry
        self.period = period
        self.score = score
        self._dealt = 0

    @property
    def samples(self) -> int:
        return sum(p.samples for p in self.parts)

    @staticmethod
    def fold_of(sample: torch.Tensor, folds: int, period: int | None = None) -> torch.Tensor:
        """The fold of each sample index (view-major samples of ``period`` images: by image)."""
        return (sample % period if period else sample) % folds

    def update(self, h_teacher: torch.Tensor, h_student: torch.Tensor) -> "FoldedStatistics":
        F = len(self.parts)
        order = self.fold_of(torch.arange(h_teacher.shape[0]) + self._dealt, F, self.period)
        for f in range(F):
            idx = torch.nonzero(order == f).flatten()
            if idx.numel():
                self.parts[f].update(h_teacher[idx.to(h_teacher.device)], h_student[idx.to(h_student.device)])
        self._dealt += h_teacher.shape[0]
        return self

    def update_many(self, batches) -> "FoldedStatistics":
        for h_t, h_s in batches:
            self.update(h_t, h_s)
        return self

    def all_reduce(self, group=None) -> "FoldedStatistics":
        for p in self.parts:
            p.all_reduce(group)
        return self

    def _sum(self, parts: list[LayerStatistics]) -> LayerStatistics:
        parts = [p for p in parts if p.rows > 0]
        out = LayerStatistics(self.geometry, dtype=max((p.dtype for p in parts), key=lambda d: d.itemsize),
                              fit_bias=self.parts[0].fit_bias, backend=self.parts[0].backend)
        for p in parts:
            out.add(p)
        return out

    def total(self) -> LayerStatistics:
        return self._sum(self.parts)

    def without(self, f: int) -> LayerStatistics:
        return self._sum([p for i, p in enumerate(self.parts) if i != f])


def rule_of_thumb(rows: int, cols: int, quantized: bool = False) -> LossChoice:
    """The prior of ``loss="auto"``: ``cross`` (μ = 0.9) where a layer has fewer than 2
    sampled rows per weight column, else ``nc``; ``nc`` for a quantized layer.

    The rows-per-column rule is the study's (channel pruning: crossing lowers held-out
    drift in every conv with ``M/D < 2``). At 2 bits crossing lost to ``nc`` at every K
    of the grid (1.5–2.7 points on ResNet-20) and tied at 4 bits, so a quantized layer
    starts from ``nc``; the held-out folds may still move either away from its prior.
    """
    if quantized:
        return LossChoice(describe(AUTO_CANDIDATES[0]), "quantized")
    ratio = rows / cols
    chosen = describe(AUTO_CANDIDATES[1] if ratio < CROSSING_BELOW_M_OVER_D else AUTO_CANDIDATES[0])
    return LossChoice(chosen, f"M/D = {ratio:.3g} {'<' if ratio < CROSSING_BELOW_M_OVER_D else '>='} 2")


def candidate(name: str) -> LossSpec:
    """The :data:`AUTO_CANDIDATES` entry called ``name`` (:func:`describe`)."""
    return next(s for s in AUTO_CANDIDATES if describe(s) == name)


def choose_loss(folded: FoldedStatistics, anchor: torch.Tensor, solve, dtype: torch.dtype,
                damping: float, quantized: bool = False) -> tuple[LossSpec, LossChoice]:
    """The prior (:func:`rule_of_thumb`) unless the held-out folds clearly prefer another.

    Every candidate is solved on all folds but ``f`` and scored on fold ``f`` by
    ``folded.score`` (in :func:`cdfast.compress`: the model's output error) or, without
    one, by the fold's ``nc`` loss. With ``d_f`` the score of the prior minus that of
    the best candidate on fold ``f``, the best replaces the prior only if
    ``mean(d) > SE(d) = std(d)/√F``: the one-standard-error rule of cross-validation,
    paired over the folds. Folds of one or two images are noisy (on VGG at K = 1 the
    plain minimum of the output error lost 0.8 points to this rule over three draws);
    the rule keeps the prior unless the evidence beats the fold-to-fold spread.

    ``solve(quad) -> W`` solves one quadratic under the layer's constraints (a fresh
    plan each time). Folds without samples are skipped.
    """
    held = [f for f, p in enumerate(folded.parts) if p.rows > 0]
    per_fold: dict[str, list[float]] = {}
    for spec in AUTO_CANDIDATES:
        losses = []
        for f in held:
            train = folded.without(f)
            W = solve(Quadratic.from_statistics(train, spec, anchor, dtype=dtype, damping=damping))
            if folded.score is not None:
                losses.append(float(folded.score(W, f)))
            else:
                test = Quadratic.from_statistics(folded.parts[f], LossSpec("nc"), anchor, dtype=dtype,
                                                 damping=damping)
                losses.append(float(test.loss(W)) * folded.parts[f].rows)  # weight folds by their rows
        per_fold[describe(spec)] = losses
    prior = rule_of_thumb(sum(p.rows for p in folded.parts), folded.parts[0].dim, quantized)
    name, why = prefer_prior(per_fold, prior)
    criterion = "output error" if folded.score is not None else "nc loss"
    return candidate(name), LossChoice(name, "held-out", {k: sum(v) for k, v in per_fold.items()}, why, criterion)


def prefer_prior(per_fold: dict[str, list[float]], prior: LossChoice) -> tuple[str, str]:
    """The paired one-standard-error rule of :func:`choose_loss` on per-fold held-out losses.

    Returns the chosen candidate's name and why. The candidate with the lowest summed
    loss replaces ``prior.chosen`` only if the mean of the per-fold differences exceeds
    their standard error.
    """
    best = min(per_fold, key=lambda k: sum(per_fold[k]))
    if best == prior.chosen:
        return best, prior.rule
    d = torch.tensor(per_fold[prior.chosen], dtype=torch.float64) - torch.tensor(per_fold[best], dtype=torch.float64)
    se = float(d.std()) / math.sqrt(len(d)) if len(d) > 1 else math.inf
    if float(d.mean()) > se:
        return best, f"beats the prior {prior.chosen} by {float(d.mean()) / max(se, 1e-300):.2g} standard errors"
    return prior.chosen, f"{prior.rule}; {best} is within one standard error over the folds"
