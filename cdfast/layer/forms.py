r"""Which form of the quadratic a solve runs on, chosen by counted cost (and memory).

For the linear objective the loss ``s·[tr(ΔHΔᵀ) + 2tr(ΔFᵀ) + f₀]`` can be evaluated two ways:

* **gram** — ``H`` formed once (``2·K·D²`` multiply-adds over the ``K`` rows of all loss
  terms), then every step is one ``R × D`` by ``D × D`` product: ``2·R·D²``;
* **lowrank** — ``H = Z·Zᵀ`` kept as the unfolded inputs ``Z`` (``D × K``): a step is
  ``(Δ·Z)·Zᵀ``, ``4·R·D·K``, and nothing is formed. This is the authors' data form
  without its convolutions (the inputs are unfolded once), so it is never slower than
  the reference, and it needs ``D·K`` numbers where the Grams need ``D²``.

When fewer rows than columns are sampled (``M < D``, the few-shot regime) the statistics
keep the unfolded inputs (:class:`~cdfast.layer.statistics.LayerStatistics`) and
:func:`choose_form` compares the two costs over the solve's schedule (the channel
budget's compacted steps included). With ``M ≥ D`` only the Grams exist, and they win.
The exact solver forms ``H`` for its sweeps; :func:`exact_fits` says whether its ``D × D``
work fits in memory. Where it does not, channel budgets and channel supports are solved on
the factor instead (:mod:`cdfast.layer.solvers.woodbury`, ``H`` never formed).
"""
from __future__ import annotations

__all__ = ["form_costs", "choose_form", "exact_fits", "EXACT_MAX_BYTES"]

#: The exact solver holds about four ``D × D`` float64 matrices per group (``H``, its
#: factor or inverse, and working copies); ``solver="auto"`` picks it only when they fit
#: in this many bytes. Above it (a 25,088-input Linear would need 20 GB), channel budgets
#: are solved exactly on the low-rank factor and other constraints by Adam on the low-rank
#: form, in the memory of a few copies of the weight and the unfolded inputs.
EXACT_MAX_BYTES = 4 << 30


def _step_widths(plan) -> tuple[int, int, int]:
    """``(steps at full width, steps after compaction, kept columns)`` of an iterative solve."""
    full, cols = plan.steps, plan.cols
    if plan.compactable:
        full = min(plan.steps, plan.schedule.final_from)
        geo = plan.geometry
        if plan.channel is not None:
            kept = plan.target_channels * geo.taps
        else:  # a FixedSupport's channels: the same columns in every row (one group)
            kept = int(plan.mask[0, 0, :geo.cols].sum())
        kept += plan.cols - geo.cols
        return full, plan.steps - full, kept
    return full, 0, cols


def form_costs(plan, rows_per_group: int, factor_rows: int) -> dict[str, float]:
    """Counted multiply-adds of an iterative solve on each form.

    ``rows_per_group`` is ``R = C_out/G``; ``factor_rows`` is ``K``, the columns of the
    low-rank factor (the sampled rows ``M`` times the loss terms that see distinct inputs).
    """
    G, D, R, K = plan.geometry.groups, plan.cols, rows_per_group, factor_rows
    full, rest, kept = _step_widths(plan)
    gram = 2.0 * K * D * D + full * 2.0 * R * D * D + rest * 2.0 * R * kept * kept
    lowrank = full * 4.0 * R * D * K + rest * 4.0 * R * kept * K
    return {"gram": G * gram, "lowrank": G * lowrank}


def choose_form(stats, spec, plan, rows_per_group: int) -> str:
    """``"lowrank"`` when the statistics hold the unfolded inputs and a solve on them
    counts fewer operations than forming ``H`` and stepping on it; else ``"gram"``."""
    if stats.representation != "lowrank":
        return "gram"
    distinct = 1 if not stats.has_error else len(spec.terms)
    costs = form_costs(plan, rows_per_group, distinct * stats.rows)
    return "lowrank" if costs["lowrank"] < costs["gram"] else "gram"


def exact_fits(geometry, cols: int) -> bool:
    """Whether the exact solver's ``D × D`` work fits in :data:`EXACT_MAX_BYTES`."""
    return 4 * 8 * geometry.groups * cols * cols <= EXACT_MAX_BYTES
