"""``compress(target=...)``: a whole-model budget spent where each group's error curve says it costs least."""
import itertools

import pytest
import torch

import cdfast
from cdfast.model.allocate import MIN_KEEP, allocate_keep, check_target
from cdfast.model.graph import ChannelGroup
from test_compress import tiny_vgg


class LinearCount:
    """A model count linear in the removed units (no layer between two groups)."""

    def __init__(self, total, unit):
        self.total, self.unit = total, unit

    def __call__(self, removed):
        return self.total - sum(self.unit[r] * n for r, n in removed.items())

    def marginal(self, removed):
        return dict(self.unit)


def _groups(*sizes):
    return [ChannelGroup(root=f"g{i}", channels=n, period=n, blocks=1) for i, n in enumerate(sizes)]


def test_the_allocation_is_the_cheapest_one_that_meets_the_budget():
    torch.manual_seed(0)
    groups = _groups(8, 8, 16)
    # random increasing error curves (cumulative sums of positive removal costs, not convex)
    curves = {g.root: [0.0] + torch.rand(g.channels).mul(torch.rand(1) * 3).cumsum(0).tolist() for g in groups}
    costs = {"g0": 7, "g1": 3, "g2": 5}
    total, keep = 400, {g.root: 0.5 for g in groups}
    alloc = allocate_keep(groups, keep, curves, LinearCount(total, costs), None, "params")
    assert alloc.uniform == total - (7 * 4 + 3 * 4 + 5 * 8)
    assert alloc.planned <= alloc.budget == alloc.uniform
    # brute force over every allowed count per group: nothing meets the budget with less error
    floors = {g.root: max(1, int(-(-MIN_KEEP * g.channels // 1))) for g in groups}
    best = min(sum(curves[g.root][r] for g, r in zip(groups, rs))
               for rs in itertools.product(*[range(g.channels - floors[g.root] + 1) for g in groups])
               if total - sum(costs[g.root] * r for g, r in zip(groups, rs)) <= alloc.budget)
    chosen = sum(curves[r][n - k] for r, (k, n) in alloc.units.items())
    # the Lagrangian solution is optimal for the budget it spends; it may spend a little more
    assert chosen <= best + 1e-9 or alloc.planned < alloc.budget
    assert all(floors[r] <= k <= n for r, (k, n) in alloc.units.items())


def test_a_group_that_costs_more_error_keeps_more_channels():
    groups = _groups(16, 16)
    curves = {"g0": [0.01 * r for r in range(17)], "g1": [1.0 * r for r in range(17)]}
    alloc = allocate_keep(groups, {"g0": 0.5, "g1": 0.5}, curves, LinearCount(1000, {"g0": 10, "g1": 10}), None,
                          "params")
    assert alloc.units["g0"][0] < 8 < alloc.units["g1"][0]
    assert alloc.planned <= alloc.uniform


def test_the_model_count_is_exact_for_chained_groups():
    from cdfast.model.allocate import ModelCount
    from cdfast.model.counting import count_parameters
    from cdfast.model.graph import ModelGraph
    import copy
    teacher, x = tiny_vgg(), torch.randn(2, 1, 12, 12)
    groups = [g for g in ModelGraph(teacher, x).groups if g.prunable]
    count = ModelCount(teacher, x, groups, "params")
    assert count.pair  # the chain conv0 → conv3 → conv7 couples its groups
    removed = {"0": 3, "3": 5, "7": 2}
    m = copy.deepcopy(teacher)
    graph = ModelGraph(m, x)
    for g in graph.groups:
        if g.root in removed:
            graph.prune(g, list(range(removed[g.root])))
    assert count(removed) == count_parameters(m)


def test_compress_meets_a_parameter_budget_and_reports_the_allocation():
    teacher = tiny_vgg()
    x = torch.randn(16, 1, 12, 12, generator=torch.Generator().manual_seed(1))
    _, uniform = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), solver="exact",
                                 progress=False, verbose=False)
    small, rep = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), solver="exact",
                                 target="params", progress=False, verbose=False)
    assert rep.allocation["budget"] == uniform.params_after == rep.allocation["uniform"]
    assert rep.params_after == rep.allocation["planned"] <= uniform.params_after
    kept = {g["root"]: g["kept"] for g in rep.groups if g["status"] == "pruned"}
    assert kept == {r: k for r, (k, _) in rep.allocation["kept_units"].items()}
    assert torch.isfinite(small(x)).all()
    budget = int(0.6 * rep.params_before)
    _, rep = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), solver="exact",
                             target={"params": budget}, progress=False, verbose=False)
    assert rep.params_after <= budget


@pytest.mark.parametrize("bad", ["weights", {"params": 0}, {"params": 1.5}, {"flops": True}, {"a": 1}, 3,
                                 {"params": 1, "flops": 1}])
def test_a_bad_target_is_refused_by_name(bad):
    with pytest.raises(ValueError, match="target"):
        check_target(bad)
    with pytest.raises(ValueError, match="target"):
        cdfast.compress(tiny_vgg(), torch.randn(4, 1, 12, 12), compression=cdfast.ChannelPrune(0.5), target=bad,
                        progress=False, verbose=False)


def test_a_target_without_channel_pruning_or_out_of_reach_is_refused():
    x = torch.randn(4, 1, 12, 12)
    with pytest.raises(ValueError, match="target: needs a ChannelPrune"):
        cdfast.compress(tiny_vgg(), x, compression=cdfast.Quantize(4), target="params", progress=False,
                        verbose=False)
    with pytest.raises(ValueError, match="target: a budget of 10 params"):
        cdfast.compress(tiny_vgg(), x, compression=cdfast.ChannelPrune(0.5), target={"params": 10}, progress=False,
                        verbose=False)
