"""The experiment grid: rows, tables, outputs, and resume after an interruption.

The real-data test needs Debian's ``dataset-fashion-mnist`` (CI installs it) and
skips cleanly without it; the table and validation tests run everywhere.
"""
import os

import pytest
import torch
import torch.nn as nn

import cdfast
from cdfast.experiments.grid import (Row, markdown, parse_method, read_rows, recalibrate_batchnorm, run_experiment,
                                     write_outputs)
from test_compress import tiny_vgg

ROOT = os.environ.get("CDFAST_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
needs_data = pytest.mark.skipif(not os.path.isdir(ROOT), reason="Fashion-MNIST not installed "
                                "(apt-get install dataset-fashion-mnist)")


def _grid(tmp_path, ks, log):
    return run_experiment(models=("small_cnn",), tasks=("w4",), ks=ks, seeds=(0,), methods=["teacher", "naive", "nc"],
                          epochs=1, test_limit=500, csv_path=tmp_path / "results.csv", log=log,
                          teacher_options={"max_train": 6000, "cache_dir": tmp_path / "cache", "progress": False})


@needs_data
def test_experiment_appends_rows_and_resumes(tmp_path):
    first_log: list[str] = []
    rows = _grid(tmp_path, (1,), first_log.append)
    assert [(r.method, r.k) for r in rows] == [("teacher", 1), ("naive", 1), ("nc", 1)]
    assert read_rows(tmp_path / "results.csv") == rows  # every row is on disk as soon as it is measured
    acc = {r.method: r.accuracy for r in rows}
    assert acc["teacher"] > 50.0 and acc["nc"] > 50.0, acc  # 4-bit refit keeps a working classifier

    # an interrupted run: the K=1 rows are there, K=2 is not; the rerun only measures K=2
    second_log: list[str] = []
    rows2 = _grid(tmp_path, (1, 2), second_log.append)
    assert rows2[:3] == rows
    assert [(r.method, r.k) for r in rows2[3:]] == [("teacher", 2), ("naive", 2), ("nc", 2)]
    assert not any("K=1 " in line for line in second_log)
    assert sum("K=2 " in line for line in second_log) == 3
    assert read_rows(tmp_path / "results.csv") == rows2

    # rows measured with other settings are never mixed into the same file
    with pytest.raises(ValueError, match="csv_path"):
        run_experiment(models=("small_cnn",), tasks=("w4",), ks=(1,), seeds=(0,), solver="adam",
                       csv_path=tmp_path / "results.csv")

    paths = write_outputs(rows2, str(tmp_path / "out"))
    assert os.path.getsize(paths["small_cnn_w4"]) > 0
    table = open(paths["md"]).read()
    assert table == markdown(rows2) and "| Ours-NC |" in table and "K=2" in table


def test_experiment_rejects_unknown_names(tmp_path):
    with pytest.raises(ValueError, match="methods"):
        run_experiment(models=("small_cnn",), methods=["ours"], csv_path=tmp_path / "r.csv")
    with pytest.raises(ValueError, match="tasks"):
        run_experiment(models=("small_cnn",), tasks=("prune",), csv_path=tmp_path / "r.csv")
    with pytest.raises(ValueError, match="rows"):
        write_outputs([], str(tmp_path))


def test_table_mean_std_and_incomplete_cells():
    rows = [Row("m", "channel", "cross", 1, s, acc, 100, 1.0) for s, acc in enumerate((80.0, 82.0, 84.0))]
    rows += [Row("m", "channel", "cross", 5, 0, 90.0, 100, 1.0)]  # one seed of three so far
    rows += [Row("m", "channel", "nc", 1, s, 70.0 + s, 100, 1.0) for s in range(3)]
    table = markdown(rows)
    assert "| Ours | 100 | 82.00 ± 2.00 | 90.00 ± 0.00 (n=1) |" in table
    assert "| Ours-NC | 100 | 71.00 ± 1.00 |  |" in table


def test_a_row_cut_by_a_kill_is_measured_again_and_a_damaged_row_is_named(tmp_path):
    from cdfast.experiments.grid import _append_row

    path = str(tmp_path / "results.csv")
    a, b = Row("m", "w4", "nc", 1, 0, 90.5, 10, 1.0), Row("m", "w4", "nc", 2, 0, 91.0, 10, 1.5)
    _append_row(path, a)
    with open(path, "a") as f:  # the process died in the middle of writing the next row
        f.write("m,w4,cross,1,0,9")
    with pytest.warns(UserWarning, match="incomplete last row 3"):
        assert read_rows(path) == [a]
    _append_row(path, b)  # the next row starts on its own line: the partial one is gone
    assert read_rows(path) == [a, b]
    with open(path, "a") as f:
        f.write("m,w4,nc,5,0,not-a-number,10,1.0\n")
    _append_row(path, a)
    with pytest.raises(ValueError, match="results.csv: row 4 is damaged"):
        read_rows(path)


def test_baselines_and_fskd_name_their_bad_arguments():
    import torch
    import torch.nn as nn

    from cdfast.experiments.baselines import run
    from cdfast.model.fskd import fskd

    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    x = torch.randn(4, 1, 6, 6)
    for kwargs, match in ((dict(keep=1.5), "keep"), (dict(keep=0.5, steps=0), "steps"),
                          (dict(keep=0.5, lr=float("nan")), "lr")):
        with pytest.raises(ValueError, match=f"^{match}:"):
            run("l1", net, x, **kwargs)
    with pytest.raises(TypeError, match="^batch_size:"):  # not an int at all
        run("l1", net, x, keep=0.5, batch_size=2.5)
    with pytest.raises(TypeError, match="^teacher:"):
        run("l1", "net", x, keep=0.5)
    for kwargs, match in ((dict(batch_size=0), "batch_size"), (dict(ridge=-1.0), "ridge"),
                          (dict(inplace="no"), "inplace"), (dict(kept_outputs=[1]), "kept_outputs")):
        with pytest.raises((TypeError, ValueError), match=f"^{match}:"):
            fskd(net, net, x, **kwargs)
    with pytest.raises(ValueError, match="^data: contains NaN"):
        fskd(net, net, x.clone().index_fill_(0, torch.tensor([1]), float("nan")))
    broken = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1))
    with torch.no_grad():
        broken[0].weight[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="^student: its parameter '0.weight'"):
        fskd(net, broken, x)


def test_parse_method_options():
    assert parse_method("auto") == ("auto", {}, ())
    assert parse_method("auto+flip+shift+bias+bn") == ("auto", {"augment": "flip+shift", "fit_bias": True},
                                                       ("bn",))
    assert parse_method("cross+shift+bndrift") == ("cross", {"augment": "shift"}, ("bndrift",))
    assert parse_method("auto+ridge1e-2") == ("auto", {"damping": 0.01}, ())
    assert parse_method("auto+mix+blocks") == ("auto", {"augment": "mix", "refine_steps": 500}, ())
    for bad in ("ours", "thinet+flip", "auto+crop", "auto+flip+flip", "nc+bn+bndrift", "auto+ridge", "auto+ridge-1",
                "auto+ridge1+ridge2"):
        with pytest.raises(ValueError, match="methods"):
            parse_method(bad)


def test_batchnorm_recalibration():
    teacher = tiny_vgg()
    x = torch.randn(20, 1, 10, 10, generator=torch.Generator().manual_seed(6))
    # the student is the teacher: the drift correction leaves its statistics as they are
    same = recalibrate_batchnorm(teacher, tiny_vgg(), x, drift=True)
    for a, b in zip(teacher.modules(), same.modules()):
        if isinstance(a, nn.BatchNorm2d):
            assert torch.allclose(a.running_mean, b.running_mean, atol=1e-5)
            assert torch.allclose(a.running_var, b.running_var, rtol=1e-4)
    # a shrunk student: plain re-estimation gives its batch statistics on x
    small, _ = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), solver="exact", loss="nc",
                               progress=False, verbose=False)
    recalibrate_batchnorm(teacher, small, x, drift=False)
    h = small[0](x)
    assert torch.allclose(small[1].running_mean, h.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(small[1].running_var, h.var((0, 2, 3), unbiased=False), atol=1e-5)
    # and the drift correction runs on it: the teacher's statistics moved by the student's drift
    small2, _ = cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(0.5), solver="exact", loss="nc",
                                progress=False, verbose=False)
    kept = small2[1].num_features
    recalibrate_batchnorm(teacher, small2, x, drift=True)
    assert small2[1].running_mean.shape == (kept,) and torch.isfinite(small2(x)).all()


def test_tables_name_the_method_options():
    rows = [Row("resnet20", "channel", m, 1, s, 90.0 + s, 100, 1.0) for m in ("auto", "auto+flip+bias") for s in (0, 1)]
    table = markdown(rows)
    assert "| Ours-auto | 100 | 90.50 ± 0.71 |" in table and "| Ours-auto + flip + bias | 100 |" in table
