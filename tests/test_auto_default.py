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
    scores = re.search(r"held-out nc loss over folds: (.*)\)$", choice).group(1)
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


def test_auto_with_one_sample_uses_the_rows_per_column_rule():
    teacher = tiny_vgg()
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(4))
    _, rep = cdfast.compress(teacher, x, compression=cdfast.Quantize(4), solver="exact", progress=False,
                             verbose=False)
    for l in rep.layers:
        if l.action == "skipped":
            continue
        ratio = l.rows / l.cols
        assert l.loss == ("cross(mu=0.9)" if ratio < 2 else "nc"), (l.loss, ratio)
        assert l.choice.startswith(l.loss) and "M/D" in l.choice


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
