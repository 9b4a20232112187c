"""compress checkpoints: a run killed at any layer boundary resumes to the identical model;
a resume with another model, data or settings is refused; a damaged file is named."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import cdfast
from cdfast.experiments.models import resnet

ROOT = Path(__file__).resolve().parent.parent
KW = dict(compression=[cdfast.ChannelPrune(0.5), cdfast.Quantize(4)], solver="exact", policy="auto",
          progress=False, verbose=False)


def _teacher():
    torch.manual_seed(0)
    model = resnet(8, width=4).eval()
    for m in model.modules():  # BatchNorms with statistics of their own, as a trained net has
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _data():
    return torch.randn(12, 1, 16, 16, generator=torch.Generator().manual_seed(1))


def _killed_run(tmp_path: Path, ck: Path, kill_after: int) -> int:
    """Run compress in a child process that SIGKILLs itself right after the checkpoint of
    its ``kill_after``-th finished layer is on disk; returns the child's exit code."""
    torch.save(_teacher().state_dict(), tmp_path / "teacher.pt")
    torch.save(_data(), tmp_path / "data.pt")
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        import cdfast
        C = sys.modules["cdfast.model.compress"]  # the module (cdfast.model.compress is the function)
        from test_checkpoint import _teacher, KW
        teacher = _teacher()
        teacher.load_state_dict(torch.load({str(tmp_path / 'teacher.pt')!r}))
        x = torch.load({str(tmp_path / 'data.pt')!r})
        save = C._save_checkpoint
        def save_then_die(path, stamp, student, done, *rest):
            save(path, stamp, student, done, *rest)
            if len(done) >= {kill_after}:
                os.kill(os.getpid(), signal.SIGKILL)
        C._save_checkpoint = save_then_die
        cdfast.compress(teacher, x, checkpoint={str(ck)!r}, **KW)
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    return r.returncode


def _same_model(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]), k


def test_resume_after_sigkill_is_identical_at_every_boundary_tried(tmp_path):
    teacher, x = _teacher(), _data()
    reference, rep_ref = cdfast.compress(teacher, x, **KW)
    n_layers = len([l for l in rep_ref.layers if l.action != "skipped"])
    assert rep_ref.params_after < rep_ref.params_before
    for kill_after in (2, n_layers // 2 + 1, n_layers):
        ck = tmp_path / f"run{kill_after}.pt"
        assert _killed_run(tmp_path, ck, kill_after) == -signal.SIGKILL
        assert ck.exists() and not list(tmp_path.glob(f"run{kill_after}.pt.tmp-*"))
        resumed, rep = cdfast.compress(teacher, x, checkpoint=str(ck), **KW)
        _same_model(resumed, reference)
        assert rep.params_after == rep_ref.params_after and rep.flops_after == rep_ref.flops_after
        names = [l.name for l in rep.layers]
        assert names == [l.name for l in rep_ref.layers] and len(set(names)) == len(names)
        assert sorted(rep.quantized) == sorted(rep_ref.quantized)


def test_resume_with_other_settings_data_or_model_is_refused(tmp_path):
    teacher, x = _teacher(), _data()
    ck = tmp_path / "run.pt"
    assert _killed_run(tmp_path, ck, 2) == -signal.SIGKILL
    other = dict(KW, compression=[cdfast.ChannelPrune(0.25), cdfast.Quantize(4)])
    with pytest.raises(ValueError, match="checkpoint: .* another compression"):
        cdfast.compress(teacher, x, checkpoint=str(ck), **other)
    with pytest.raises(ValueError, match="checkpoint: .* another data"):
        cdfast.compress(teacher, x + 1, checkpoint=str(ck), **KW)
    changed = _teacher()
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="checkpoint: .* another model"):
        cdfast.compress(changed, x, checkpoint=str(ck), **KW)


@pytest.mark.parametrize("content", [b"", b"garbage" * 10, "truncated", "other-object"])
def test_a_damaged_checkpoint_is_named_with_advice(tmp_path, content):
    ck = tmp_path / "run.pt"
    if content == "truncated":
        assert _killed_run(tmp_path, ck, 2) == -signal.SIGKILL
        ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 2])
    elif content == "other-object":
        torch.save({"weights": torch.randn(3)}, ck)
    else:
        ck.write_bytes(content)
    with pytest.raises(ValueError, match=f"checkpoint: '{ck}' .*delete it to start over"):
        cdfast.compress(_teacher(), _data(), checkpoint=str(ck), **KW)


def test_checkpoint_paths_are_checked_before_any_work(tmp_path):
    t, x = _teacher(), _data()
    with pytest.raises(ValueError, match="checkpoint: the folder .* does not exist"):
        cdfast.compress(t, x, checkpoint=str(tmp_path / "missing" / "run.pt"), **KW)
    with pytest.raises(ValueError, match="checkpoint: .* is a directory"):
        cdfast.compress(t, x, checkpoint=str(tmp_path), **KW)
    with pytest.raises(TypeError, match="checkpoint: expected a file path"):
        cdfast.compress(t, x, checkpoint=3, **KW)


def test_leftover_temporaries_are_removed(tmp_path):
    ck = tmp_path / "run.pt"
    stale = tmp_path / "run.pt.tmp-99999"
    stale.write_bytes(b"half a file")
    cdfast.compress(_teacher(), _data(), checkpoint=str(ck), **KW)
    assert ck.exists() and not stale.exists()


@pytest.mark.parametrize("kw,match", [
    (dict(batch_size=0), "batch_size"), (dict(batch_size=2.5), "batch_size"), (dict(overrides=["a"]), "overrides"),
    (dict(overrides={"stem.0": {"action": "explode"}}), "overrides"), (dict(progress="yes"), "progress"),
    (dict(stats_dtype=torch.float16), "stats_dtype"), (dict(momentum="0.9"), "momentum"), (dict(log_every="x"), "log_every"),
    (dict(nonsense=1), "nonsense"), (dict(loss="l2"), "loss"), (dict(steps=-1), "steps"),
])
def test_bad_compress_arguments_are_named_before_any_work(kw, match):
    with pytest.raises((TypeError, ValueError), match=f"^{match}"):
        cdfast.compress(_teacher(), _data(), **{**KW, **kw})


@pytest.mark.parametrize("data,match", [(None, "data"), ("images", "data"), (torch.full((2, 1, 16, 16), float("nan")), "data"),
                                        (torch.randn(2, 3, 16, 16), "data")])
def test_bad_data_is_named(data, match):
    with pytest.raises((TypeError, ValueError), match=f"^{match}"):
        cdfast.compress(_teacher(), data, **KW)
