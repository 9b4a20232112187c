"""The crossing study: per-layer held-out drift of cross against nc, and its summary."""
import csv

import pytest
import torch
import torch.nn as nn

from cdfast.experiments.study import crossing_study, summarize_study, write_study


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def test_study_rows_summary_and_files(tmp_path):
    teacher = small_net()
    draws = {(k, 0): torch.randn(2 * k, 1, 8, 8) for k in (1, 4)}
    held_out = torch.randn(16, 1, 8, 8)
    rows = crossing_study(teacher, draws, held_out, keep=0.5, policy="skip_first", log=lambda s: None)
    assert len(rows) == 2 * 3  # per draw: two pruned convs and the refit classifier
    for r in rows:
        assert r["m_over_d"] == pytest.approx(r["rows"] / r["cols"])
        assert r["drift_nc"] > 0 and r["drift_cross"] > 0
        assert r["ratio"] == pytest.approx(r["drift_cross"] / r["drift_nc"])
    assert {r["rows"] for r in rows if r["layer"] == "2"} == {2 * 8 * 8, 8 * 8 * 8}  # M = N·H_out·W_out

    table = summarize_study(rows)
    counts = [int(line.split("|")[3]) for line in table.splitlines()[2:]]
    assert sum(counts) == len(rows)
    assert sum(int(line.split("|")[3]) for line in table.splitlines()[2:] if "classifier" in line) == 2

    paths = write_study(rows, str(tmp_path))
    with open(paths["csv"]) as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert open(paths["md"]).read() == table
    with pytest.raises(ValueError, match="rows"):
        write_study([], str(tmp_path))
