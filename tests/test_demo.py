"""The shipped teacher and the demo that uses it (the README's first command)."""
import os
import shlex

import pytest
import torch

import cdfast
from cdfast.cli import build_parser
from cdfast.experiments.models import build_model, count_parameters
from cdfast.experiments.train import SHIPPED_TEACHER, shipped_teacher

DATA = os.environ.get("CDFAST_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")
needs_data = pytest.mark.skipif(not os.path.isdir(DATA), reason="Fashion-MNIST not installed "
                                "(apt-get install dataset-fashion-mnist)")


def test_shipped_teacher_is_a_resnet20_made_by_cdfast_train():
    teacher, info = shipped_teacher()
    assert SHIPPED_TEACHER[0] == "resnet20" and count_parameters(teacher) == count_parameters(build_model("resnet20"))
    assert not teacher.training
    # the file says how to reproduce it, and that command is the project's own `cdfast train`
    args = build_parser().parse_args(shlex.split(info["command"])[1:])
    assert args.command == "train" and args.model == info["model"] == "resnet20"
    assert (args.epochs, args.seed, args.max_train) == (int(info["epochs"]), int(info["seed"]), None) == (3, 0, None)
    from cdfast.experiments.train import DEFAULT_BATCH_SIZE, DEFAULT_LR

    assert (int(info["batch_size"]), float(info["lr"])) == (DEFAULT_BATCH_SIZE, DEFAULT_LR)  # train's defaults
    assert float(info["test_accuracy"]) >= 92.0


@needs_data
def test_shipped_teacher_reaches_its_recorded_accuracy():
    from cdfast.experiments.data import load_fashion_mnist
    from cdfast.experiments.train import evaluate

    teacher, info = shipped_teacher()
    acc = evaluate(teacher, load_fashion_mnist("test"))
    assert acc >= 92.0 and abs(acc - float(info["test_accuracy"])) < 0.02, (acc, info["test_accuracy"])


@needs_data
def test_a_short_demo_writes_its_table_plot_and_models(tmp_path, capsys):
    from cdfast.experiments.demo import main

    assert main(out=tmp_path, methods=(("Ours", "cross"),), quantize=False, test_limit=300) == 0
    printed = capsys.readouterr().out
    table = (tmp_path / "demo.md").read_text()
    for label in ("Teacher", "Ours"):
        assert f"| {label} |" in table and label in printed
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    files = {p.name: p.stat().st_size for p in (tmp_path / "models").iterdir()}
    assert set(files) == {"teacher.safetensors", "ours.safetensors"}
    assert 1.8 < files["teacher.safetensors"] / files["ours.safetensors"] < 2.2  # half the parameters
    small = cdfast.load(tmp_path / "models" / "ours.safetensors", model=build_model("resnet20"))
    assert count_parameters(small) < count_parameters(build_model("resnet20"))
    assert torch.isfinite(small(torch.randn(2, 1, 28, 28))).all()
