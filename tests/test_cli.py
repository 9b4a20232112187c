"""The command line: arguments and paths checked before any work, one-line errors, the
user's model and data, outputs written with cdfast.save into a fresh folder, Ctrl-C."""
import functools
import importlib
import inspect
import os
import pickle

import numpy as np
import pytest
import torch

import cdfast
from cdfast import cli

compress_module = importlib.import_module("cdfast.model.compress")  # the module; cdfast.model.compress is the function

DATA = os.environ.get("CDFAST_FASHION_MNIST", "/usr/share/datasets/fashion-mnist")

USER_MODULE = '''
import torch
import torch.nn as nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.Conv2d(12, 12, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 4)).eval()


def calibration():
    return torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def broken():
    raise RuntimeError("no weights here")
'''


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A folder holding the user's module ``netmod.py``, as the current directory."""
    (tmp_path / "netmod.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    import sys

    sys.modules.pop("netmod", None)


@pytest.fixture
def no_work(monkeypatch):
    """Any compression, training or demo started fails the test: errors must come first."""
    import cdfast.experiments.demo as demo
    import cdfast.experiments.grid as grid
    import cdfast.experiments.train as train

    for module, name in ((compress_module, "compress"), (train, "train_teacher"), (grid, "run_experiment"),
                         (demo, "main")):
        @functools.wraps(getattr(module, name))  # keeps the signature the parser reads defaults from
        def boom(*a, **k):
            raise AssertionError("work started before the arguments were checked")
        monkeypatch.setattr(module, name, boom)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("cdfast"), err
    return err


@pytest.mark.parametrize("argv, match", [
    (["compress", "resnet20", "--keep", "1.5"], "--keep: expected a number in \\(0, 1\\], got 1.5"),
    (["compress", "resnet20", "--k", "0", "--keep", "0.5"], "--k: expected an integer >= 1"),
    (["compress", "resnet20", "--bits", "9"], "--bits: expected an integer in 2..8"),
    (["compress", "resnet20", "--keep", "0.5", "--mu", "2"], "--mu"),
    (["compress", "resnet20", "--keep", "0.5", "--steps", "0"], "--steps"),
    (["compress", "resnet20", "--keep", "0.5", "--output", "missing/model.safetensors"],
     "--output: the folder 'missing' does not exist"),
    (["compress", "resnet20", "--keep", "0.5", "--report", "missing/r.json"], "--report"),
    (["compress", "resnet20", "--keep", "0.5", "--out", "netmod.py"], "--out: netmod.py exists and is not a folder"),
    (["compress", "resnet20"], "pass --keep, --density and/or --bits"),
    (["compress", "netmod:build", "--keep", "0.5"], "--data: required"),
    (["compress", "no_such_module_xyz:build", "--keep", "0.5", "--data", "x.pt"], "cannot import"),
    (["compress", "netmod:nothing", "--keep", "0.5", "--data", "x.pt"], "no attribute"),
    (["compress", "netmod:build", "--keep", "0.5", "--data", "missing.pt"], "--data"),
    (["compress", "netmod:broken", "--keep", "0.5", "--data", "x.pt"],
     "MODEL: calling netmod:broken\\(\\) raised RuntimeError: no weights here"),
    (["compress", "netmod:build", "--keep", "0.5", "--data", "netmod:broken"], "--data: calling netmod:broken"),
    (["compress", "missing.safetensors", "--keep", "0.5", "--data", "x.pt"], "MODEL"),
    (["compress", "resnet20", "--keep", "0.5", "--image-size", "0"], "--image-size"),
    (["compress", "resnet20", "--keep", "0.5", "--device", "tpu"], "--device"),
    (["train", "alexnet"], "unknown model 'alexnet'"),
    (["train", "resnet20", "--epochs", "0"], "--epochs"),
    (["train", "resnet20", "--output", "missing/t.safetensors"], "--output"),
    (["experiment", "--models", "alexnet"], "alexnet"),
    (["experiment", "--ks", "0"], "--ks"),
    (["experiment", "--methods", "ours"], "--methods: unknown \\['ours'\\]"),
    (["experiment", "--out", "netmod.py"], "--out"),
    (["study", "--keep", "0"], "--keep"),
    (["demo", "--k", "0"], "--k"),
    (["demo", "--out", "netmod.py"], "--out"),
])
def test_bad_arguments_are_one_line_and_exit_2_before_any_work(user, no_work, capsys, argv, match):
    before = set(os.listdir(user))
    assert cli.main(argv) == 2
    import re

    assert re.search(match, _one_line_error(capsys)), match
    assert set(os.listdir(user)) == before  # nothing written


def test_help_shows_every_default_and_the_library_defaults(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["compress", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    sig = inspect.signature(cdfast.compress).parameters
    for name in ("loss", "mu", "solver", "steps", "lr", "batch_size"):
        assert f"(default: {sig[name].default})" in text, name
    assert "(default: cpu)" in text and "(default: a new cdfast-runs/compress-<time>)" in text


def test_no_command_writes_into_the_repository_by_default():
    parser = cli.build_parser()
    for sub in ("experiment", "study", "demo", "compress"):
        assert parser.parse_args([sub, *(["m:f"] if sub == "compress" else [])]).out is None
    for action in parser._subparsers._group_actions[0].choices.values():
        for a in action._actions:
            assert "docs/results" not in str(a.default)


def _run_dir(root):
    runs = sorted((root / "cdfast-runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("compress-")
    return runs[0]


def _data_file(kind: str, root):
    x = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    if kind == "pt":
        torch.save({"x": x, "y": torch.zeros(16, dtype=torch.long)}, root / "calib.pt")
        return "calib.pt"
    if kind == "npy":
        np.save(root / "calib.npy", x.numpy())
        return "calib.npy"
    if kind == "safetensors":
        from safetensors.torch import save_file

        save_file({"images": x}, str(root / "calib.safetensors"))
        return "calib.safetensors"
    if kind == "images":
        from PIL import Image

        (root / "imgs" / "a").mkdir(parents=True)
        for i in range(6):
            arr = (np.random.default_rng(i).random((8, 8, 3)) * 255).astype(np.uint8)
            Image.fromarray(arr).save(root / "imgs" / ("a" if i % 2 else "") / f"{i}.png")
        return "imgs"
    return "netmod:calibration"


@pytest.mark.parametrize("kind", ["pt", "npy", "safetensors", "images", "hook"])
def test_compress_a_users_model_with_the_users_data(user, capsys, kind):
    spec = _data_file(kind, user)
    assert cli.main(["compress", "netmod:build", "--data", spec, "--keep", "0.5", "--solver", "exact"]) == 0
    out = _run_dir(user)
    assert (out / "report.json").is_file() and not (out / "checkpoint.pt").exists()
    import netmod

    teacher = netmod.build()
    small = cdfast.load(out / "model.safetensors")
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in teacher.parameters())
    y = small(torch.randn(2, 3, 8, 8))
    assert y.shape == (2, 4) and torch.isfinite(y).all()


def test_compress_with_weights_then_quantize_the_saved_model(user, capsys):
    import netmod

    trained = netmod.build()
    with torch.no_grad():
        trained[0].weight.mul_(2.0)  # "trained": not what build() returns
    torch.save(trained.state_dict(), user / "weights.pt")
    torch.save(netmod.calibration(), user / "calib.pt")
    assert cli.main(["compress", "netmod:build", "--weights", "weights.pt", "--data", "calib.pt", "--keep", "0.5",
                     "--solver", "exact", "--out", "pruned"]) == 0
    pruned = cdfast.load(user / "pruned" / "model.safetensors")
    assert cli.main(["compress", "pruned/model.safetensors", "--data", "calib.pt", "--bits", "4",
                     "--solver", "exact", "--out", "w4", "--output", "w4.safetensors"]) == 0
    w4 = cdfast.load(user / "w4.safetensors")
    assert [p.shape for p in w4.parameters()] == [p.shape for p in pruned.parameters()]
    assert os.path.getsize(user / "w4.safetensors") < os.path.getsize(user / "pruned" / "model.safetensors")


class NotATensor:
    pass


@pytest.mark.parametrize("kind, match", [
    ("garbage", "cannot read calib.pt"),
    ("pickle", "cannot read calib.pt"),          # weights_only=True refuses arbitrary objects
    ("ints", "expected floating-point inputs"),
    ("shape", "cannot run on samples of shape \\(4, 8, 8\\)"),
    ("nan", "NaN"),
])
def test_bad_data_files_are_one_line_errors(user, capsys, kind, match):
    path = user / "calib.pt"
    if kind == "garbage":
        path.write_bytes(b"\x00not a torch file")
    elif kind == "pickle":
        with open(path, "wb") as f:
            pickle.dump(NotATensor(), f)
    elif kind == "ints":
        torch.save(torch.zeros(4, 3, 8, 8, dtype=torch.int64), path)
    elif kind == "shape":
        torch.save(torch.randn(4, 4, 8, 8), path)
    else:
        torch.save(torch.full((4, 3, 8, 8), float("nan")), path)
    assert cli.main(["compress", "netmod:build", "--data", "calib.pt", "--keep", "0.5"]) == 2
    import re

    assert re.search(match, _one_line_error(capsys))
    assert not (user / "cdfast-runs").exists()


def test_ctrl_c_says_how_to_resume(user, capsys, monkeypatch):
    torch.save(torch.randn(8, 3, 8, 8), user / "calib.pt")
    seen = {}

    @functools.wraps(compress_module.compress)
    def interrupted(*a, checkpoint=None, **k):
        seen["checkpoint"] = checkpoint
        raise KeyboardInterrupt

    monkeypatch.setattr(compress_module, "compress", interrupted)
    assert cli.main(["compress", "netmod:build", "--data", "calib.pt", "--keep", "0.5"]) == 130
    err = capsys.readouterr().err
    out = _run_dir(user)
    assert "Traceback" not in err and "to resume" in err
    assert f"cdfast compress netmod:build --data calib.pt --keep 0.5 --out {out.relative_to(user)}" in err
    assert seen["checkpoint"] == str(out.relative_to(user) / "checkpoint.pt")  # saved after every layer


@pytest.mark.skipif(not os.path.isdir(DATA), reason="Fashion-MNIST not installed")
def test_train_output_records_the_command(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CDFAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "t.safetensors"
    assert cli.main(["train", "small_cnn", "--epochs", "1", "--max-train", "300", "--output", str(out)]) == 0
    info = cdfast.model.read_info(out)
    assert info["command"] == "cdfast train small_cnn --epochs 1 --seed 0 --max-train 300"
    assert float(info["test_accuracy"]) > 10.0
    from cdfast.experiments.models import build_model

    cdfast.load(out, model=build_model("small_cnn"))  # the bundled architecture, strictly


def _interrupt_at_the_second_layer(monkeypatch):
    """Ctrl-C while compress solves its second layer; returns the real distill_layer."""
    real = compress_module.distill_layer
    calls = []

    def stop_at_the_second_layer(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(compress_module, "distill_layer", stop_at_the_second_layer)
    return real


def test_an_interrupted_compress_resumes_from_its_folder(user, capsys, monkeypatch):
    torch.save(torch.randn(8, 3, 8, 8), user / "calib.pt")
    real = _interrupt_at_the_second_layer(monkeypatch)
    argv = ["compress", "netmod:build", "--data", "calib.pt", "--keep", "0.5", "--solver", "exact"]
    assert cli.main(argv) == 130
    out = _run_dir(user)
    assert (out / "checkpoint.pt").is_file()
    command = capsys.readouterr().err.split("run: ")[1].strip()
    monkeypatch.setattr(compress_module, "distill_layer", real)
    assert cli.main(command.split()[1:]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and not (out / "checkpoint.pt").exists()


def test_a_resume_with_other_settings_is_refused(user, capsys, monkeypatch):
    torch.save(torch.randn(8, 3, 8, 8), user / "calib.pt")
    _interrupt_at_the_second_layer(monkeypatch)
    argv = ["compress", "netmod:build", "--data", "calib.pt", "--keep", "0.5", "--solver", "exact", "--out", "run"]
    assert cli.main(argv) == 130
    capsys.readouterr()
    assert cli.main(argv[:5] + ["0.25"] + argv[6:]) == 2
    assert "holds an unfinished run with other compression" in _one_line_error(capsys)


@pytest.mark.skipif(not os.path.isdir(DATA), reason="Fashion-MNIST not installed")
def test_compress_a_bundled_name_uses_the_shipped_teacher(tmp_path, monkeypatch, capsys):
    import cdfast.experiments.data as data
    import cdfast.experiments.train as train

    real = data.load_fashion_mnist

    def small_test_split(split, *a, **k):  # 200 test images keep the test short
        d = real(split, *a, **k)
        return torch.utils.data.TensorDataset(*(t[:200] for t in d.tensors)) if split == "test" else d

    monkeypatch.setattr(data, "load_fashion_mnist", small_test_split)
    monkeypatch.setattr(train, "train_teacher", lambda *a, **k: pytest.fail("trained a teacher"))
    monkeypatch.setenv("CDFAST_CACHE", str(tmp_path / "empty-cache"))
    assert cli.main(["compress", "resnet20", "--k", "1", "--keep", "0.5", "--solver", "exact",
                     "--refine-steps", "3", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "teacher: the shipped resnet20 (cdfast train resnet20 --epochs 3 --seed 0)" in out
    assert "accuracy: teacher" in out and (tmp_path / "run" / "model.safetensors").is_file()
    assert "loss chosen per layer (--loss auto):" in out and "held-out output error over folds" in out
    assert "block-wise refinement (--refine-steps):" in out and "blocks.8: block error" in out
