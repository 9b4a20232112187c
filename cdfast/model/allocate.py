r"""``compress(target=...)``: a parameter or FLOP budget for the whole model, spent unevenly.

A uniform ``ChannelPrune(keep)`` removes the same fraction of every channel group, but
groups are not equally cheap to shrink: removing a channel from one group may cost its
consumers a tenth of their output energy, from another a thousandth. Given a budget
``B`` (parameters or FLOPs of the student), the kept channels ``k_g`` of every group
``g`` are chosen to

    minimise  Σ_g E_g(k_g)   subject to   cost(k) ≤ B,

with ``E_g(k)`` the relative output error of ``g``'s consumers when ``g`` keeps ``k``
units: the cumulative greedy optimal-brain-surgeon cost of removing ``n_g − k`` units
(:func:`cdfast.layer.solvers.select_shared_channels` records each removal's cost), each
consumer's error divided by its output energy, measured on the teacher's own features
(the student does not exist yet). The model's count is exact in the removed units (:class:`ModelCount`: linear in each
group, bilinear in the two groups a layer sits between).

The problem is solved by its Lagrangian: for a price ``λ`` each group independently
keeps ``argmin_k E_g(k) + λ·c_g·k``, an allocation optimal for the count it spends
whatever the shape of the curves (Everett, 1963); ``λ`` is bisected to the highest
price that stays within the budget's removals, and the rest is removed greedily, one
step at a time where it adds the least error per count (a curve's linear stretch makes
the Lagrangian jump past the budget). No group keeps fewer than :data:`MIN_KEEP` of its
units.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from .counting import count_flops, count_parameters
from .graph import ChannelGroup, ModelGraph

__all__ = ["Allocation", "ModelCount", "allocate_keep", "check_target", "unit_steps", "MIN_KEEP"]

#: Least fraction of its units a group keeps under a budget (a layer reduced to a handful
#: of channels is more fragile than its curve on the teacher's features says).
MIN_KEEP = 0.125


def check_target(target) -> None:
    """``target``: ``None``, ``"params"``/``"flops"`` (the uniform plan's count, spent
    unevenly) or ``{"params" or "flops": count}`` (an int, or a float in (0, 1]: a fraction
    of the teacher's count)."""
    if target is None or target in ("params", "flops"):
        return
    if isinstance(target, dict) and len(target) == 1:
        (kind, value), = target.items()
        if kind in ("params", "flops") and not isinstance(value, bool):
            if isinstance(value, int) and value > 0:
                return
            if isinstance(value, float) and 0.0 < value <= 1.0:
                return
    raise ValueError(f"target: expected None, 'params', 'flops', or {{'params' or 'flops': a count (int > 0) or "
                     f"a fraction of the teacher's (float in (0, 1])}}, got {target!r}")


@dataclass
class Allocation:
    """What a budget allocation chose: kept units per group root and what it costs."""

    kind: str                       # "params" or "flops"
    budget: int                     # the student's budgeted count
    uniform: int                    # the count the uniform ChannelPrune would give
    planned: int                    # the count the allocation plans
    keep: dict                      # root → kept fraction
    units: dict                     # root → (kept units, units)


class ModelCount:
    """The student's parameter (or FLOP) count as a function of the units each group removes.

    A layer's count is its output width times its input width (times taps, and the output
    pixels for FLOPs): linear in each group's width, bilinear in the two groups a layer
    sits between. So ``count(r) = total − Σ_g c_g·r_g + Σ_{g,h} d_gh·r_g·r_h`` exactly, with
    ``c_g`` measured on a copy of the model with one unit of ``g`` removed and ``d_gh`` on
    one with a unit of each removed, for the pairs that share a layer (so any architecture
    counts right: biases, BatchNorms, depthwise convs that follow a group).
    """

    def __init__(self, model: nn.Module, example: torch.Tensor, groups: list[ChannelGroup], kind: str):
        shape = (1, *example.shape[1:])

        def count(m: nn.Module) -> int:
            return count_parameters(m) if kind == "params" else count_flops(m, shape, batched=True)

        def without_one_unit_of(roots: tuple[str, ...]) -> int:
            m = copy.deepcopy(model)
            graph = ModelGraph(m, example)
            for root in roots:
                g = next(g for g in graph.groups if g.root == root)
                unit, _ = g.units(g.channels)
                graph.prune(g, torch.nonzero(unit == 0).flatten().tolist())
            return count(m)

        self.total = count(model)
        self.unit = {g.root: self.total - without_one_unit_of((g.root,)) for g in groups}
        writes = {g.root: set(g.producers) for g in groups}
        reads = {g.root: set(g.consumers) for g in groups}
        self.pair = {}
        for g in groups:
            for h in groups:
                if g.root < h.root and (reads[g.root] & writes[h.root] or reads[h.root] & writes[g.root]):
                    both = without_one_unit_of((g.root, h.root))
                    self.pair[(g.root, h.root)] = both - self.total + self.unit[g.root] + self.unit[h.root]

    def __call__(self, removed: dict[str, int]) -> int:
        out = self.total - sum(self.unit[r] * n for r, n in removed.items())
        return out + sum(d * removed.get(g, 0) * removed.get(h, 0) for (g, h), d in self.pair.items())

    def marginal(self, removed: dict[str, int]) -> dict[str, int]:
        """What one more unit of each group removes, at ``removed``."""
        out = dict(self.unit)
        for (g, h), d in self.pair.items():
            out[g] -= d * removed.get(h, 0)
            out[h] -= d * removed.get(g, 0)
        return out


def _choose(curves: dict[str, list[float]], costs: dict[str, int], floor: dict[str, int], step: dict[str, int],
            n_units: dict[str, int], price: float) -> dict[str, int]:
    """Per group, the number of units removed that minimises ``E_g − price·c_g·removed``."""
    removed = {}
    for root, curve in curves.items():
        best_r, best_v = 0, 0.0
        for r in range(step[root], n_units[root] - floor[root] + 1, step[root]):
            if r >= len(curve):
                break
            v = curve[r] - price * costs[root] * r
            if v < best_v:
                best_r, best_v = r, v
        removed[root] = best_r
    return removed


def unit_steps(group: ChannelGroup) -> tuple[int, int, int]:
    """``(units, step, floor)`` of a group: its removable units, the step its count moves
    by (every block keeps the same count) and the fewest it may keep (:data:`MIN_KEEP`)."""
    _, block = group.units(group.channels)
    n_blocks = int(block.max()) + 1
    return len(block), n_blocks, max(n_blocks, math.ceil(MIN_KEEP * len(block) / n_blocks) * n_blocks)


def allocate_keep(groups: list[ChannelGroup], keep: dict[str, float], curves: dict[str, list[float]],
                  count: ModelCount, budget: int | None, kind: str) -> Allocation:
    """Kept fraction of every group under ``budget`` (see the module docstring).

    ``curves[root][r]`` is the relative error after removing ``r`` units (``curves[root][0] = 0``),
    ``count`` the model's count as a function of the removed units, ``keep`` the uniform
    plan's fractions; ``budget`` None: the uniform plan's count.
    """
    by_root = {g.root: g for g in groups}
    n_units, step, floor = {}, {}, {}
    for root in curves:
        n_units[root], step[root], floor[root] = unit_steps(by_root[root])
    uniform_removed = {r: n_units[r] - max(step[r], int(keep[r] * n_units[r] + 1e-9) // step[r] * step[r])
                       for r in curves}
    total, uniform = count.total, count(uniform_removed)
    budget = uniform if budget is None else budget
    need = total - budget  # count to remove
    costs = count.marginal(uniform_removed)  # the prices, linearised at the uniform plan

    def spent(removed: dict[str, int]) -> int:
        return total - count(removed)

    most = {r: (n_units[r] - floor[r]) // step[r] * step[r] for r in curves}
    if spent(most) < need:
        raise ValueError(f"target: a budget of {budget:,} {kind} needs {need:,} removed, but the groups the "
                         f"policy prunes carry at most {spent(most):,} at {MIN_KEEP:g} of their channels "
                         f"(the teacher has {total:,}); expected a budget of at least {total - spent(most):,}")
    costs = {r: max(c, 1) for r, c in costs.items()}
    lo, hi = 0.0, max(max(curves[r]) for r in curves) + 1.0
    while spent(_choose(curves, costs, floor, step, n_units, hi)) < need:
        hi *= 2.0
    for _ in range(100):  # bisect the price: lo stays within the budget's removals, hi meets them
        mid = 0.5 * (lo + hi)
        if spent(_choose(curves, costs, floor, step, n_units, mid)) >= need:
            hi = mid
        else:
            lo = mid
    # the price just below spends less than the budget; between the two prices the
    # Lagrangian jumps (linear stretches of a curve), so go on from there one step at a
    # time, each time the step with the least added error per count removed
    removed = _choose(curves, costs, floor, step, n_units, lo)
    while spent(removed) < need:
        price = count.marginal(removed)

        def added(r: str) -> float:
            nxt = removed[r] + step[r]
            return (curves[r][nxt] - curves[r][removed[r]]) / max(price[r] * step[r], 1e-300)
        open_ = [r for r in curves if removed[r] + step[r] <= most[r] and price[r] > 0]
        if not open_:  # cannot happen when `most` meets the budget; never loop forever
            raise RuntimeError(f"target: the allocation stopped {need - spent(removed):,} {kind} short")
        pick = min(open_, key=added)
        removed[pick] += step[pick]
    kept = {r: n_units[r] - removed[r] for r in curves}
    return Allocation(kind=kind, budget=budget, uniform=uniform, planned=count(removed),
                      keep={r: kept[r] / n_units[r] for r in curves}, units={r: (kept[r], n_units[r]) for r in curves})
