"""Save a compressed network small, load it back as a model that runs.

``save(model, path, report)`` writes one `safetensors <https://huggingface.co/docs/safetensors>`_
file:

* **tensors** (safetensors, never a pickle): every parameter and buffer in its own
  dtype, except the weights of the layers ``report.quantized`` lists. Those are
  stored as their grid codes ``c ∈ [−L, L]`` (``L = 2^(B−1) − 1``, SPEC's B-bit grid
  ``s·{0, ±1/L, …, ±1}``) shifted to ``c + L ∈ [0, 2^B − 2]`` and **packed at B bits**
  (two 4-bit codes per byte, eight 3-bit codes in three bytes), plus one step
  ``s/L`` per output channel (or per layer);
* **structure** (JSON in the file's metadata): the module tree, each module's class
  (``module:qualname``), its plain attributes (numbers, strings, tuples, lists and
  dicts of those), and which parameters and buffers it holds. A channel-pruned
  network is saved as the smaller network it is: the structure records the shapes
  of the shrunk layers.

``load(path)`` rebuilds the tree (each class is taken from a module that is already
imported — a file never makes cdfast import anything — and restored without
running its ``__init__``), unpacks the codes, and sets each quantized weight to
``codes·(s/L)``: the same value, bit for bit, that :func:`cdfast.compress` left in the
student, so the loaded model's outputs equal the compressed model's.

``load(path, model=...)`` instead loads into the given architecture (an instance of
the uncompressed network or a zero-argument constructor): layers whose saved shapes
differ (pruned channels) are replaced by the saved ones, then every tensor is loaded
with ``load_state_dict(strict=True)``. Use it for models whose classes the rebuild
cannot restore.

Limits of the rebuild without ``model=``: the classes must be importable by name
(not defined inside a function) and their module imported before ``load``; module
attributes of other types (functions, tensors that are not buffers, modules held in
plain lists), hooks and parametrizations are not saved — ``save`` warns, naming them,
and ``load`` then asks for ``model=``.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import sys
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

__all__ = ["save", "load", "read_info", "pack_codes", "unpack_codes", "check_output_file", "FORMAT"]

#: The ``format`` entry of the file's metadata; ``load`` refuses other files.
FORMAT = "cdfast.model/1"

_BASE_ATTRS = frozenset(nn.Module().__dict__)  # what nn.Module.__init__ itself sets
_HOOK_ATTRS = tuple(a for a in _BASE_ATTRS if "hook" in a)
_CODES, _STEP = ".__codes", ".__step"


# ------------------------------------------------------------------ bit packing
def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer grid codes in ``[−L, L]`` → a uint8 tensor holding ``c + L`` at ``bits`` bits each.

    Little-endian bit order: code ``i`` occupies bits ``i·B … i·B + B − 1`` of the stream.
    """
    _check_bits(bits)
    L = 2 ** (bits - 1) - 1
    flat = codes.detach().reshape(-1).to(torch.int16).cpu()
    if flat.numel() and (int(flat.min()) < -L or int(flat.max()) > L):
        raise ValueError(f"codes: expected integers in [-{L}, {L}] for {bits} bits, "
                         f"got [{int(flat.min())}, {int(flat.max())}]")
    u = (flat + L).numpy().astype(np.uint8)
    bit_matrix = (u[:, None] >> np.arange(bits, dtype=np.uint8)) & 1
    return torch.from_numpy(np.packbits(bit_matrix.reshape(-1), bitorder="little"))


def unpack_codes(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``count`` int8 codes in ``[−L, L]``."""
    _check_bits(bits)
    need = math.ceil(count * bits / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise ValueError(f"packed: expected {need} uint8 bytes for {count} codes of {bits} bits, "
                         f"got {packed.numel()} of {packed.dtype}")
    bit_stream = np.unpackbits(packed.cpu().numpy(), count=count * bits, bitorder="little")
    weights = (1 << np.arange(bits, dtype=np.int16))
    u = (bit_stream.reshape(count, bits).astype(np.int16) * weights).sum(axis=1)
    L = 2 ** (bits - 1) - 1
    return torch.from_numpy((u - L).astype(np.int8))


def _check_bits(bits) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits: expected an int in 2..8, got {bits!r}")


# ------------------------------------------------------------------ quantized weights
def _dequantize(codes: torch.Tensor, step: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``codes·step`` rounded once to ``dtype``: how the library writes a grid weight.

    ``step`` (``s/L``) is kept in the dtype the solver computed it in; a product of a
    code (|c| ≤ 127) and a float32 step is exact in float64, so this reproduces both
    a float32 and a float64 solve bit for bit.
    """
    rows = codes.shape[0]
    s = step.to(torch.float64).reshape(-1, *([1] * (codes.dim() - 1)))
    if s.shape[0] not in (1, rows):
        raise ValueError(f"step: {s.shape[0]} values for {rows} rows")
    return (codes.to(torch.float64) * s).to(dtype)


def _grid_codes(name: str, weight: torch.Tensor, scale: torch.Tensor, bits: int):
    """The codes and per-row steps that reproduce ``weight`` exactly on its reported grid.

    ``scale`` is the layer's grid scale from the compression report, one value per
    output channel of the layer *as it was solved*; channel surgery may since have
    removed output rows (a producer of pruned channels) or input columns. Each row of
    ``weight`` is matched to the step that reproduces it bit for bit, trying its own
    index first.
    """
    L = 2 ** (bits - 1) - 1
    W = weight.detach().cpu()
    rows = W.shape[0]
    steps = (scale.detach().cpu().reshape(-1) / L)  # in the solver's dtype, as the library computes it
    if steps.numel() == 0 or not bool(torch.isfinite(steps).all()) or bool((steps <= 0).any()):
        raise ValueError(f"report: the grid scale of {name!r} is not a positive finite tensor")
    W2 = W.reshape(rows, -1)

    def fits(w_rows: torch.Tensor, s: torch.Tensor):
        c = torch.round(w_rows.to(torch.float64) / s.to(torch.float64).reshape(-1, 1))
        ok = (c.abs() <= L).all(dim=1) & (_dequantize(c, s, W.dtype) == w_rows).all(dim=1)
        return c, ok

    codes = torch.empty(W2.shape, dtype=torch.float64)
    row_steps = torch.empty(rows, dtype=steps.dtype)
    if steps.numel() == 1:
        c, ok = fits(W2, steps.expand(rows))
        codes, row_steps = c, steps.expand(rows).clone()
        bad = (~ok).nonzero().flatten().tolist()
    else:
        bad = list(range(rows))
        if steps.numel() == rows:
            c, ok = fits(W2, steps)
            codes[ok], row_steps[ok] = c[ok], steps[ok]
            bad = (~ok).nonzero().flatten().tolist()
        for i in bad[:]:
            c, ok = fits(W2[i].expand(steps.numel(), -1), steps)
            hit = ok.nonzero().flatten()
            if hit.numel():
                j = int(hit[0])
                codes[i], row_steps[i] = c[j], steps[j]
                bad.remove(i)
    if bad:
        raise ValueError(f"model: the weight of {name!r} is not on the {bits}-bit grid the report gives "
                         f"for it (rows {bad[:5]}{'…' if len(bad) > 5 else ''}); was it changed after "
                         "compress (fold_bn, fine-tuning)? Save it without the report to store floats")
    return codes.to(torch.int8).reshape(W.shape), row_steps


# ------------------------------------------------------------------ structure
def _encode(value, where: str, unsaved: list[str]):
    """A plain attribute → JSON (tuples, dtypes and non-finite floats tagged)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, (tuple, list)):
        items = [_encode(v, f"{where}[{i}]", unsaved) for i, v in enumerate(value)]
        return {"tuple": items} if isinstance(value, tuple) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, f"{where}[{k!r}]", unsaved) for k, v in value.items()}}
    unsaved.append(f"{where} ({type(value).__name__})")
    return {"unsaved": type(value).__name__}


def _decode(value):
    if isinstance(value, list):
        return [_decode(v) for v in value]
    if isinstance(value, dict):
        if "tuple" in value:
            return tuple(_decode(v) for v in value["tuple"])
        if "dict" in value:
            return {k: _decode(v) for k, v in value["dict"].items()}
        if "float" in value:
            return float(value["float"])
        if "dtype" in value:
            return _dtype(value["dtype"])
        raise ValueError(f"path: the file's structure holds an attribute that was not saved ({value})")
    return value


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"path: the file names an unknown dtype {name!r}")
    return dtype


def _describe(model: nn.Module):
    """The module tree as JSON-ready dicts, the tensors to store, and what cannot be rebuilt.

    A node is ``{"class": "module:qualname", "attrs": {...}, "params": {name: requires_grad},
    "buffers": {name: persistent}, "children": {name: node}}`` (empty entries left out;
    ``"training"`` only where it differs from the parent). A tensor is stored under its
    state-dict name; a parameter or buffer tied to an earlier one is ``{"ref": name}``,
    a module met before is ``{"ref": path}``, and ``None`` slots are ``null``.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen_modules: dict[int, str] = {}
    seen_tensors: dict[int, str] = {}
    unsaved: list[str] = []

    def tensor_entry(key: str, t: torch.Tensor | None, flag: bool):
        if t is None:
            return None
        if id(t) in seen_tensors:  # tied weights are stored once
            return {"ref": seen_tensors[id(t)], "flag": flag}
        seen_tensors[id(t)] = key
        tensors[key] = t
        return flag

    def visit(m: nn.Module, path: str, parent_training: bool | None) -> dict:
        if id(m) in seen_modules:
            return {"ref": seen_modules[id(m)]}
        seen_modules[id(m)] = path
        cls = type(m)
        where = path or "<root>"
        if "<locals>" in cls.__qualname__:
            unsaved.append(f"{where}: class {cls.__qualname__} is defined inside a function")
        for k in _HOOK_ATTRS:
            if getattr(m, k, None):
                unsaved.append(f"{where}: {k} (hooks are not saved)")
        pre = f"{path}." if path else ""
        node: dict = {"class": _class_name(cls)}
        if m.training != parent_training:
            node["training"] = m.training
        attrs = {k: _encode(v, f"{where}.{k}", unsaved) for k, v in m.__dict__.items() if k not in _BASE_ATTRS}
        params = {n: tensor_entry(pre + n, p, p is not None and p.requires_grad) for n, p in m._parameters.items()}
        buffers = {n: tensor_entry(pre + n, b, n not in m._non_persistent_buffers_set)
                   for n, b in m._buffers.items()}
        children = {n: (visit(c, pre + n, m.training) if c is not None else None) for n, c in m._modules.items()}
        for k, v in (("attrs", attrs), ("params", params), ("buffers", buffers), ("children", children)):
            if v:
                node[k] = v
        return node

    root = visit(model, "", None)
    return root, tensors, unsaved


def _factor_attrs(root: dict) -> dict:
    """Move attributes shared with the first module of the same class into one table.

    Returns ``{class: attrs of its first module}``; each node keeps only the
    attributes that differ (``"attrs"``) and the names it lacks (``"unset"``). A
    ResNet-20's structure shrinks from 16 kB to a few: it matters at 4 bits.
    """
    classes: dict[str, dict] = {}
    for _, node, _ in _walk(root):
        full = node.pop("attrs", {})
        base = classes.setdefault(node["class"], full)
        same = lambda k: k in base and json.dumps(base[k]) == json.dumps(full[k])  # noqa: E731 (True != 1)
        diff = {k: v for k, v in full.items() if not same(k)}
        unset = [k for k in base if k not in full]
        if diff:
            node["attrs"] = diff
        if unset:
            node["unset"] = unset
    return classes


def _expand_attrs(root: dict, classes: dict) -> None:
    """Inverse of :func:`_factor_attrs`, in place."""
    for _, node, _ in _walk(root):
        base = classes.get(node["class"], {})
        unset = set(node.pop("unset", ()))
        node["attrs"] = {**{k: v for k, v in base.items() if k not in unset}, **node.get("attrs", {})}


def _class_name(cls: type) -> str:
    """``module:qualname``; torch.nn's layers by their public name (``torch.nn:Conv2d``)."""
    if cls.__module__.startswith("torch.nn.") and getattr(nn, cls.__qualname__, None) is cls:
        return f"torch.nn:{cls.__qualname__}"
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(spec: str) -> type:
    module, _, qualname = spec.partition(":")
    mod = sys.modules.get(module)
    if mod is None:
        if module.split(".")[0] != "torch":
            raise ValueError(f"path: the model's class {qualname} is defined in {module}, which is not imported; "
                             f"import {module} first (load never imports what a file names) or pass model=")
        mod = importlib.import_module(module)  # a part of torch itself
    obj = mod
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"path: {module} has no class {qualname}; pass model=")
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ValueError(f"path: {spec} is not an nn.Module class")
    return obj


def _entries(node: dict, kind: str, path: str):
    """``(name, state-dict key or None, flag)`` of a node's parameters or buffers."""
    pre = f"{path}." if path else ""
    for n, e in node.get(kind, {}).items():
        if e is None:
            yield n, None, False
        elif isinstance(e, dict):
            yield n, e["ref"], bool(e["flag"])
        else:
            yield n, pre + n, bool(e)


def _build(node: dict, tensors: dict, built: dict, path: str = "", parent_training: bool = False) -> nn.Module:
    """Rebuild one saved module (and its children); ``built`` maps paths and tensor keys
    to what was already made, so shared modules and tied parameters stay shared."""
    if "ref" in node:
        return built[node["ref"]]
    cls = _resolve_class(node["class"])
    m = cls.__new__(cls)
    nn.Module.__init__(m)
    m.__dict__.update({k: _decode(v) for k, v in node.get("attrs", {}).items()})
    m.training = bool(node.get("training", parent_training))
    built[path] = m
    for n, key, grad in _entries(node, "params", path):
        if key is not None and ("param", key) not in built:
            built["param", key] = nn.Parameter(_tensor(key, tensors), requires_grad=grad)
        m._parameters[n] = None if key is None else built["param", key]
    for n, key, persistent in _entries(node, "buffers", path):
        m._buffers[n] = None if key is None else _tensor(key, tensors)
        if key is not None and not persistent:
            m._non_persistent_buffers_set.add(n)
    pre = f"{path}." if path else ""
    for n, child in node.get("children", {}).items():
        m._modules[n] = None if child is None else _build(child, tensors, built, pre + n, m.training)
    return m


def _tensor(key: str, tensors: dict) -> torch.Tensor:
    if key not in tensors:
        raise ValueError(f"path: the file names a tensor {key!r} it does not hold")
    return tensors[key]


def _walk(node: dict, path: str = "", training: bool = False):
    """``(path, node, training)`` of every saved module, shared ones once."""
    training = bool(node.get("training", training))
    yield path, node, training
    pre = f"{path}." if path else ""
    for n, child in node.get("children", {}).items():
        if child is not None and "ref" not in child:
            yield from _walk(child, pre + n, training)


# ------------------------------------------------------------------ save / load
def save(model: nn.Module, path: str | os.PathLike, report=None, *,
         info: dict[str, str] | None = None) -> Path:
    """Write ``model`` to ``path`` (a safetensors file); returns the path.

    Args:
        model: the network, e.g. the student :func:`cdfast.compress` returned (any
            ``nn.Module``; channel-pruned layers are saved at their shrunk size).
        path: the file to write (``.safetensors`` by convention); its folder must exist.
            Written atomically: an interrupted save leaves no partial file.
        report: the :class:`~cdfast.model.compress.CompressionReport` of ``compress``.
            Its ``quantized`` layers are stored as codes packed at their bit width and
            one step per output channel; without it every weight is stored as it is.
        info: extra text to record (e.g. how the model was trained); :func:`read_info`
            returns it.

    Raises:
        TypeError/ValueError: bad arguments, or a quantized layer whose weight is not on
        the grid its report gives (it was changed after ``compress``).
    """
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    path = check_output_file(path)
    if info is not None and (not isinstance(info, dict)
                             or not all(isinstance(k, str) and isinstance(v, str) for k, v in info.items())):
        raise TypeError("info: expected a dict of str to str")
    quantized = _report_quantized(report)
    root, tensors, unsaved = _describe(model)
    out: dict[str, torch.Tensor] = {}
    packed: dict[str, dict] = {}
    for name, q in quantized.items():
        key = f"{name}.weight" if name else "weight"
        if key not in tensors:
            raise ValueError(f"report: names a quantized layer {name!r} that the model does not have "
                             "(pass the report of this model's compress)")
        w = tensors[key]
        codes, steps = _grid_codes(name, w, q["scale"], int(q["bits"]))
        packed[key] = {"bits": int(q["bits"]), "shape": list(w.shape), "dtype": str(w.dtype).removeprefix("torch.")}
        out[key + _CODES] = pack_codes(codes, int(q["bits"]))
        out[key + _STEP] = steps.contiguous()
    for key, t in tensors.items():
        if key not in packed:
            out[key] = t.detach().cpu().contiguous().clone()  # clone: safetensors refuses shared storage
    if unsaved:
        warnings.warn(f"cdfast.save: {path} can be loaded only with load(path, model=...): "
                      + "; ".join(unsaved[:5]) + ("; …" if len(unsaved) > 5 else ""), UserWarning, stacklevel=2)
    meta = {"format": FORMAT,
            "structure": json.dumps({"classes": _factor_attrs(root), "root": root, "quantized": packed,
                                     "unsaved": unsaved},
                                    separators=(",", ":"), allow_nan=False),
            "info": json.dumps(info or {}, separators=(",", ":"))}
    tmp = str(path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp"))
    try:
        save_file(out, tmp, metadata=meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes 0600; a saved model is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load(path: str | os.PathLike, model: nn.Module | Callable[[], nn.Module] | None = None, *,
         device: str | torch.device = "cpu") -> nn.Module:
    """The network :func:`save` wrote to ``path``, on ``device``, with dequantized weights.

    Args:
        path: a file written by :func:`save`.
        model: ``None`` to rebuild the saved module tree (its classes must be
            importable and their modules imported), or the architecture to load into:
            an instance of the *uncompressed* network or a zero-argument callable
            returning one. Its layers whose saved shapes differ (pruned channels) are
            replaced by the saved layers.
        device: where the returned model's tensors live.

    Raises:
        FileNotFoundError: no such file; ValueError: not a cdfast model file, or a
        structure that cannot be rebuilt (the message says what to pass).
    """
    from safetensors import SafetensorError, safe_open

    p = Path(os.fspath(path)).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"path: no file {str(p)!r}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            raw = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"path: {str(p)!r} is not a safetensors file ({exc})") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: {str(p)!r} is not a cdfast model file (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    try:
        structure = json.loads(meta["structure"])
        tensors = {k: v for k, v in raw.items() if not k.endswith((_CODES, _STEP))}
        for key, q in structure["quantized"].items():
            shape = tuple(q["shape"])
            codes = unpack_codes(raw[key + _CODES], q["bits"], math.prod(shape)).reshape(shape)
            tensors[key] = _dequantize(codes, raw[key + _STEP], _dtype(q["dtype"]))
        root = structure["root"]
        _expand_attrs(root, structure["classes"])
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError) as exc:
        raise ValueError(f"path: {str(p)!r} has a damaged structure ({type(exc).__name__}: {exc})") from None
    if model is None:
        if structure["unsaved"]:
            raise ValueError(f"path: {str(p)!r} cannot be rebuilt without its architecture ("
                             + "; ".join(structure["unsaved"][:3]) + "); pass model=")
        try:
            net = _build(root, tensors, {}, "", False)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"path: {str(p)!r} has a damaged structure ({type(exc).__name__}: {exc})") from None
    else:
        net = _load_into(model, root, tensors)
    return net.to(device)


def read_info(path: str | os.PathLike) -> dict[str, str]:
    """The ``info`` text :func:`save` recorded in ``path``."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="pt", device="cpu") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: {os.fspath(path)!r} is not a cdfast model file")
    return json.loads(meta.get("info", "{}"))


def _load_into(model, root: dict, tensors: dict) -> nn.Module:
    net = model() if callable(model) and not isinstance(model, nn.Module) else model
    if not isinstance(net, nn.Module):
        raise TypeError(f"model: expected an nn.Module or a callable returning one, got {type(net).__name__}")
    from .surgery import replace_module

    saved = list(_walk(root))
    for path, node, training in saved:
        if not path:
            continue
        try:
            m = net.get_submodule(path)
        except AttributeError:
            raise ValueError(f"model: has no submodule {path!r}, which the file holds; pass the architecture "
                             "the file was saved from") from None
        if not _same_shapes(m, node, path, tensors):
            replace_module(net, path, _build(node, tensors, {}, path, training))
    state = {}
    for path, node, _ in saved:
        pre = f"{path}." if path else ""
        for kind in ("params", "buffers"):
            for n, key, flag in _entries(node, kind, path):
                if key is not None and (kind == "params" or flag):
                    state[pre + n] = _tensor(key, tensors)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"model: does not match the saved network ({exc})") from None
    for path, _, training in saved:
        net.get_submodule(path).training = training
    return net


def _same_shapes(m: nn.Module, node: dict, path: str, tensors: dict) -> bool:
    for kind, own in (("params", m._parameters), ("buffers", m._buffers)):
        for n, key, _ in _entries(node, kind, path):
            t = own.get(n)
            if (key is None) != (t is None) or (t is not None and t.shape != _tensor(key, tensors).shape):
                return False
    return True


def _report_quantized(report) -> dict:
    if report is None:
        return {}
    q = getattr(report, "quantized", None)
    if not isinstance(q, dict):
        raise TypeError(f"report: expected the CompressionReport of cdfast.compress, got {type(report).__name__}")
    for name, entry in q.items():
        if not isinstance(entry, dict) or not {"scale", "bits"} <= set(entry):
            raise ValueError(f"report: quantized[{name!r}] lacks its scale and bits")
    return q


def check_output_file(path, name: str = "path") -> Path:
    """``path`` as a file that can be written: not a folder, in a writable folder that exists.

    ``name`` is the argument as the user wrote it (``--output`` on the command line).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name}: expected a file path, got {type(path).__name__}")
    p = Path(os.fspath(path)).expanduser()
    if p.is_dir():
        raise ValueError(f"{name}: {str(p)!r} is a folder; expected a file name")
    if not p.parent.is_dir():
        raise ValueError(f"{name}: the folder {str(p.parent)!r} does not exist")
    if not os.access(p.parent, os.W_OK):
        raise ValueError(f"{name}: the folder {str(p.parent)!r} is not writable")
    return p
