"""``loss="auto"`` as compress's default: every fitted layer reports the loss it chose and why."""
import inspect
import re

import torch

import cdfast
from cdfast import cli
from cdfast.experiments import baselines, grid
from test_compress import tiny_vgg

CANDIDATES = {"nc", "cross(mu=0.9)", "cross(mu=0.7)", "cross(mu=0.5)"}


def _held_out_ranking(choice: str) -> list[str]:
    """The candidates of a held-out choice, best first, as the report words them."""
    scores = re.search(r"held-out (?:nc loss|output error) over folds: (.*)\)$", choice).group(1)
    return [part.rsplit(" ", 1)[0] for part in scores.split(", ")]


def test_auto_is_the_default_of_compress_and_of_the_cli():
    assert inspect.signature(cdfast.compress).parameters["loss"].default == "auto"
    assert cli.build_parser().parse_args(["compress", "m:f"]).loss == "auto"
    assert cli.build_parser().parse_args(["compress", "m:f", "--augment", "flip+mix"]).augment == "flip+mix"
    assert all("auto" in methods for methods in grid.METHODS.values())


def test_default_compress_reports_each_layers_choice_and_why():
    teacher = tiny_vgg()
    x = torch.randn(12, 1, 10, 10, generator=torch.Generator().manual_seed(3))
    small, rep = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), solver="exact",
                                 progress=False, verbose=False)
    fitted = [l for l in rep.layers if l.action != "skipped"]
    assert len(fitted) == 3
    for l in fitted:
        assert l.loss in CANDIDATES, l
        assert "held-out output error" in l.choice, l.choice  # compress scores the model's output
        ranking = _held_out_ranking(l.choice)
        assert sorted(ranking) == sorted(CANDIDATES)
        prior = "cross(mu=0.9)" if l.rows / l.cols < 2 else "nc"
        # the lowest held-out loss, or the study's rule when the folds do not clearly beat it
        if l.loss != ranking[0]:
            assert l.loss == prior and "within one standard error" in l.choice, l.choice
        elif l.loss != prior:
            assert "standard errors" in l.choice, l.choice
        assert f"[{l.loss}]" in l.line() and l.name in rep.choices()
    # the channels were selected with the rows-per-column rule, and the report says so per consumer
    pruned = [g for g in rep.groups if g["status"] == "pruned"]
    assert pruned and all(set(g["selection_loss"]) == set(g["consumers"]) for g in pruned)
    assert all(re.search(r"M/D = [0-9.e+-]+ (<|>=) 2", why) for g in pruned for why in g["selection_loss"].values())
    assert torch.isfinite(small(x)).all()


def test_an_explicit_loss_is_reported_without_a_choice():
    teacher = tiny_vgg()
    x = torch.randn(12, 1, 10, 10, generator=torch.Generator().manual_seed(3))
    _, rep = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), loss="cross", mu=0.7,
                             solver="exact", progress=False, verbose=False)
    fitted = [l for l in rep.layers if l.action != "skipped"]
    assert [l.loss for l in fitted] == ["cross(mu=0.7)"] * 3 and not any(l.choice for l in fitted)
    assert rep.choices() == "" and all("selection_loss" not in g for g in rep.groups)


def test_auto_with_one_sample_uses_the_prior():
    teacher = tiny_vgg()
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    _, rep = cdfast.compress(teacher, x, compression=cdfast.Quantize(4), solver="exact", progress=False,
                             verbose=False)
    fitted = [l for l in rep.layers if l.action != "skipped"]
    assert fitted
    for l in fitted:  # quantized layers start from nc, whatever their rows per column
        assert l.loss == "nc" and l.choice.startswith("nc") and "quantized" in l.choice, l.choice
    x = torch.randn(1, 1, 24, 24, generator=torch.Generator().manual_seed(4))
    _, rep = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), solver="exact", progress=False,
                             verbose=False)
    ratios = []
    for l in rep.layers:
        if l.action == "skipped":
            continue
        ratio = l.rows / l.cols
        ratios.append(ratio)
        assert l.loss == ("cross(mu=0.9)" if ratio < 2 else "nc"), (l.loss, ratio)
        assert l.choice.startswith(l.loss) and "M/D" in l.choice
    assert min(ratios) < 2 <= max(ratios)  # both sides of the rule were exercised


def test_rule_of_thumb():
    from cdfast.layer.selection import rule_of_thumb
    assert rule_of_thumb(10, 6).chosen == "cross(mu=0.9)" and "M/D = 1.67 < 2" in rule_of_thumb(10, 6).rule
    assert rule_of_thumb(12, 6).chosen == "nc" and ">= 2" in rule_of_thumb(12, 6).rule
    assert rule_of_thumb(10, 6, quantized=True).chosen == "nc"


def test_the_grid_method_auto_runs_compress_with_loss_auto():
    teacher = tiny_vgg()
    x = torch.randn(12, 1, 10, 10, generator=torch.Generator().manual_seed(5))
    student, info = baselines.run("auto", teacher, x, keep=0.5, policy="skip_first", solver="exact")
    losses = {v["loss"] for v in info["layers"].values() if v["action"] != "skipped"}
    assert losses and losses <= CANDIDATES
    assert all(v["choice"] for v in info["layers"].values() if v["action"] != "skipped")
    assert info["params"] < info["params_teacher"]


def test_the_folds_replace_the_studys_choice_only_beyond_one_standard_error():
    from cdfast.layer.selection import LossChoice, prefer_prior
    prior = LossChoice("nc", "M/D = 3 >= 2")
    # cross is lower in total but the per-fold differences are noise around a small mean
    noisy = {"nc": [10.0, 12.0, 9.0, 11.0, 10.0], "cross(mu=0.9)": [12.0, 9.0, 11.0, 8.0, 11.5]}
    assert prefer_prior(noisy, prior)[0] == "nc"
    assert "within one standard error" in prefer_prior(noisy, prior)[1]
    # lower on every fold by about the same amount: a clear win
    clear = {"nc": [10.0, 12.0, 9.0, 11.0, 10.0], "cross(mu=0.9)": [9.0, 10.9, 8.1, 9.9, 9.1]}
    name, why = prefer_prior(clear, prior)
    assert name == "cross(mu=0.9)" and "standard errors" in why
    # the prior is the best: kept with the study's reason
    assert prefer_prior({"nc": [1.0, 1.0], "cross(mu=0.9)": [2.0, 2.0]}, prior) == ("nc", "M/D = 3 >= 2")


def test_the_output_error_score_runs_the_student_with_the_candidate_weight():
    """compress scores a candidate by the model's output on the fold's samples, with the
    layer set to the candidate and every other layer as it is; the layer is restored."""
    from cdfast.layer.geometry import LayerGeometry
    from cdfast.layer.selection import FoldedStatistics
    from cdfast.model.compress import _flat_output, _Inputs, _output_error
    from cdfast.model.graph import ModelGraph

    g = torch.Generator().manual_seed(7)
    teacher = tiny_vgg().eval()
    student = tiny_vgg().eval()
    student.load_state_dict(teacher.state_dict())
    x = torch.randn(9, 1, 10, 10, generator=g)
    name = "3"
    assert isinstance(student.get_submodule(name), torch.nn.Conv2d)
    with torch.no_grad():  # an earlier layer already compressed: the student differs upstream
        student.get_submodule("0").weight.mul_(0.7)
    graph = ModelGraph(student, x[:1])
    inputs = _Inputs(name, teacher, student, graph)
    geo = LayerGeometry.of(inputs.layer_t)
    batches = list(x.split(4))
    period, folds = 3, 3  # 3 images, 3 views each (view-major): folds are dealt by image
    with torch.no_grad():
        targets = [_flat_output(teacher(b)) for b in batches]
    score = _output_error(student, inputs, geo, batches, targets, folds, period)
    before = inputs.layer_s.weight.detach().clone()
    W = geo.weight_matrix(before) + 0.3 * torch.randn(geo.weight_matrix(before).shape, generator=g)
    for f in range(folds):
        idx = [s for s in range(9) if (s % period) % folds == f]
        probe = tiny_vgg().eval()
        probe.load_state_dict(student.state_dict())
        with torch.no_grad():
            probe.get_submodule(name).weight.copy_(geo.weight_tensor(W)[0])
            expected = (probe(x[idx]).double() - teacher(x[idx]).double()).pow(2).sum()
        assert abs(score(W, f) - float(expected)) <= 1e-5 * float(expected)  # float32 forwards, other batches
        assert torch.equal(inputs.layer_s.weight, before)  # restored after each score
    assert score(geo.weight_matrix(before), 0) > 0  # the upstream change shows in the output
    # the same dealing as the statistics' folds
    assert FoldedStatistics.fold_of(torch.arange(9), folds, period).tolist() == [(s % 3) % 3 for s in range(9)]


def test_choose_loss_ranks_the_candidates_by_the_given_score():
    from cdfast.layer.losses import Quadratic
    from cdfast.layer.selection import AUTO_CANDIDATES, FoldedStatistics, choose_loss, describe

    g = torch.Generator().manual_seed(11)
    layer = torch.nn.Linear(6, 3)
    h_t = torch.randn(10, 6, generator=g, dtype=torch.float64)
    h_s = h_t + 0.5 * torch.randn(10, 6, generator=g, dtype=torch.float64)
    anchor = layer.weight.detach().double().reshape(1, 3, 6)
    solutions = {}

    def far_from_anchor(W, f):  # rewards moving away from the teacher; unconstrained, every cross is W^T
        return -float((W - anchor).pow(2).sum())

    for score in (None, far_from_anchor):
        folded = FoldedStatistics(layer, folds=5, score=score, dtype=torch.float64).update(h_t, h_s)
        spec, choice = choose_loss(folded, anchor, Quadratic.minimizer, torch.float64, 0.0)
        solutions[score] = (describe(spec), choice)
    name, choice = solutions[far_from_anchor]
    assert choice.criterion == "output error" and solutions[None][1].criterion == "nc loss"
    # under that score nc (no pull to the teacher) is best on every fold: a clear win
    assert min(choice.scores, key=choice.scores.get) == "nc" == name
    assert set(choice.scores) == {describe(s) for s in AUTO_CANDIDATES}
