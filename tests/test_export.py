"""cdfast.save / cdfast.load: codes packed at their bit width, safetensors + JSON, a model that runs."""
import json
import math
import os
import struct
import sys
import types

import pytest
import torch
import torch.nn as nn

import cdfast
from cdfast.model.export import FORMAT, pack_codes, read_info, unpack_codes


def _header(path) -> dict:
    """The safetensors header: 8 bytes of length, then JSON (no pickle anywhere)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def _net(width=8):
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 5)).eval()


def _randomise_bn(model):
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


# ------------------------------------------------------------------ packing
@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_unpack_round_trip_at_every_width(bits):
    L = 2 ** (bits - 1) - 1
    g = torch.Generator().manual_seed(bits)
    n = 1237  # not a multiple of 8 codes
    codes = torch.randint(-L, L + 1, (n,), generator=g).to(torch.int8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n * bits / 8)
    assert torch.equal(unpack_codes(packed, bits, n), codes)


def test_four_bit_codes_are_two_per_byte_low_nibble_first():
    codes = torch.tensor([-7, 7, 0, 1], dtype=torch.int8)  # stored as c + 7: 0, 14, 7, 8
    assert pack_codes(codes, 4).tolist() == [0 | 14 << 4, 7 | 8 << 4]


def test_pack_rejects_codes_off_the_grid():
    with pytest.raises(ValueError, match="codes"):
        pack_codes(torch.tensor([8], dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([0], dtype=torch.int8), 9)
    with pytest.raises(ValueError, match="packed"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 4, 8)


# ------------------------------------------------------------------ float models
def test_float_model_round_trip_is_exact_and_pickle_free(tmp_path):
    model = _randomise_bn(_net())
    path = cdfast.save(model, tmp_path / "m.safetensors", info={"note": "hello"})
    header = _header(path)
    assert header["__metadata__"]["format"] == FORMAT
    structure = json.loads(header["__metadata__"]["structure"])
    assert structure["root"]["class"] == "torch.nn:Sequential"
    assert read_info(path) == {"note": "hello"}
    loaded = cdfast.load(path)
    assert type(loaded) is nn.Sequential and not loaded.training
    x = torch.randn(4, 3, 9, 7)
    assert torch.equal(loaded(x), model(x))
    for (n, a), (m, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n == m and a.dtype == b.dtype and torch.equal(a, b)


class Block(nn.Module):
    """A user's module class with plain attributes, a tied weight and a shared submodule."""

    def __init__(self, width=6, scale=0.5):
        super().__init__()
        self.scale, self.kinds, self.meta = scale, ("a", 1), {"depth": 2, "name": "x", "eps": float("inf")}
        self.conv = nn.Conv2d(width, width, 3, padding=1)
        self.act = nn.ReLU()
        self.same_act = self.act
        self.register_buffer("offset", torch.randn(1, width, 1, 1), persistent=False)
        self.head = nn.Linear(width, width)
        self.head2 = nn.Linear(width, width)
        self.head2.weight = self.head.weight

    def forward(self, x):
        y = self.same_act(self.conv(x) + self.offset) * self.scale
        return self.head2(self.head(y.mean((2, 3))))


def test_user_class_attributes_ties_and_shared_modules_survive(tmp_path):
    model = Block().eval()
    loaded = cdfast.load(cdfast.save(model, tmp_path / "b.safetensors"))
    assert type(loaded) is Block
    assert loaded.kinds == ("a", 1) and loaded.meta == {"depth": 2, "name": "x", "eps": float("inf")}
    assert loaded.same_act is loaded.act and loaded.head2.weight is loaded.head.weight
    assert "offset" in loaded._non_persistent_buffers_set
    x = torch.randn(2, 6, 5, 5)
    assert torch.equal(loaded(x), model(x))


def test_float64_model_keeps_its_dtype(tmp_path):
    model = _net().double()
    loaded = cdfast.load(cdfast.save(model, tmp_path / "d.safetensors"))
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    assert loaded[0].weight.dtype == torch.float64 and torch.equal(loaded(x), model(x))


# ------------------------------------------------------------------ compressed models
@pytest.fixture(scope="module")
def resnet20_w4(tmp_path_factory):
    """The shipped ResNet-20 teacher, 4-bit per-channel weights (first conv and classifier
    kept in float32, as the experiments do), and both saved."""
    from cdfast.experiments.train import shipped_teacher

    teacher, _ = shipped_teacher()
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    student, report = cdfast.compress(teacher, x, compression=cdfast.Quantize(4), solver="exact",
                                      policy="skip_first", progress=False, verbose=False)
    d = tmp_path_factory.mktemp("w4")
    return teacher, student, report, cdfast.save(teacher, d / "teacher.safetensors"), \
        cdfast.save(student, d / "w4.safetensors", report)


def test_w4_resnet20_is_six_times_smaller_and_loads_to_the_same_outputs(resnet20_w4, tmp_path):
    teacher, student, report, teacher_file, w4_file = resnet20_w4
    convs = [n for n, m in teacher.named_modules() if isinstance(m, nn.Conv2d)]
    assert sorted(report.quantized) == sorted(convs[1:])  # every conv but the first
    ratio = os.path.getsize(teacher_file) / os.path.getsize(w4_file)
    assert ratio >= 6.0, ratio
    torch.save(teacher.state_dict(), tmp_path / "teacher.pt")  # the same against a plain float32 state dict
    assert os.path.getsize(tmp_path / "teacher.pt") / os.path.getsize(w4_file) >= 6.0
    header = _header(w4_file)
    codes = header["blocks.0.conv2.weight.__codes"]
    assert codes["dtype"] == "U8" and codes["shape"] == [16 * 16 * 9 // 2]  # two codes per byte
    assert "blocks.0.conv2.weight" not in header
    loaded = cdfast.load(w4_file)
    x = torch.randn(8, 1, 28, 28)
    assert torch.equal(loaded(x), student(x))
    for name, q in report.quantized.items():  # the weights are the dequantized codes, bit for bit
        w = loaded.get_submodule(name).weight
        assert torch.equal(w, student.get_submodule(name).weight)
        L = 2 ** (q["bits"] - 1) - 1
        assert torch.equal(w, (q["codes"].double() * (q["scale"] / L).double().view(-1, 1, 1, 1)).float())


def test_quantized_weights_changed_after_compress_are_refused(resnet20_w4, tmp_path):
    _, student, report, _, _ = resnet20_w4
    import copy

    changed = copy.deepcopy(student)
    with torch.no_grad():
        changed.blocks[2].conv1.weight[3, 0, 0, 0] += 1e-3
    with pytest.raises(ValueError, match="blocks.2.conv1.*grid"):
        cdfast.save(changed, tmp_path / "x.safetensors", report)
    cdfast.save(changed, tmp_path / "x.safetensors")  # as floats it is fine


def test_channel_pruned_and_quantized_is_saved_as_the_smaller_network(tmp_path):
    torch.manual_seed(0)
    teacher = _randomise_bn(_net(width=12))
    x = torch.randn(24, 3, 10, 10)
    student, report = cdfast.compress(teacher, x, compression=[cdfast.ChannelPrune(0.5), cdfast.Quantize(3)],
                                      solver="exact", policy="skip_first", progress=False, verbose=False)
    assert "removed" in report.shrink.values()
    # a quantized producer lost output rows, a quantized consumer input columns
    assert student[0].out_channels < 12 and student[3].in_channels < 12 and "3" in report.quantized
    path = cdfast.save(student, tmp_path / "p.safetensors", report)
    loaded = cdfast.load(path)
    assert [p.shape for p in loaded.parameters()] == [p.shape for p in student.parameters()]
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in teacher.parameters())
    xt = torch.randn(3, 3, 10, 10)
    assert torch.equal(loaded(xt), student(xt))
    # into the user's own (unpruned) architecture: the pruned layers are replaced by the saved ones
    into = cdfast.load(path, model=lambda: _net(width=12))
    assert torch.equal(into(xt), student(xt)) and into[3].in_channels == student[3].in_channels


# ------------------------------------------------------------------ what cannot be rebuilt
class WithFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 1)
        self.activation = torch.tanh  # a function: not saved

    def forward(self, x):
        return self.activation(self.conv(x))


def test_unsaved_attributes_warn_and_load_needs_the_architecture(tmp_path):
    model = WithFunction()
    with pytest.warns(UserWarning, match="activation"):
        path = cdfast.save(model, tmp_path / "f.safetensors")
    with pytest.raises(ValueError, match="model="):
        cdfast.load(path)
    loaded = cdfast.load(path, model=WithFunction)
    x = torch.randn(1, 2, 4, 4)
    assert torch.equal(loaded(x), model(x))
    with pytest.raises(ValueError, match="model"):
        cdfast.load(path, model=nn.Sequential(nn.Conv2d(2, 3, 1)))


def test_load_never_imports_a_module_the_file_names(tmp_path):
    mod = types.ModuleType("cdfast_test_not_imported")
    exec("import torch.nn as nn\nclass Net(nn.Sequential):\n    pass\n", mod.__dict__)
    sys.modules[mod.__name__] = mod
    try:
        path = cdfast.save(mod.Net(nn.Linear(2, 2)), tmp_path / "n.safetensors")
    finally:
        del sys.modules[mod.__name__]
    with pytest.raises(ValueError, match="cdfast_test_not_imported.*not imported"):
        cdfast.load(path)
    sys.modules[mod.__name__] = mod  # once the user imports it, it loads
    try:
        assert type(cdfast.load(path)) is mod.Net
    finally:
        del sys.modules[mod.__name__]


def test_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="model"):
        cdfast.save("not a model", tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="path.*does not exist"):
        cdfast.save(_net(), tmp_path / "missing" / "x.safetensors")
    with pytest.raises(ValueError, match="path.*folder"):
        cdfast.save(_net(), tmp_path)
    with pytest.raises(TypeError, match="report"):
        cdfast.save(_net(), tmp_path / "x.safetensors", report={"a": 1})
    with pytest.raises(FileNotFoundError, match="path"):
        cdfast.load(tmp_path / "nothing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="path"):
        cdfast.load(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a cdfast model file"):
        cdfast.load(tmp_path / "plain.safetensors")


def test_a_damaged_or_hostile_structure_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    cases = {"empty": "{}",
             "dtype": '{"classes": {}, "root": {"class": "torch.nn:Linear"}, "unsaved": [], '
                      '"quantized": {"weight": {"bits": 4, "shape": [2], "dtype": "load"}}}',
             "class": '{"classes": {}, "root": {"class": "os:system"}, "unsaved": [], "quantized": {}}'}
    for name, structure in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({"weight.__codes": torch.zeros(1, dtype=torch.uint8), "weight.__step": torch.ones(1)}, str(path),
                  metadata={"format": FORMAT, "structure": structure, "info": "{}"})
        with pytest.raises(ValueError, match="path"):
            cdfast.load(path)
