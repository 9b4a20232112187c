"""pytest-benchmark view of the benchmark cases (smallest sizes, as ``--quick``).

    python -m pytest bench --benchmark-enable            # timed
    python -m pytest bench                               # each once, untimed (addopts disable)

The CSV with ratios, floors and losses comes from ``python -m bench.run``; this file
lets the same cases be compared across commits with pytest-benchmark's tooling
(``--benchmark-autosave``, ``--benchmark-compare``).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import cases as C  # noqa: E402
from bench import harness as H  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LAYER_CASES = C.layer_cases(DEVICE.type, quick=True)
PARAMS = [pytest.param(case, impl, id=f"{case.name}:{impl}") for case in LAYER_CASES for impl in case.impls]


@pytest.mark.parametrize("case,impl", PARAMS)
def test_layer(benchmark, case, impl):
    prep = C.prepare(case, DEVICE)
    if impl == "cdfast_solver":
        prep.statistics()
    if impl == "reference_compile":
        torch._dynamo.reset()
        C.make_fn(prep, impl)()  # compile outside the timed rounds

    fn = C.make_fn(prep, impl)

    def timed():
        out = fn()
        H.sync(DEVICE)
        return out

    rounds = 1 if impl.startswith("reference") else 3
    weight, info = benchmark.pedantic(timed, rounds=rounds, iterations=1, warmup_rounds=0)
    flops, nbytes = H.layer_work(case.shape, impl, case.steps, case.keep)
    benchmark.extra_info.update(steps=case.steps, n=case.shape.n, d=case.shape.d, flops=flops,
                                bytes=nbytes, backend=info.get("backend"))
    if weight is not None:
        loss = C.eval_cross_loss(prep, weight)
        benchmark.extra_info["final_loss"] = loss
        assert math.isfinite(loss)


@pytest.mark.parametrize("mc", C.model_cases(DEVICE.type, quick=True), ids=lambda m: m.name)
def test_model(benchmark, mc):
    import cdfast
    from cdfast.experiments import models

    if not hasattr(cdfast, "compress"):
        pytest.skip("cdfast.compress is not available in this build")
    torch.manual_seed(0)
    if mc.model.startswith("resnet"):
        teacher = models.resnet(int(mc.model[6:]), in_channels=3, num_classes=10)
        policy = {"policy": "resnet"}
    else:
        teacher = models.vgg(mc.model, in_channels=3, num_classes=10)
        policy = {}
    teacher = teacher.to(DEVICE).eval()
    x = torch.randn(mc.n, 3, mc.hw, mc.hw, device=DEVICE)
    student, _ = benchmark.pedantic(
        lambda: cdfast.compress(teacher, x, compression=cdfast.ChannelPrune(mc.keep), loss="cross",
                                mu=mc.mu, steps=mc.steps, lr=mc.lr, progress=False, verbose=False, **policy),
        rounds=1, iterations=1)
    assert isinstance(student, torch.nn.Module)
