"""Data for the experiments: Fashion-MNIST, few-shot subsets and test fixtures.

* :func:`load_fashion_mnist` reads the IDX files shipped by the Debian package
  ``dataset-fashion-mnist`` (gzipped or not) with a small parser of our own
  (:func:`read_idx`); nothing is ever downloaded.
* :func:`few_shot` draws K samples per class, reproducibly for a seed.
* :func:`batches` cuts a dataset into in-order ``(x, y)`` batches (for the
  calibration passes of the layer-wise solvers).
* :func:`synthetic_images` is a small deterministic labelled image set for tests.
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "DEFAULT_FASHION_MNIST_ROOT",
    "FASHION_MNIST_CLASSES",
    "read_idx",
    "load_fashion_mnist",
    "clear_cache",
    "few_shot",
    "batches",
    "synthetic_images",
]

#: Fixed normalisation of Fashion-MNIST pixels (scaled to [0, 1] first).
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

#: Where ``apt-get install dataset-fashion-mnist`` puts the files.
DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension
_GZIP_MAGIC = b"\x1f\x8b"

_SPLIT_PREFIX = {"train": "train", "test": "t10k", "t10k": "t10k"}

# (images file, labels file) identities -> (normalised images, labels); see load_fashion_mnist.
_CACHE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


# --------------------------------------------------------------------------- IDX


def read_idx(path: str | os.PathLike, expected_magic: int | None = None) -> np.ndarray:
    """Parse one IDX file (gzipped or raw, detected from its first bytes).

    The IDX header is a 32-bit big-endian magic number ``0x0000TTDD`` (``TT`` the
    element type code, ``DD`` the number of dimensions), then ``DD`` big-endian
    32-bit sizes, then the data in row-major order.

    Args:
        path: the file.
        expected_magic: when given, the magic number the file must carry (e.g.
            ``0x803`` for ubyte images, ``0x801`` for ubyte labels).

    Returns:
        A native-endian numpy array of the stored shape.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: bad magic number, unknown type code, or a truncated/oversized body.
    """
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(2)
        f.seek(0)
        raw = gzip.decompress(f.read()) if head == _GZIP_MAGIC else f.read()
    if len(raw) < 4:
        raise ValueError(f"path: {path} is too short to be an IDX file ({len(raw)} bytes)")
    (magic,) = struct.unpack(">I", raw[:4])
    if expected_magic is not None and magic != expected_magic:
        raise ValueError(f"path: {path} has IDX magic number {magic:#010x}, "
                         f"expected {expected_magic:#010x}")
    if magic >> 16 != 0:
        raise ValueError(f"path: {path} has magic number {magic:#010x}; an IDX file starts "
                         f"with two zero bytes")
    code, ndim = (magic >> 8) & 0xFF, magic & 0xFF
    if code not in _IDX_DTYPES:
        raise ValueError(f"path: {path} has unknown IDX type code {code:#04x} "
                         f"(magic {magic:#010x})")
    if ndim == 0:
        raise ValueError(f"path: {path} declares 0 dimensions (magic {magic:#010x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"path: {path} is truncated inside its IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"path: {path} holds {len(raw) - header} data bytes, its header "
                         f"{tuple(shape)} of {dtype.name} needs {expected}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=True)


# --------------------------------------------------------------- Fashion-MNIST


def _find(root: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        p = root / name
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found in {root}. Install it with "
        f"`apt-get install dataset-fashion-mnist` (files go to {DEFAULT_FASHION_MNIST_ROOT}), "
        f"or pass root= / set CDFAST_FASHION_MNIST to the folder holding the IDX files.")


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> TensorDataset:
    """Fashion-MNIST as a ``TensorDataset`` of ``(image, label)``.

    Images are float32 of shape ``N×1×28×28``, scaled to [0, 1] and normalised with
    the fixed mean/std (0.2860, 0.3530); labels are int64 in 0…9. The parsed
    tensors are cached in memory per file pair (see :func:`clear_cache`), so repeated
    calls are cheap; the returned datasets share that storage, so do not modify
    their tensors in place.

    Args:
        split: ``"train"`` (60 000 images) or ``"test"`` (alias ``"t10k"``, 10 000).
        root: folder holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``.
            Default: ``$CDFAST_FASHION_MNIST`` if set, else
            ``/usr/share/datasets/fashion-mnist``.

    Raises:
        TypeError/ValueError: bad ``split`` or ``root``.
        FileNotFoundError: the files are missing (the message says how to get them).
    """
    if not isinstance(split, str):
        raise TypeError(f"split: expected a str, got {type(split).__name__}")
    if split not in _SPLIT_PREFIX:
        raise ValueError(f"split: expected 'train' or 'test', got {split!r}")
    if root is None:
        root = os.environ.get("CDFAST_FASHION_MNIST") or DEFAULT_FASHION_MNIST_ROOT
    elif not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root: expected a path (str or os.PathLike), got {type(root).__name__}")
    root = Path(root).expanduser()
    prefix = _SPLIT_PREFIX[split]
    img_path = _find(root, f"{prefix}-images-idx3-ubyte")
    lbl_path = _find(root, f"{prefix}-labels-idx1-ubyte")
    key = tuple((str(p.resolve()), p.stat().st_mtime_ns, p.stat().st_size)
                for p in (img_path, lbl_path))  # a rewritten file is parsed again
    cached = _CACHE.get(key)
    if cached is None:
        images = read_idx(img_path, _IDX_IMAGES_MAGIC)
        labels = read_idx(lbl_path, _IDX_LABELS_MAGIC)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(f"root: {img_path.name} has {images.shape[0]} images but "
                             f"{lbl_path.name} has {labels.shape[0]} labels")
        x = torch.from_numpy(images).unsqueeze(1).to(torch.float32)
        x.div_(255.0).sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
        y = torch.from_numpy(labels).to(torch.int64)
        cached = _CACHE[key] = (x, y)
    return TensorDataset(*cached)


def clear_cache() -> None:
    """Forget the parsed Fashion-MNIST tensors held by :func:`load_fashion_mnist`."""
    _CACHE.clear()


# ----------------------------------------------------------------- few-shot


def _check_int(name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
    if v < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {v}")
    return int(v)


def _label(y) -> int:
    if isinstance(y, torch.Tensor):
        if y.numel() != 1:
            raise ValueError(f"dataset: expected scalar labels, got a label of shape {tuple(y.shape)}")
        return int(y.item())
    return int(y)


def _as_x(x) -> torch.Tensor:
    return x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))


def _split_item(item, name: str):
    if not isinstance(item, (tuple, list)) or len(item) < 2:
        raise TypeError(f"{name}: expected items (x, label), got {type(item).__name__}")
    return item[0], item[1]


def _materialise(dataset, name: str = "dataset") -> tuple[torch.Tensor, torch.Tensor]:
    """All of ``dataset`` as two tensors ``(x, y)`` (labels int64), in order."""
    if isinstance(dataset, TensorDataset):
        if len(dataset.tensors) < 2:
            raise TypeError(f"{name}: expected a TensorDataset of (x, labels), "
                            f"got {len(dataset.tensors)} tensor(s)")
        return dataset.tensors[0], dataset.tensors[1].to(torch.int64)
    if isinstance(dataset, DataLoader):
        xs, ys = [], []
        for item in dataset:
            x, y = _split_item(item, name)
            x, y = _as_x(x), torch.as_tensor(y)
            xs.append(x)
            ys.append(y.reshape(-1).to(torch.int64))
        if not xs:
            raise ValueError(f"{name}: the DataLoader yielded no batches")
        return torch.cat(xs), torch.cat(ys)
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"{name}: expected a map-style dataset (with __len__ and __getitem__) "
                        f"or a DataLoader, got {type(dataset).__name__}")
    n = len(dataset)
    if n == 0:
        raise ValueError(f"{name}: is empty")
    xs, ys = [], []
    for i in range(n):
        x, y = _split_item(dataset[i], name)
        xs.append(_as_x(x))
        ys.append(_label(y))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64)


def _labels_and_getter(dataset):
    """Labels of a map-style dataset without keeping every x in memory."""
    if isinstance(dataset, TensorDataset) or isinstance(dataset, DataLoader):
        x, y = _materialise(dataset)
        return y, lambda idx: x[idx]
    if not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
        raise TypeError(f"dataset: expected a map-style dataset (with __len__ and __getitem__) "
                        f"or a DataLoader, got {type(dataset).__name__}")
    n = len(dataset)
    ys = torch.tensor([_label(_split_item(dataset[i], "dataset")[1]) for i in range(n)],
                      dtype=torch.int64)

    def get(idx: torch.Tensor) -> torch.Tensor:
        return torch.stack([_as_x(_split_item(dataset[int(i)], "dataset")[0]) for i in idx])

    return ys, get


def few_shot(dataset, k: int, seed: int = 0, num_classes: int | None = None) -> TensorDataset:
    """K samples per class, drawn without replacement, reproducibly for ``seed``.

    Args:
        dataset: a map-style dataset whose items are ``(x, label)`` (a
            ``TensorDataset`` is read directly, without indexing item by item) or a
            ``DataLoader`` (iterated once; its own shuffling, if any, then affects
            which samples are drawn).
        k: samples per class, >= 1.
        seed: seed of the ``torch.Generator`` that picks the samples.
        num_classes: when given, the classes are ``0…num_classes−1`` and each must
            have at least ``k`` samples; when ``None``, the classes are the labels
            present in ``dataset``.

    Returns:
        A ``TensorDataset`` of ``num_classes·k`` samples ordered by class (class 0's
        k samples first), labels int64.

    Raises:
        TypeError/ValueError: bad arguments, or a class with fewer than ``k`` samples.
    """
    k = _check_int("k", k, 1)
    seed = _check_int("seed", seed, -(2 ** 63))
    if num_classes is not None:
        num_classes = _check_int("num_classes", num_classes, 1)
    labels, get = _labels_and_getter(dataset)
    if labels.numel() == 0:
        raise ValueError("dataset: is empty")
    if labels.min() < 0:
        raise ValueError(f"dataset: labels must be >= 0, found {int(labels.min())}")
    if num_classes is None:
        classes = torch.unique(labels).tolist()
    else:
        if labels.max() >= num_classes:
            raise ValueError(f"num_classes: {num_classes} but dataset has label {int(labels.max())}")
        classes = list(range(num_classes))
    counts = torch.bincount(labels, minlength=max(classes) + 1)
    short = {c: int(counts[c]) for c in classes if counts[c] < k}
    if short:
        raise ValueError(f"k: {k} samples per class requested, but class(es) "
                         f"{sorted(short)} have only {list(short.values())} sample(s)")
    g = torch.Generator().manual_seed(seed)
    picks = []
    for c in classes:
        idx = torch.nonzero(labels == c, as_tuple=False).flatten()
        picks.append(idx[torch.randperm(idx.numel(), generator=g)[:k]])
    idx = torch.cat(picks)
    return TensorDataset(get(idx).clone(), labels[idx].clone())


def batches(dataset, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``dataset`` cut into in-order ``(x, y)`` batches of ``batch_size`` (the last may be smaller).

    ``dataset`` is a map-style dataset of ``(x, label)`` items, a ``TensorDataset``
    (sliced, not copied) or a ``DataLoader`` (its batches are re-cut to ``batch_size``).
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    x, y = _materialise(dataset)
    return list(zip(x.split(batch_size), y.split(batch_size)))


# ------------------------------------------------------------------ synthetic


def synthetic_images(n: int, channels: int = 1, size: int = 28, num_classes: int = 10,
                     seed: int = 0) -> TensorDataset:
    """A small deterministic labelled image set for tests.

    Each class has a fixed random prototype image; a sample is its class's
    prototype plus unit Gaussian noise, so the set is learnable but not trivial.
    Labels are balanced (``n // num_classes`` or one more per class) in a seeded
    random order. Images are float32 ``n×channels×size×size``, labels int64.
    """
    n = _check_int("n", n, 1)
    channels = _check_int("channels", channels, 1)
    size = _check_int("size", size, 1)
    num_classes = _check_int("num_classes", num_classes, 1)
    seed = _check_int("seed", seed, -(2 ** 63))
    g = torch.Generator().manual_seed(seed)
    prototypes = 2.0 * torch.randn(num_classes, channels, size, size, generator=g)
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
    x = prototypes[labels] + torch.randn(n, channels, size, size, generator=g)
    return TensorDataset(x, labels.to(torch.int64))
