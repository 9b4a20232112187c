"""Teacher training on Fashion-MNIST, with an on-disk cache, and accuracy evaluation.

:func:`train_teacher` trains a network from :mod:`cdfast.experiments.models` with SGD
(Nesterov momentum 0.9, weight decay 5e-4) and a per-step schedule: a linear
warm-up over the first 3 % of the steps, then cosine decay to zero. The trained
``state_dict`` is cached as ``{cache_dir}/{model_name}-e{epochs}-s{seed}.pt``, so a
second call with the same arguments loads it (``torch.load(..., weights_only=True)``)
instead of training. Non-default ``batch_size``, ``lr`` or ``max_train`` add a
suffix to the file name (``-b64``, ``-lr0.05``, ``-n500``), so differently trained
teachers never share a file.

The demo's teacher ships with the package (:data:`SHIPPED_TEACHER`, about 1 MB in
``cdfast/experiments/assets/``, written by :func:`cdfast.save`). It was made by the
project's own command, recorded in the file::

    cdfast train resnet20 --epochs 3 --seed 0 --output cdfast/experiments/assets/resnet20-fashion-mnist.safetensors

(92.47 % on the 10,000 Fashion-MNIST test images; 538 s on two shared CPU cores).
Running that command again retrains it from scratch (delete the cached
``resnet20-e3-s0.pt`` first); :func:`shipped_teacher` loads it.
"""
from __future__ import annotations

import math
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .data import _materialise, load_fashion_mnist
from .models import build_model

__all__ = ["DEFAULT_EPOCHS", "DEFAULT_LR", "default_cache_dir", "teacher_path", "train_teacher", "fit",
           "evaluate", "SHIPPED_TEACHER", "shipped_teacher", "save_teacher"]

DEFAULT_EPOCHS = 3
DEFAULT_LR = 0.1
DEFAULT_BATCH_SIZE = 128
_WEIGHT_DECAY = 5e-4
_MOMENTUM = 0.9
_WARMUP_FRACTION = 0.03


def default_cache_dir() -> Path:
    """``$CDFAST_CACHE`` if set, else ``~/.cache/cdfast/teachers``."""
    env = os.environ.get("CDFAST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cdfast" / "teachers"


def _check_int(name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v}")
    return v


def teacher_path(model_name: str, epochs: int = DEFAULT_EPOCHS, seed: int = 0,
                 cache_dir: str | os.PathLike | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 lr: float = DEFAULT_LR, max_train: int | None = None) -> Path:
    """The cache file :func:`train_teacher` uses for these arguments."""
    root = default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()
    name = f"{model_name}-e{epochs}-s{seed}"
    if batch_size != DEFAULT_BATCH_SIZE:
        name += f"-b{batch_size}"
    if lr != DEFAULT_LR:
        name += f"-lr{lr:g}"
    if max_train is not None:
        name += f"-n{max_train}"
    return root / f"{name}.pt"


def _atomic_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def train_teacher(model_name: str, epochs: int = DEFAULT_EPOCHS, batch_size: int = DEFAULT_BATCH_SIZE,
                  lr: float = DEFAULT_LR, seed: int = 0, cache_dir: str | os.PathLike | None = None,
                  device: str | torch.device = "cpu", max_train: int | None = None,
                  root: str | os.PathLike | None = None, progress: bool | None = None) -> nn.Module:
    """A teacher trained on the Fashion-MNIST train split, from the cache when present.

    Args:
        model_name: a name :func:`cdfast.experiments.models.build_model` accepts (``"resnet20"``,
            ``"resnet56"``, ``"vgg_small"``, ``"vgg16"``, ``"small_cnn"``, …).
        epochs: passes over the training set.
        batch_size: SGD batch size.
        lr: peak learning rate (SGD, Nesterov momentum 0.9, weight decay 5e-4,
            3 % linear warm-up then cosine decay, stepped per batch).
        seed: seeds the initialisation, the data order and the ``max_train`` subset.
        cache_dir: where trained weights are kept (default :func:`default_cache_dir`).
        device: where to train; the returned model is on it.
        max_train: train on a seeded random subset of this many images (for tests).
        root: Fashion-MNIST folder, passed to :func:`cdfast.experiments.data.load_fashion_mnist`.
        progress: show a tqdm bar per epoch; ``None``: only when stderr is a terminal.

    Returns:
        The trained model in eval mode.

    Raises:
        TypeError/ValueError: bad arguments; FileNotFoundError: no Fashion-MNIST;
        RuntimeError: a cache file exists but cannot be loaded (delete it to retrain).
    """
    if not isinstance(model_name, str):
        raise TypeError(f"model_name: expected a str, got {type(model_name).__name__}")
    epochs = _check_int("epochs", epochs, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    seed = _check_int("seed", seed, 0)
    if max_train is not None:
        max_train = _check_int("max_train", max_train, 1)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"lr: expected a float, got {type(lr).__name__}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: expected a finite value > 0, got {lr}")
    if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir: expected a path, got {type(cache_dir).__name__}")
    device = torch.device(device)

    model = build_model(model_name)  # validates model_name
    path = teacher_path(model_name, epochs, seed, cache_dir, batch_size, lr, max_train)
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            model.load_state_dict(state)
        except Exception as e:  # corrupt or from an incompatible model definition
            raise RuntimeError(f"cached teacher {path} could not be loaded ({e}); "
                               f"delete it to retrain") from e
        return model.to(device).eval()

    torch.manual_seed(seed)
    model = fit(build_model(model_name), epochs, batch_size, lr, seed, device, max_train, root, progress,
                desc=model_name)
    _atomic_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)
    return model


def fit(model: nn.Module, epochs: int = DEFAULT_EPOCHS, batch_size: int = DEFAULT_BATCH_SIZE, lr: float = DEFAULT_LR,
        seed: int = 0, device: str | torch.device = "cpu", max_train: int | None = None,
        root: str | os.PathLike | None = None, progress: bool | None = None, desc: str = "train") -> nn.Module:
    """Train ``model`` on the Fashion-MNIST train split with :func:`train_teacher`'s recipe
    (no cache); returns it in eval mode on ``device``."""
    device = torch.device(device)
    data = load_fashion_mnist("train", root=root)
    x_all, y_all = data.tensors
    g = torch.Generator().manual_seed(seed)
    if max_train is not None and max_train < len(y_all):
        idx = torch.randperm(len(y_all), generator=g)[:max_train]
        x_all, y_all = x_all[idx], y_all[idx]
    n = len(y_all)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = max(1, int(round(_WARMUP_FRACTION * total)))

    # channels_last roughly halves the step time of these small convs on CPU; the
    # model is returned in the default (contiguous) layout.
    fmt = torch.channels_last
    model = model.to(device).to(memory_format=fmt)
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.dim() <= 1 else decay).append(p)
    opt = torch.optim.SGD([{"params": decay, "weight_decay": _WEIGHT_DECAY},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=lr, momentum=_MOMENTUM, nesterov=True)

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, total - warmup)
        return 0.5 * lr * (1.0 + math.cos(math.pi * t))

    show = sys.stderr.isatty() if progress is None else bool(progress)
    step = 0
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(n, generator=g)
        bar = tqdm(range(steps_per_epoch), desc=f"{desc} epoch {epoch + 1}/{epochs}",
                   disable=not show, leave=False)
        running = 0.0
        for b in bar:
            idx = order[b * batch_size:(b + 1) * batch_size]
            xb = x_all[idx].to(device, non_blocking=True).contiguous(memory_format=fmt)
            yb = y_all[idx].to(device, non_blocking=True)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            running = 0.9 * running + 0.1 * loss.item() if b else loss.item()
            if show:
                bar.set_postfix(loss=f"{running:.3f}", refresh=False)
        bar.close()
        if not math.isfinite(running):
            raise RuntimeError(f"lr: training diverged (loss {running}) at epoch {epoch + 1}; "
                               f"try a smaller lr")

    return model.to(memory_format=torch.contiguous_format).eval()


#: The demo's teacher, in ``cdfast/experiments/assets/``: its model name and file.
SHIPPED_TEACHER = ("resnet20", "resnet20-fashion-mnist.safetensors")


def shipped_teacher() -> tuple[nn.Module, dict[str, str]]:
    """The teacher that ships with cdfast (a ResNet-20) in eval mode, and what its file
    records: the command and seed that trained it, its test accuracy, the torch version."""
    from importlib.resources import as_file, files

    from ..model.export import load, read_info

    name, filename = SHIPPED_TEACHER
    with as_file(files(__package__) / "assets" / filename) as path:
        if not path.is_file():
            raise FileNotFoundError(f"the shipped teacher {path} is missing from this installation")
        model = load(path, model=build_model(name))
        return model.eval(), read_info(path)


def save_teacher(model: nn.Module, path: str | os.PathLike, *, model_name: str, epochs: int, seed: int,
                 accuracy: float, command: str) -> Path:
    """Write a trained teacher with :func:`cdfast.save`, recording how it was made."""
    from .. import __version__
    from ..model.export import save

    info = {"command": command, "model": model_name, "epochs": str(epochs), "seed": str(seed),
            "batch_size": str(DEFAULT_BATCH_SIZE), "lr": f"{DEFAULT_LR:g}",
            "test_accuracy": f"{accuracy:.2f}", "torch": torch.__version__, "cdfast": __version__}
    return save(model.eval(), path, info=info)


@torch.inference_mode()
def evaluate(model: nn.Module, dataset, batch_size: int = 100) -> float:
    """Top-1 accuracy of ``model`` on ``dataset`` in percent.

    ``dataset`` is a ``TensorDataset``, any map-style dataset of ``(x, label)`` or a
    ``DataLoader``. The model is not modified: a copy runs in eval mode on the
    model's device, with each BatchNorm folded into the conv before it and, for
    4-d inputs, in the channels-last layout (together about 2× faster on CPU than
    the model as it is; the same predictions up to float rounding).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    batch_size = _check_int("batch_size", batch_size, 1)
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    if isinstance(dataset, DataLoader):
        source = ((x, torch.as_tensor(y)) for x, y in dataset)
    else:
        x_all, y_all = _materialise(dataset)
        source = zip(x_all.split(batch_size), y_all.split(batch_size))
    net = None
    correct = total = 0
    for xb, yb in source:
        xb = xb.to(device)
        if net is None:
            net = _inference_copy(model, xb)
        if xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        pred = net(xb).argmax(dim=1)
        correct += int((pred.cpu() == yb.reshape(-1)).sum())
        total += yb.numel()
    if total == 0:
        raise ValueError("dataset: is empty")
    return 100.0 * correct / total


def _inference_copy(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """An eval-mode copy of ``model`` with its BatchNorms folded, channels-last for images.

    Folding follows execution order, which cannot see a conv output that also feeds
    another branch; the folded copy is kept only if it gives the model's outputs on
    a few examples.
    """
    import copy

    from ..model.surgery import fold_batchnorm
    from ..model.walk import execution_order

    was_training = model.training
    probe = example[:16]
    try:
        model.eval()
        reference = model(probe)
    finally:
        model.train(was_training)
    net = copy.deepcopy(model).eval()
    fold_batchnorm(net, execution_order(net, probe[:1])[1])
    if not torch.allclose(net(probe), reference, rtol=1e-4, atol=1e-4 * float(reference.abs().max())):
        net = copy.deepcopy(model).eval()
    return net.to(memory_format=torch.channels_last) if example.dim() == 4 else net
