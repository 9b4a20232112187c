"""Tests of cdfast.experiments.data, cdfast.experiments.models and cdfast.experiments.train.

Tests that need the real Fashion-MNIST files skip when they are absent
(``apt-get install dataset-fashion-mnist`` or set ``CDFAST_FASHION_MNIST``).
"""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from cdfast.experiments import data as cdata
from cdfast.experiments import train as ctrain
from cdfast.experiments.data import (FASHION_MNIST_MEAN, FASHION_MNIST_STD, batches, few_shot,
                         load_fashion_mnist, read_idx, synthetic_images)
from cdfast.experiments.models import (BasicBlock, ResNet, VGG, build_model, count_flops, count_parameters,
                           resnet, small_cnn, vgg)
from cdfast.experiments.train import evaluate, teacher_path, train_teacher

FMNIST_ROOT = Path(os.environ.get("CDFAST_FASHION_MNIST") or cdata.DEFAULT_FASHION_MNIST_ROOT)
HAVE_FMNIST = any((FMNIST_ROOT / f"train-images-idx3-ubyte{ext}").is_file() for ext in (".gz", ""))
needs_fmnist = pytest.mark.skipif(
    not HAVE_FMNIST, reason=f"Fashion-MNIST not found in {FMNIST_ROOT} "
                            f"(apt-get install dataset-fashion-mnist)")


# ----------------------------------------------------------------- IDX files


def write_idx(path: Path, array: np.ndarray, code: int = 0x08, magic: int | None = None,
              compress: bool = False) -> Path:
    """Write ``array`` as an IDX file (big-endian), optionally gzipped."""
    dtype = {0x08: ">u1", 0x0D: ">f4", 0x0C: ">i4"}[code]
    if magic is None:
        magic = (code << 8) | array.ndim
    raw = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += np.ascontiguousarray(array, dtype=dtype).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_roundtrip(tmp_path, compress):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    p = write_idx(tmp_path / "a.idx", a, compress=compress)
    out = read_idx(p, expected_magic=0x803)
    assert out.shape == (2, 3, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, a)


def test_read_idx_multibyte_is_native_endian(tmp_path):
    a = np.array([[1.5, -2.0], [3.25, 1e6]], dtype=np.float32)
    out = read_idx(write_idx(tmp_path / "f.idx", a, code=0x0D))
    assert out.dtype == np.float32 and out.dtype.isnative
    np.testing.assert_array_equal(out, a)
    b = np.array([1, -70000, 2 ** 30], dtype=np.int32)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "i.idx", b, code=0x0C)), b)


def test_read_idx_bad_magic(tmp_path):
    a = np.zeros((2, 2, 2), dtype=np.uint8)
    # labels magic where images are expected
    p = write_idx(tmp_path / "a.idx", a.reshape(-1), compress=True)
    with pytest.raises(ValueError, match="magic"):
        read_idx(p, expected_magic=0x803)
    # non-zero leading bytes
    p = write_idx(tmp_path / "b.idx", a, magic=0x12340803)
    with pytest.raises(ValueError, match="magic"):
        read_idx(p)
    # unknown type code
    p = write_idx(tmp_path / "c.idx", a, magic=0x00000703)
    with pytest.raises(ValueError, match="type code"):
        read_idx(p)


def test_read_idx_truncated(tmp_path):
    a = np.zeros((3, 4), dtype=np.uint8)
    p = write_idx(tmp_path / "t.idx", a)
    p.write_bytes(p.read_bytes()[:-1])
    with pytest.raises(ValueError, match="data bytes"):
        read_idx(p)


def fake_fashion_root(tmp_path: Path, n: int = 12, compress: bool = True) -> Path:
    """A folder of tiny Fashion-MNIST-named IDX files (random pixels, labels i % 10)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{'.gz' if compress else ''}",
                  rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), compress=compress)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{'.gz' if compress else ''}",
                  (np.arange(n) % 10).astype(np.uint8), compress=compress)
    return tmp_path


@pytest.mark.parametrize("compress", [False, True])
def test_load_fashion_mnist_from_root(tmp_path, compress):
    root = fake_fashion_root(tmp_path, compress=compress)
    ds = load_fashion_mnist("test", root=root)
    x, y = ds.tensors
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [i % 10 for i in range(12)]
    raw = read_idx(root / f"t10k-images-idx3-ubyte{'.gz' if compress else ''}")
    expect = (torch.from_numpy(raw).float() / 255 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    torch.testing.assert_close(x[:, 0], expect)
    # cached: the second call shares the parsed tensors
    assert load_fashion_mnist("test", root=root).tensors[0].data_ptr() == x.data_ptr()
    cdata.clear_cache()
    again = load_fashion_mnist("test", root=root).tensors[0]
    assert again.data_ptr() != x.data_ptr() and torch.equal(again, x)


def test_load_fashion_mnist_env_and_errors(tmp_path, monkeypatch):
    root = fake_fashion_root(tmp_path / "fm", n=10)
    monkeypatch.setenv("CDFAST_FASHION_MNIST", str(root))
    assert len(load_fashion_mnist("train")) == 10
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", root=root)
    with pytest.raises(TypeError, match="split"):
        load_fashion_mnist(0, root=root)
    (tmp_path / "bad").mkdir()
    write_idx(tmp_path / "bad" / "train-images-idx3-ubyte", np.zeros(5, np.uint8))  # 1-D: wrong magic
    write_idx(tmp_path / "bad" / "train-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(ValueError, match="magic"):
        load_fashion_mnist("train", root=tmp_path / "bad")


@needs_fmnist
def test_real_fashion_mnist():
    train = load_fashion_mnist("train")
    test = load_fashion_mnist("test")
    assert train.tensors[0].shape == (60000, 1, 28, 28)
    assert test.tensors[0].shape == (10000, 1, 28, 28)
    assert torch.bincount(train.tensors[1]).tolist() == [6000] * 10
    x = train.tensors[0]
    assert abs(float(x.mean())) < 0.01 and abs(float(x.std()) - 1.0) < 0.01


# ------------------------------------------------------------------ few-shot


def test_few_shot_counts_and_determinism():
    ds = synthetic_images(200, num_classes=5, size=8, seed=3)
    a = few_shot(ds, 3, seed=0)
    b = few_shot(ds, 3, seed=0)
    c = few_shot(ds, 3, seed=1)
    assert len(a) == 15
    assert torch.bincount(a.tensors[1]).tolist() == [3] * 5
    assert a.tensors[1].dtype == torch.int64
    torch.testing.assert_close(a.tensors[0], b.tensors[0], rtol=0, atol=0)
    assert not torch.equal(a.tensors[0], c.tensors[0])
    # the samples are distinct members of the dataset
    flat = ds.tensors[0].flatten(1)
    for x, y in zip(*a.tensors):
        hits = (flat == x.flatten()).all(1).nonzero().flatten()
        assert len(hits) == 1 and int(ds.tensors[1][hits[0]]) == int(y)
    assert len(torch.unique(a.tensors[0].flatten(1), dim=0)) == 15


def test_few_shot_same_for_any_dataset_kind():
    ds = synthetic_images(60, num_classes=3, size=6, seed=1)
    ref = few_shot(ds, 4, seed=7)
    as_list = [(x, int(y)) for x, y in zip(*ds.tensors)]
    loader = DataLoader(ds, batch_size=16, shuffle=False)
    for other in (few_shot(as_list, 4, seed=7), few_shot(loader, 4, seed=7)):
        assert torch.equal(other.tensors[0], ref.tensors[0])
        assert torch.equal(other.tensors[1], ref.tensors[1])


def test_few_shot_errors():
    ds = synthetic_images(30, num_classes=3, size=4)  # 10 per class
    with pytest.raises(ValueError, match="k"):
        few_shot(ds, 0)
    with pytest.raises(TypeError, match="k"):
        few_shot(ds, 2.5)
    with pytest.raises(ValueError, match="k"):
        few_shot(ds, 11)
    assert len(few_shot(ds, 10)) == 30
    # a class that is absent counts as having 0 samples when num_classes says it exists
    with pytest.raises(ValueError, match=r"\[3\]"):
        few_shot(ds, 1, num_classes=4)
    with pytest.raises(ValueError, match="num_classes"):
        few_shot(ds, 1, num_classes=2)
    with pytest.raises(TypeError, match="dataset"):
        few_shot(42, 1)


def test_batches_in_order():
    ds = synthetic_images(23, size=5)
    bs = batches(ds, 10)
    assert [len(y) for _, y in bs] == [10, 10, 3]
    assert torch.equal(torch.cat([x for x, _ in bs]), ds.tensors[0])
    assert torch.equal(torch.cat([y for _, y in bs]), ds.tensors[1])
    as_list = [(x, int(y)) for x, y in zip(*ds.tensors)]
    assert torch.equal(torch.cat([x for x, _ in batches(as_list, 7)]), ds.tensors[0])
    with pytest.raises(ValueError, match="batch_size"):
        batches(ds, 0)


def test_synthetic_images():
    a = synthetic_images(25, channels=3, size=32, num_classes=5, seed=4)
    b = synthetic_images(25, channels=3, size=32, num_classes=5, seed=4)
    assert a.tensors[0].shape == (25, 3, 32, 32) and a.tensors[0].dtype == torch.float32
    assert torch.equal(a.tensors[0], b.tensors[0]) and torch.equal(a.tensors[1], b.tensors[1])
    assert torch.bincount(a.tensors[1]).tolist() == [5] * 5
    assert not torch.equal(a.tensors[0], synthetic_images(25, 3, 32, 5, seed=5).tensors[0])
    with pytest.raises(ValueError, match="n"):
        synthetic_images(0)


# -------------------------------------------------------------------- models


@pytest.mark.parametrize("name", ["small_cnn", "vgg_small", "vgg16", "resnet20", "resnet56"])
@pytest.mark.parametrize("size,channels", [(28, 1), (32, 1), (32, 3)])
def test_model_output_shapes(name, size, channels):
    torch.manual_seed(0)
    m = build_model(name, in_channels=channels, num_classes=7).eval()
    with torch.no_grad():
        out = m(torch.randn(2, channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_resnet_structure():
    m = resnet(56)
    assert isinstance(m, ResNet)
    assert len(m.blocks) == 3 * 9 and m.stage_sizes == (9, 9, 9)
    assert [len(s) for s in m.stages] == [9, 9, 9]
    assert all(isinstance(b, BasicBlock) for b in m.blocks)
    with_proj = [i for i, b in enumerate(m.blocks) if b.downsample is not None]
    assert with_proj == [9, 18]
    b = m.blocks[9]
    assert (b.conv1.in_channels, b.conv1.out_channels, b.conv1.stride) == (16, 32, (2, 2))
    assert isinstance(b.bn1, nn.BatchNorm2d) and isinstance(b.bn2, nn.BatchNorm2d)
    assert b.conv2.in_channels == 32 and m.blocks[-1].conv2.out_channels == 64
    assert isinstance(m.stem[0], nn.Conv2d) and m.stem[0].in_channels == 1
    assert m.classifier.in_features == 64
    w = resnet(20, width=8)
    assert len(w.blocks) == 9 and w.blocks[-1].conv2.out_channels == 32
    with pytest.raises(ValueError, match="depth"):
        resnet(21)
    with pytest.raises(TypeError, match="depth"):
        resnet(20.0)


def test_vgg_structure():
    m = vgg("vgg16")
    assert isinstance(m, VGG) and len(m.features) == 13
    for block in m.features:
        assert isinstance(block, nn.Sequential)
        assert isinstance(block[0], nn.Conv2d) and isinstance(block[1], nn.BatchNorm2d)
        assert isinstance(block[2], nn.ReLU) and len(block) in (3, 4)
    assert sum(isinstance(b[-1], nn.MaxPool2d) for b in m.features) == 5
    half = vgg("vgg_small", width=0.5)
    assert [b[0].out_channels for b in half.features] == [16, 16, 32, 32, 64, 64]
    assert len(small_cnn().features) == 4
    with pytest.raises(ValueError, match="depth_cfg"):
        vgg("vgg11")
    with pytest.raises(ValueError, match="width"):
        vgg("vgg_small", width=0)
    with pytest.raises(ValueError, match="name"):
        build_model("resnet21")


def test_counts_tiny_model_by_hand():
    m = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1, bias=True),              # 4×4 -> 2×4×4
        nn.ReLU(),
        nn.Conv2d(2, 4, 3, stride=2, padding=1, groups=2, bias=False),  # -> 4×2×2
        nn.Flatten(),
        nn.Linear(16, 3),
    )
    # params: 2·1·9 + 2  +  4·1·9  +  16·3 + 3
    assert count_parameters(m) == 20 + 36 + 51
    # MACs: 32 outputs × 9  +  16 outputs × (2/2)·9  +  3 × 16
    assert count_flops(m, (1, 4, 4)) == 2 * (288 + 144 + 48)
    assert count_flops(m, (5, 1, 4, 4)) == 2 * (288 + 144 + 48)  # per sample
    m.train()
    count_flops(m, (1, 4, 4))
    assert m.training  # mode restored
    for p in m[0].parameters():
        p.requires_grad_(False)
    assert count_parameters(m, trainable_only=True) == 36 + 51
    with pytest.raises(ValueError, match="input_shape"):
        count_flops(m, (1, 0, 4))
    assert count_flops(m, (1, 1, 4, 4), batched=True) == 2 * (288 + 144 + 48)


def test_counts_and_compresses_a_model_on_flat_features():
    # an MLP reads (N, features): one sample's shape has rank 1, a sequence's rank 2
    mlp = nn.Sequential(nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
    assert count_flops(mlp, (7,)) == 2 * (7 * 6 + 6 * 3)
    assert count_flops(mlp, (1, 5, 7), batched=True) == 2 * 5 * (7 * 6 + 6 * 3)  # 5 positions of one sequence
    import cdfast
    torch.manual_seed(0)
    student, report = cdfast.compress(mlp, torch.randn(40, 7), compression=cdfast.ChannelPrune(0.5),
                                      policy="all", progress=False, verbose=False)
    assert report.flops_before == 2 * (7 * 6 + 6 * 3)
    assert report.flops_after == count_flops(student, (7,)) < report.flops_before


def test_counts_resnet20_by_hand():
    # He et al. ResNet-20 (1 input channel, 1×1 projection shortcuts): convs + BN + fc.
    convs = 1 * 16 * 9 + 6 * 16 * 16 * 9 + (16 * 32 * 9 + 5 * 32 * 32 * 9) + (32 * 64 * 9 + 5 * 64 * 64 * 9)
    proj = 16 * 32 + 32 * 64
    bn = 2 * (16 * 7 + 32 * 7 + 64 * 7)  # stem + 6 per stage + 1 projection per later stage
    fc = 64 * 10 + 10
    assert count_parameters(resnet(20)) == convs + proj + bn + fc
    # FLOPs on 32×32: stage resolutions 32, 16, 8.
    macs = (32 * 32 * 16 * 9
            + 6 * 32 * 32 * 16 * 16 * 9
            + 16 * 16 * (32 * 16 * 9 + 5 * 32 * 32 * 9 + 32 * 16)
            + 8 * 8 * (64 * 32 * 9 + 5 * 64 * 64 * 9 + 64 * 32)
            + 64 * 10)
    assert count_flops(resnet(20), (1, 32, 32)) == 2 * macs


# --------------------------------------------------------------------- train


def test_evaluate_constant_model():
    ds = synthetic_images(40, num_classes=4, size=4)

    class Always(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.c = c
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            out = torch.zeros(x.shape[0], 4)
            out[:, self.c] = 1
            return out

    assert evaluate(Always(2), ds, batch_size=7) == pytest.approx(25.0)
    assert evaluate(Always(2), DataLoader(ds, batch_size=9)) == pytest.approx(25.0)


def test_train_teacher_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="name"):
        train_teacher("alexnet", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="epochs"):
        train_teacher("small_cnn", epochs=0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="lr"):
        train_teacher("small_cnn", lr=-1.0, cache_dir=tmp_path)
    with pytest.raises(TypeError, match="model_name"):
        train_teacher(20, cache_dir=tmp_path)


def test_teacher_path_names(tmp_path):
    assert teacher_path("resnet20", 3, 0, tmp_path) == tmp_path / "resnet20-e3-s0.pt"
    assert teacher_path("resnet20", 2, 1, tmp_path, max_train=500).name == "resnet20-e2-s1-n500.pt"


def test_train_teacher_caches_and_reloads(tmp_path, monkeypatch):
    # A fake dataset root keeps this independent of the real files and fast.
    root = fake_fashion_root(tmp_path / "fm", n=80)
    cache = tmp_path / "cache"
    m1 = train_teacher("small_cnn", epochs=1, batch_size=32, max_train=64, cache_dir=cache,
                       root=root)
    path = cache / "small_cnn-e1-s0-b32-n64.pt"
    assert path.is_file()
    assert not [p for p in cache.iterdir() if p.name.endswith(".tmp")]
    assert not m1.training
    assert all(p.is_contiguous() for p in m1.parameters())
    state = torch.load(path, weights_only=True)
    assert set(state) == set(m1.state_dict())

    # The second call must load the cache, not train (the data loader would fail).
    def no_data(*a, **k):
        raise AssertionError("train_teacher retrained instead of loading the cache")

    monkeypatch.setattr(ctrain, "load_fashion_mnist", no_data)
    m2 = train_teacher("small_cnn", epochs=1, batch_size=32, max_train=64, cache_dir=cache)
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(m1(x), m2(x))
    # A corrupt cache file is reported, not silently used.
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(RuntimeError, match="delete it"):
        train_teacher("small_cnn", epochs=1, batch_size=32, max_train=64, cache_dir=cache)


@needs_fmnist
def test_train_teacher_real_data_learns(tmp_path):
    # 64 SGD steps on 2048 images: a few seconds on 2 idle cores.
    m = train_teacher("small_cnn", epochs=1, batch_size=32, max_train=2048, seed=0,
                      cache_dir=tmp_path)
    test = load_fashion_mnist("test")
    sub = TensorDataset(test.tensors[0][:1000], test.tensors[1][:1000])
    assert evaluate(m, sub) > 40.0  # chance is 10 %; about 70 % in practice
    assert (tmp_path / "small_cnn-e1-s0-b32-n2048.pt").is_file()
