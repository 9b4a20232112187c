"""The ``cdfast`` command line (also ``python -m cdfast``).

    cdfast demo                                   the README's demonstration (trains nothing)
    cdfast compress MODEL --data DATA --keep 0.5  compress your model from your few samples
    cdfast train resnet20 --epochs 3 --seed 0     train a bundled Fashion-MNIST teacher
    cdfast experiment --models resnet20 --ks 1 5  the paper's tables (resumable)
    cdfast study --model resnet20 --ks 1 5        when does crossing help (per layer, vs M/D)

Every argument and every output path is checked before any work; a bad one prints
one line and exits with status 2. Results go to a new folder under
``./cdfast-runs/`` unless ``--out`` names one. Models are written with
:func:`cdfast.save` (safetensors and JSON, never a pickle). Ctrl-C prints how to
resume and exits with status 130.

``MODEL`` (``compress``) is one of

* a file written by :func:`cdfast.save` (e.g. a model compressed before);
* ``pkg.module:factory`` — a function (or class) of an importable module that
  returns the network, with ``--weights FILE`` to load a state dict into it
  (``.pt`` read with ``torch.load(weights_only=True)``, or ``.safetensors``);
* a bundled name (``resnet20``, ``vgg_small`` …): the Fashion-MNIST teacher
  (ResNet-20 with the default ``--epochs``/``--teacher-seed``: the shipped one),
  with ``--k`` training images per class as default data, and test accuracy.

``DATA`` (``--data``) is a folder of images (read with Pillow, recursively, as the
model's input channels; ``--image-size`` resizes, ``--mean``/``--std`` normalise
after scaling to [0, 1]), a tensor file (``.pt`` — a tensor, or a dict or list
holding one — ``.safetensors`` or ``.npy``), or ``pkg.module:function`` returning a
tensor, a list of tensors, a Dataset or a DataLoader. Labels are never used.
"""
from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import shlex
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm", ".ppm")


class CLIError(ValueError):
    """A bad argument or file: printed as one line, exit status 2."""


# ------------------------------------------------------------------ argument types
def _number(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return v


def fraction(text: str) -> float:
    """A number in (0, 1] (``--keep``, ``--density``)."""
    v = _number(text, "a number in (0, 1]")
    if not 0.0 < v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text}")
    return v


def unit(text: str) -> float:
    """A number in [0, 1] (``--mu``)."""
    v = _number(text, "a number in [0, 1]")
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text}")
    return v


def positive_float(text: str) -> float:
    v = _number(text, "a positive number")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
    return v


def _int(text: str, minimum: int, maximum: int | None = None) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < minimum or (maximum is not None and v > maximum):
        span = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
        raise argparse.ArgumentTypeError(f"expected an integer {span}, got {v}")
    return v


def positive_int(text: str) -> int:
    return _int(text, 1)


def nonneg_int(text: str) -> int:
    return _int(text, 0)


def bits(text: str) -> int:
    return _int(text, 2, 8)


def image_size(text: str) -> tuple[int, int]:
    """``28`` or ``32x24`` (height × width)."""
    parts = text.lower().replace("×", "x").split("x")
    try:
        hw = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH, got {text!r}") from None
    if len(hw) not in (1, 2) or min(hw) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or HEIGHTxWIDTH of positive integers, got {text!r}")
    return (hw[0], hw[-1])


def device(text: str) -> str:
    import torch

    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a torch device such as cpu, cuda or cuda:1, got {text!r}") \
            from None
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text}: this torch sees no CUDA device")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif d.type != "cpu":
        raise argparse.ArgumentTypeError(f"expected cpu or cuda[:N], got {text!r}")
    return str(d)


def _bundled_name(text: str) -> str:
    from .experiments.models import build_model

    try:
        build_model(text)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _library_default(fn, name: str):
    """The default of ``fn``'s parameter ``name``: the CLI shows the library's own."""
    return inspect.signature(fn).parameters[name].default


# ------------------------------------------------------------------ output paths
def _out_folder(args, kind: str) -> Path:
    """``--out`` or a new ``cdfast-runs/<kind>-<time>``: checked now, created by :func:`_make`.

    The folder may exist (a rerun resumes into it); else its nearest existing parent
    must be a writable folder.
    """
    from .experiments import new_run_folder

    out = Path(args.out).expanduser() if args.out else new_run_folder(kind)
    if out.exists():
        if not out.is_dir():
            raise CLIError(f"--out: {out} exists and is not a folder")
        if not os.access(out, os.W_OK):
            raise CLIError(f"--out: the folder {out} is not writable")
        return out
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise CLIError(f"--out: cannot create {out}: {parent} is not a writable folder")
    return out


def _make(out: Path) -> Path:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CLIError(f"--out: cannot create the folder {out} ({exc.strerror})") from None
    return out


def _out_file(option: str, path: str | None, default: Path) -> Path:
    """An output file: its folder must exist and be writable (checked before any work);
    the default, inside the ``--out`` folder, is checked with that folder."""
    from .model.export import check_output_file

    return check_output_file(path, option) if path else default


def _resume_command(argv: list[str], out: Path) -> str:
    """The command line that resumes this run: the same one, with ``--out`` named."""
    args = list(argv)
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", str(out)]
    return " ".join(shlex.quote(a) for a in ["cdfast", *args])


# ------------------------------------------------------------------ models and data
def _import_object(spec: str, option: str):
    """``pkg.module:name`` → the object (the module is imported: the user asked for it)."""
    import importlib

    module, _, name = spec.partition(":")
    if not module or not name:
        raise CLIError(f"{option}: expected pkg.module:name, got {spec!r}")
    if os.getcwd() not in sys.path and "" not in sys.path:  # the `cdfast` script: find ./mynet.py as python would
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise CLIError(f"{option}: cannot import {module} ({exc})") from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise CLIError(f"{option}: {module} has no attribute {name!r}")
        obj = getattr(obj, part)
    return obj


def _looks_like_import(spec: str) -> bool:
    module, sep, name = spec.partition(":")
    return bool(sep) and not os.path.exists(spec) and all(p.isidentifier() for p in module.split(".")) \
        and all(p.isidentifier() for p in name.split("."))


def _load_state_dict(path: Path, option: str) -> dict:
    import torch

    if not path.is_file():
        raise CLIError(f"{option}: no file {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's argument
        raise CLIError(f"{option}: cannot read {path} as a state dict ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CLIError(f"{option}: {path} does not hold a state dict (names → tensors)")
    return state


def load_user_model(spec: str, weights: str | None = None):
    """``MODEL`` of ``cdfast compress`` (a cdfast file or ``pkg.module:factory``) → ``nn.Module``."""
    import torch.nn as nn

    from .model.export import FORMAT, load

    path = Path(spec).expanduser()
    if path.is_file():
        if weights:
            raise CLIError("--weights: only with a pkg.module:factory MODEL (a saved cdfast model holds its weights)")
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                fmt = (f.metadata() or {}).get("format")
        except Exception:  # noqa: BLE001
            fmt = None
        if fmt != FORMAT:
            raise CLIError(f"MODEL: {path} is not a model saved by cdfast.save; for a state dict pass "
                           "pkg.module:factory --weights FILE")
        try:
            return load(path)
        except (ValueError, TypeError) as exc:
            raise CLIError(f"MODEL: {exc}") from None
    if not _looks_like_import(spec):
        raise CLIError(f"MODEL: {spec!r} is neither a file, nor pkg.module:factory, nor a bundled model name")
    obj = _import_object(spec, "MODEL")
    model = obj if isinstance(obj, nn.Module) else (_call_user(obj, spec, "MODEL") if callable(obj) else None)
    if not isinstance(model, nn.Module):
        raise CLIError(f"MODEL: {spec} did not give an nn.Module (got {type(model).__name__})")
    if weights:
        state = _load_state_dict(Path(weights).expanduser(), "--weights")
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CLIError(f"--weights: does not fit {spec} ({str(exc).splitlines()[0]})") from None
    return model


def _input_channels(model) -> int | None:
    import torch.nn as nn

    first = next((m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))), None)
    return first.in_channels if isinstance(first, nn.Conv2d) else None


def _read_images(folder: Path, channels: int | None, size, mean, std):
    import numpy as np
    import torch

    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - matplotlib brings Pillow
        raise CLIError("--data: reading a folder of images needs Pillow (pip install pillow)") from None
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise CLIError(f"--data: no image files ({', '.join(IMAGE_SUFFIXES)}) under {folder}")
    mode = {1: "L", 3: "RGB", None: "RGB"}.get(channels)
    if mode is None:
        raise CLIError(f"--data: the model takes {channels} input channels; images give 1 or 3 "
                       "(pass a tensor file instead)")
    arrays = []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if size is not None:
                    im = im.resize((size[1], size[0]), Image.BILINEAR)
                arrays.append(np.asarray(im, dtype=np.float32) / 255.0)
        except OSError as exc:
            raise CLIError(f"--data: cannot read the image {f} ({exc})") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise CLIError(f"--data: the images have different sizes {sorted(shapes)[:3]}; pass --image-size")
    x = torch.from_numpy(np.stack(arrays))
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2)
    c = x.shape[1]
    for name, v in (("--mean", mean), ("--std", std)):
        if v is not None and len(v) not in (1, c):
            raise CLIError(f"{name}: expected 1 or {c} values, got {len(v)}")
    if mean is not None:
        x = x - torch.tensor(mean).view(1, -1, 1, 1)
    if std is not None:
        x = x / torch.tensor(std).view(1, -1, 1, 1)
    return x.contiguous()


def _read_tensor_file(path: Path):
    import numpy as np
    import torch

    try:
        if path.suffix == ".npy":
            obj = torch.from_numpy(np.load(path, allow_pickle=False))
        elif path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's argument
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise CLIError(f"--data: cannot read {path} ({type(exc).__name__}: {msg})") from None
    if isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        pick = next((tensors[k] for k in ("x", "images", "inputs", "data") if k in tensors), None)
        if pick is None and len(tensors) == 1:
            pick = next(iter(tensors.values()))
        if pick is None:
            raise CLIError(f"--data: {path} holds {sorted(tensors)}; expected one tensor or a key "
                           "'x', 'images', 'inputs' or 'data'")
        obj = pick
    elif isinstance(obj, (list, tuple)) and obj and isinstance(obj[0], torch.Tensor):
        obj = obj[0]  # (x, y): the inputs
    if not isinstance(obj, torch.Tensor):
        raise CLIError(f"--data: {path} holds a {type(obj).__name__}, not a tensor")
    if not obj.is_floating_point():
        raise CLIError(f"--data: {path} holds {obj.dtype} values; expected floating-point inputs")
    return obj


def load_calibration_data(spec: str, model, size=None, mean=None, std=None):
    """``--data`` → what :func:`cdfast.compress` takes (a tensor, a list of tensors, a Dataset …)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _read_images(path, _input_channels(model), size, mean, std)
    if path.is_file():
        if size is not None or mean is not None or std is not None:
            raise CLIError("--image-size, --mean, --std: only with a folder of images")
        return _read_tensor_file(path)
    if _looks_like_import(spec):
        hook = _import_object(spec, "--data")
        if not callable(hook):
            raise CLIError(f"--data: {spec} is not callable")
        return _call_user(hook, spec, "--data")
    raise CLIError(f"--data: {spec!r} is neither a folder, a file, nor pkg.module:function")


def _call_user(fn, spec: str, flag: str):
    """Call the user's factory; its failure is one line naming the flag and the function."""
    try:
        return fn()
    except (CLIError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - the user's code failed: say where, in one line
        raise CLIError(f"{flag}: calling {spec}() raised {type(exc).__name__}: {exc}") from None


def _first_batch(data):
    import torch

    from .model.walk import calibration_batches

    try:
        batches = calibration_batches(data, 8)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--data: {exc}") from None
    if not batches or not isinstance(batches[0], torch.Tensor) or batches[0].numel() == 0:
        raise CLIError("--data: holds no samples")
    return batches[0]


def _check_model_runs(model, data, dev: str):
    """Run the model on two samples: a shape mismatch is the user's data, said in one line."""
    import torch

    x = _first_batch(data)[:2].to(dev)
    if not bool(torch.isfinite(x).all()):
        raise CLIError("--data: contains NaN or Inf")
    try:
        with torch.no_grad():
            model.eval()(x)
    except Exception as exc:  # noqa: BLE001 - the forward failing on these inputs is a data error
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CLIError(f"--data: the model cannot run on samples of shape {tuple(x.shape[1:])} ({msg})") from None


# ------------------------------------------------------------------ commands
def _compression(args):
    from .layer import constraints as c

    items = []
    if args.keep is not None:
        items.append(c.ChannelPrune(args.keep))
    if args.density is not None:
        items.append(c.WeightPrune(args.density))
    if args.bits is not None:
        items.append(c.Quantize(args.bits))
    return items or None


def cmd_train(args) -> int:
    from .experiments.data import load_fashion_mnist
    from .experiments.train import evaluate, save_teacher, teacher_path, train_teacher

    output = _out_file("--output", args.output, Path()) if args.output else None
    test = load_fashion_mnist("test")  # a missing dataset is found before training
    path = teacher_path(args.model, args.epochs, args.seed, max_train=args.max_train)
    print(f"{args.model}: {'loading the cached' if path.is_file() else 'training the'} teacher "
          f"({args.epochs} epochs, seed {args.seed}; cache {path})", flush=True)
    args.resume_hint = "training restarts from the beginning when rerun (only finished teachers are cached)"
    model = train_teacher(args.model, epochs=args.epochs, seed=args.seed, max_train=args.max_train,
                          device=args.device)
    acc = evaluate(model.eval(), test)
    print(f"{args.model}: {acc:.2f}% test accuracy")
    if output is not None:
        command = f"cdfast train {args.model} --epochs {args.epochs} --seed {args.seed}"
        if args.max_train is not None:
            command += f" --max-train {args.max_train}"
        save_teacher(model.cpu(), output, model_name=args.model, epochs=args.epochs, seed=args.seed,
                     accuracy=acc, command=command)
        print(f"saved to {output} ({output.stat().st_size / 1000:.0f} kB)")
    return 0


def _bundled_teacher(name: str, epochs: int, seed: int, dev: str):
    """A bundled teacher: the shipped one when it is what was asked for, else cached or trained."""
    from .experiments.train import SHIPPED_TEACHER, shipped_teacher, teacher_path, train_teacher

    if name == SHIPPED_TEACHER[0] and not teacher_path(name, epochs, seed).is_file():
        model, info = shipped_teacher()
        if info.get("epochs") == str(epochs) and info.get("seed") == str(seed):
            print(f"teacher: the shipped {name} ({info.get('command')})")
            return model.to(dev)
    print(f"teacher: {name}, {epochs} epochs, seed {seed} (trained once, then cached in "
          f"{teacher_path(name, epochs, seed).parent})", flush=True)
    return train_teacher(name, epochs=epochs, seed=seed, device=dev).eval()


def cmd_compress(args) -> int:
    import torch

    from .experiments.models import MODEL_NAMES
    from .model.compress import compress
    from .model.export import save

    bundled = args.model in MODEL_NAMES or (args.model.startswith("resnet") and args.model[6:].isdigit())
    if bundled and args.weights:
        raise CLIError("--weights: not with a bundled model name (use pkg.module:factory)")
    if not bundled and args.data is None:
        raise CLIError("--data: required for your own model (a folder of images, a tensor file or pkg.module:fn)")
    compression = _compression(args)
    if compression is None:
        raise CLIError("nothing to do: pass --keep, --density and/or --bits")
    out = _out_folder(args, "compress")
    model_path = _out_file("--output", args.output, out / "model.safetensors")
    report_path = _out_file("--report", args.report, out / "report.json")
    checkpoint = out / "checkpoint.pt"

    test = None
    if bundled:
        _bundled_name(args.model)
        from .experiments.data import few_shot, load_fashion_mnist

        test = load_fashion_mnist("test")
        teacher = _bundled_teacher(args.model, args.epochs, args.teacher_seed, args.device)
        data = few_shot(load_fashion_mnist("train"), args.k, seed=args.seed).tensors[0] if args.data is None \
            else load_calibration_data(args.data, teacher, args.image_size, args.mean, args.std)
    else:
        teacher = load_user_model(args.model, args.weights)
        data = load_calibration_data(args.data, teacher, args.image_size, args.mean, args.std)
    teacher = teacher.to(args.device).eval()
    if isinstance(data, torch.Tensor):
        data = data.to(args.device)
    elif isinstance(data, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in data):
        data = [t.to(args.device) for t in data]
    _check_model_runs(teacher, data, args.device)
    policy = args.policy or ("resnet" if bundled and args.model.startswith("resnet") else
                             _library_default(compress, "policy"))
    # what a checkpoint in this folder was made with: a resume with other settings is refused
    settings = {"model": args.model, "weights": args.weights, "data": args.data, "k": args.k, "seed": args.seed,
                "compression": [str(c) for c in compression], "loss": args.loss, "mu": args.mu,
                "solver": args.solver, "steps": args.steps, "lr": args.lr, "policy": policy,
                "batch_size": args.batch_size, "augment": args.augment}
    settings_path = out / "settings.json"
    if checkpoint.is_file() and settings_path.is_file():
        before = json.loads(settings_path.read_text())
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if changed:
            raise CLIError(f"--out: {out} holds an unfinished run with other {', '.join(changed)}; rerun it "
                           "as it was, or pass another --out")
    _make(out)
    settings_path.write_text(json.dumps(settings, indent=1))
    args.resume_hint = f"to resume after the last finished layer, run: {_resume_command(args.argv, out)}"
    print(f"compressing with {', '.join(map(str, compression))}, loss {args.loss}, solver {args.solver}, "
          f"policy {policy}, device {args.device}; output {out}", flush=True)
    if checkpoint.is_file():
        print(f"resuming from {checkpoint}")
    small, report = compress(teacher, data, compression=compression, loss=args.loss, mu=args.mu,
                             solver=args.solver, steps=args.steps, lr=args.lr, policy=policy,
                             batch_size=args.batch_size, augment=args.augment, checkpoint=str(checkpoint),
                             refine_steps=args.refine_steps, backend=args.backend,
                             progress=sys.stderr.isatty())
    save(small.cpu(), model_path, report)
    report.to_json(str(report_path))
    checkpoint.unlink(missing_ok=True)
    if report.choices():
        print("\nloss chosen per layer (--loss auto):\n" + report.choices())
    if report.blocks:
        print("\nblock-wise refinement (--refine-steps):\n" + "\n".join(b.line() for b in report.blocks))
    print(f"\nwalk: {report.walk}; {report.samples} samples; {report.seconds:.1f} s")
    print(f"params {report.params_before:,} -> {report.params_after:,}; "
          f"FLOPs {report.flops_before:,} -> {report.flops_after:,}")
    if test is not None:
        from .experiments.train import evaluate

        print(f"accuracy: teacher {evaluate(teacher, test):.2f}%, compressed {evaluate(small, test):.2f}%")
    print(f"model {model_path} ({model_path.stat().st_size / 1000:.0f} kB; cdfast.load(path) loads it), "
          f"report {report_path}")
    return 0


def cmd_experiment(args) -> int:
    from .experiments.grid import markdown, parse_method, read_rows, run_experiment, write_outputs

    for m in args.models:
        _bundled_name(m)
    for m in args.methods or ():
        try:
            parse_method(m)
        except ValueError as exc:
            raise CLIError(f"--{exc}") from None
    out = _make(_out_folder(args, "experiment"))
    csv_path = out / "results.csv"
    args.resume_hint = f"rows measured so far are in {csv_path}; to resume, run: {_resume_command(args.argv, out)}"
    print(f"results: {out}", flush=True)
    rows = run_experiment(models=args.models, tasks=args.tasks, ks=args.ks, seeds=args.seeds, methods=args.methods,
                          solver=args.solver, steps=args.steps, epochs=args.epochs, test_limit=args.test_limit,
                          csv_path=csv_path)
    # the tables cover every row in the folder: earlier runs with other models or tasks included
    paths = write_outputs(read_rows(csv_path) if csv_path.exists() else rows, str(out))
    print(markdown(rows))
    print(json.dumps(paths, indent=1))
    return 0


def cmd_study(args) -> int:
    from .experiments.data import few_shot, load_fashion_mnist
    from .experiments.study import crossing_study, write_study
    from .experiments.train import train_teacher

    _bundled_name(args.model)
    out = _make(_out_folder(args, "study"))
    args.resume_hint = "the study keeps no partial results; rerun the same command"
    teacher = train_teacher(args.model, epochs=args.epochs).eval()
    train = load_fashion_mnist("train")
    held_out = load_fashion_mnist("test").tensors[0][: args.held_out]
    draws = {(k, s): few_shot(train, k, seed=s).tensors[0] for k in args.ks for s in args.seeds}
    policy = "resnet" if args.model.startswith("resnet") else "skip_first"
    rows = crossing_study(teacher, draws, held_out, keep=args.keep, mu=args.mu, policy=policy)
    print(write_study(rows, str(out)))
    return 0


def cmd_demo(args) -> int:
    from .experiments.demo import main

    out = _make(_out_folder(args, "demo"))
    args.resume_hint = "the demo keeps no partial results; rerun it"
    return main(k=args.k, seed=args.seed, out=out)


# ------------------------------------------------------------------ the parser
class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad argument in one line (and exits with status 2)."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message}\n")


class _Help(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default (the library's own where it has one)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or not action.option_strings:
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, list) else action.default
        return f"{text} (default: {default})".strip()


def build_parser() -> argparse.ArgumentParser:
    from .layer.distill import distill_layer
    from .layer.losses import LOSSES
    from .layer.solvers import SOLVERS
    from .model.augment import AUGMENTS
    from .model.compress import POLICIES, compress

    solvers = list(dict.fromkeys([*SOLVERS, _library_default(compress, "solver")]))

    p = _Parser(prog="cdfast", description="Few-shot network compression by cross distillation",
                formatter_class=_Help, epilog="`cdfast COMMAND --help` shows each command's options and defaults.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def add(name: str, help: str, func):
        sp = sub.add_parser(name, help=help, description=help, formatter_class=_Help)
        sp.set_defaults(func=func)
        return sp

    d = add("demo", "compress the shipped ResNet-20 teacher from 5 images per class with the paper's main "
                    "methods; print the table, save a plot (trains nothing)", cmd_demo)
    d.add_argument("--k", type=positive_int, default=5, help="training images per class")
    d.add_argument("--seed", type=nonneg_int, default=0, help="seed of the image draw")
    d.add_argument("--out", default=None, help="output folder (default: a new cdfast-runs/demo-<time>)")

    c = add("compress", "compress a model from a few unlabelled samples and save it with cdfast.save",
            cmd_compress)
    c.add_argument("model", metavar="MODEL",
                   help="a file saved by cdfast.save, pkg.module:factory, or a bundled name (resnet20 …)")
    c.add_argument("--data", default=None, metavar="DATA",
                   help="calibration inputs: a folder of images, a .pt/.safetensors/.npy tensor file, or "
                        "pkg.module:function (bundled models: --k Fashion-MNIST images per class)")
    c.add_argument("--weights", default=None, help="state dict (.pt or .safetensors) for a pkg.module:factory MODEL")
    c.add_argument("--keep", type=fraction, help="channel pruning: fraction of input channels kept")
    c.add_argument("--density", type=fraction, help="unstructured pruning: fraction of weights kept")
    c.add_argument("--bits", type=bits, help="weight quantization bits (2..8)")
    c.add_argument("--loss", default=_library_default(compress, "loss"), choices=("auto",) + LOSSES,
                   help="the distillation loss (auto: each layer chooses nc or cross on held-out folds of the "
                        "samples; cross: the paper's; nc: without crossing)")
    c.add_argument("--mu", type=unit, default=_library_default(compress, "mu"),
                   help="weight of the correction term of the cross loss (--loss cross)")
    c.add_argument("--solver", default=_library_default(compress, "solver"), choices=solvers,
                   help="per-layer solver (exact: linear solves, greedy channel selection, GPTQ-style rounding)")
    c.add_argument("--steps", type=positive_int, default=_library_default(compress, "steps"),
                   help="iterations of adam/sgd per layer")
    c.add_argument("--lr", type=positive_float, default=_library_default(compress, "lr"),
                   help="learning rate of adam/sgd")
    c.add_argument("--policy", choices=POLICIES, default=None,
                   help=f"which layers are compressed (default: {_library_default(compress, 'policy')}; "
                        "resnet for bundled ResNets)")
    c.add_argument("--batch-size", type=positive_int, default=_library_default(compress, "batch_size"),
                   help="samples per forward pass of the walk")
    c.add_argument("--augment", choices=AUGMENTS, default=None,
                   help="also fit on views of the images: flips, 2-pixel shifts, blends of two images (mix)")
    c.add_argument("--refine-steps", type=nonneg_int, default=0,
                   help="Adam steps per block of block-wise refinement after the layer-wise pass (0: none; "
                        "500 measured on ResNet-20)")
    c.add_argument("--backend", default=_library_default(distill_layer, "backend"),
                   choices=["auto", "torch", "cpp", "triton", "cuda"],
                   help="kernels to use (cdfast.backends() says which can run here)")
    c.add_argument("--device", type=device, default="cpu", help="where the model and the solves run")
    c.add_argument("--image-size", type=image_size, default=None, metavar="HxW",
                   help="resize the images of a --data folder")
    c.add_argument("--mean", type=float, nargs="+", default=None, help="per-channel mean subtracted from images")
    c.add_argument("--std", type=positive_float, nargs="+", default=None, help="per-channel std images are divided by")
    c.add_argument("--k", type=positive_int, default=5, help="bundled models: Fashion-MNIST images per class")
    c.add_argument("--seed", type=nonneg_int, default=0, help="bundled models: seed of the image draw")
    c.add_argument("--epochs", type=positive_int, default=3, help="bundled models: teacher training epochs")
    c.add_argument("--teacher-seed", type=nonneg_int, default=0, help="bundled models: teacher training seed")
    c.add_argument("--out", default=None, help="output folder; rerun with the same --out to resume "
                                               "(default: a new cdfast-runs/compress-<time>)")
    c.add_argument("--output", default=None, help="the compressed model's file (default: OUT/model.safetensors)")
    c.add_argument("--report", default=None, help="the JSON report (default: OUT/report.json)")

    t = add("train", "train a bundled Fashion-MNIST teacher (cached; --output saves it with cdfast.save)", cmd_train)
    t.add_argument("model", type=_bundled_name, help="resnet20, resnet56, vgg_small, vgg16, small_cnn …")
    t.add_argument("--epochs", type=positive_int, default=3, help="passes over the 60,000 training images")
    t.add_argument("--seed", type=nonneg_int, default=0, help="seed of the initialisation and the data order")
    t.add_argument("--max-train", type=positive_int, default=None, help="train on a random subset of this many images")
    t.add_argument("--device", type=device, default="cpu", help="where to train")
    t.add_argument("--output", default=None, help="also save the teacher here with cdfast.save (.safetensors)")

    e = add("experiment", "the paper's tables on Fashion-MNIST (rows appended as measured; rerun with the "
                          "same --out to resume)", cmd_experiment)
    e.add_argument("--models", type=_bundled_name, nargs="+", default=["resnet20"], help="bundled teachers")
    e.add_argument("--tasks", nargs="+", default=["channel"], choices=["channel", "weight", "w4", "w2"],
                   help="channel pruning, unstructured pruning, 4- or 2-bit weights")
    e.add_argument("--ks", nargs="+", type=positive_int, default=[1, 2, 5, 10], help="images per class")
    e.add_argument("--seeds", nargs="+", type=nonneg_int, default=[0, 1, 2], help="seeds of the image draws")
    e.add_argument("--methods", nargs="+", default=None,
                   help="run only these methods (default: every method of each task); nc, cross, soft or "
                        "auto may take options, e.g. auto+flip+shift+bias+bn (see cdfast.experiments.grid)")
    e.add_argument("--solver", default="exact", choices=solvers, help="per-layer solver")
    e.add_argument("--steps", type=positive_int, default=3000, help="iterations of adam/sgd per layer")
    e.add_argument("--epochs", type=positive_int, default=3, help="teacher training epochs")
    e.add_argument("--test-limit", type=positive_int, default=None, help="evaluate on the first N test images only")
    e.add_argument("--out", default=None, help="folder of results.csv, results.md and the plots "
                                               "(default: a new cdfast-runs/experiment-<time>)")

    st = add("study", "per-layer drift of cross vs nc against M/D", cmd_study)
    st.add_argument("--model", type=_bundled_name, default="resnet20", help="bundled teacher")
    st.add_argument("--epochs", type=positive_int, default=3, help="teacher training epochs")
    st.add_argument("--ks", nargs="+", type=positive_int, default=[1, 2, 5, 10], help="images per class")
    st.add_argument("--seeds", nargs="+", type=nonneg_int, default=[0, 1], help="seeds of the image draws")
    st.add_argument("--keep", type=fraction, default=0.5, help="fraction of input channels kept")
    st.add_argument("--mu", type=unit, default=0.9, help="weight of the correction term")
    st.add_argument("--held-out", type=positive_int, default=1000, help="test images the drift is measured on")
    st.add_argument("--out", default=None, help="output folder (default: a new cdfast-runs/study-<time>)")
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a bad argument (already printed in one line)
        return int(exc.code or 0)
    args.argv = argv
    args.resume_hint = "nothing to resume: rerun the command"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\ncdfast {args.command}: interrupted; {args.resume_hint}", file=sys.stderr)
        return 130
    except (CLIError, ValueError, TypeError, OSError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        print(f"cdfast {args.command}: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
