"""The benchmark cases and the implementations they are run with.

Layer cases are stride-1 'same' k×k convolutions (bias-free, as in ResNets) with a
synthetic few-shot batch: ``h_teacher ~ N(0, 1)`` and ``h_student = h_teacher +
noise·N(0, 1)``, the layer pruned to half its input channels with the cross loss.

Kinds:
    layer     single layers: CIFAR ResNet-56 (16/32/64 ch at 32/16/8 px) and
              ImageNet-style (64…512 ch at 56…7 px)
    headline  64→64 3×3, 50 samples of 16×16, μ = 0.6, keep 0.5, Adam, 3000 steps, lr 5e-4
    scale_N   time against the number of samples (32→32 at 16 px)
    scale_D   time against D = C_in·k² (C_in → 64 at 16 px)
    model     whole-model compression with ``cdfast.compress`` (when it exists)

Implementations (one CSV row each):
    cdfast               ``distill_layer`` on the inputs (statistics + solve)
    cdfast_statistics    ``LayerStatistics.update`` alone
    cdfast_solver        ``distill_layer(statistics=...)`` from precomputed statistics
    reference_eager      the authors' procedure (``tests/authors_reference.py``)
    reference_compile    the same with its loss wrapped in ``torch.compile``
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from .harness import REPO, LayerShape

if str(REPO / "tests") not in sys.path:
    sys.path.insert(0, str(REPO / "tests"))
from authors_reference import authors_channel_prune  # noqa: E402  (tests/authors_reference.py)

import cdfast  # noqa: E402

CDFAST_IMPLS = ("cdfast", "cdfast_statistics", "cdfast_solver")
REFERENCE_IMPLS = ("reference_eager", "reference_compile")
ALL_IMPLS = CDFAST_IMPLS + REFERENCE_IMPLS


@dataclass(frozen=True)
class LayerCase:
    kind: str
    layer: str          # a short name of the layer
    shape: LayerShape
    steps: int
    lr: float
    mu: float
    keep: float = 0.5
    noise: float = 0.1
    impls: tuple = ALL_IMPLS
    seed: int = 0

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.layer}/N={self.shape.n}/steps={self.steps}"


@dataclass(frozen=True)
class ModelCase:
    kind: str
    model: str          # a cdfast.experiments.models name
    n: int
    hw: int
    steps: int
    mu: float
    lr: float
    keep: float = 0.5
    impls: tuple = ("cdfast",)

    @property
    def name(self) -> str:
        return f"{self.kind}/{self.model}/N={self.n}/steps={self.steps}"


# ------------------------------------------------------------------------ grids
# (name, channels, pixels): the three stages of CIFAR ResNet-56 and four ImageNet
# ResNet/VGG widths. Every layer is C→C 3×3 with padding 1.
CIFAR_LAYERS = (("resnet56_s1_16ch_32px", 16, 32), ("resnet56_s2_32ch_16px", 32, 16),
                ("resnet56_s3_64ch_8px", 64, 8))
IMAGENET_LAYERS = (("imagenet_64ch_56px", 64, 56), ("imagenet_128ch_28px", 128, 28),
                   ("imagenet_256ch_14px", 256, 14), ("imagenet_512ch_7px", 512, 7))

# Sizes per device. CPU sizes are scaled down (fewer samples and steps) so that the
# full CPU run stays around 20 minutes on a 2-core machine; --quick takes the first
# (smallest) entry of every list and the quick step counts. Every step count lets the
# authors' ramp reach the channel budget (T/3 an integer, or T large enough): at T = 20
# their formula stops at 281 of 512 channels where cdfast keeps the 256 asked for, and
# the two would solve different problems (tests/test_bench.py checks every case).
GRID = {
    "cuda": {"cifar_n": (10, 100, 500), "cifar_steps": 3000,
             "imagenet_n": (50, 500, 3000), "imagenet_steps": 2000,
             "scale_n": (10, 30, 100, 300, 1000, 3000), "scale_n_steps": 1000,
             "scale_cin": (16, 32, 64, 128, 256, 512), "scale_d_n": 100, "scale_d_steps": 1000,
             "headline_steps": 3000,
             "models": ("resnet56", "vgg16"), "model_n": 500, "model_steps": 3000},
    "cpu": {"cifar_n": (10, 100), "cifar_steps": 200,
            "imagenet_n": (16,), "imagenet_steps": 21,
            "scale_n": (10, 30, 100, 300), "scale_n_steps": 50,
            "scale_cin": (16, 32, 64, 128, 256), "scale_d_n": 20, "scale_d_steps": 51,
            "headline_steps": 3000,
            "models": ("resnet56", "vgg_small"), "model_n": 50, "model_steps": 3000},
}
# --quick: the smallest size of every case family. ImageNet-style: the 64-channel
# layer only; whole models: the smallest of each style (ResNet-20, the 6-conv VGG).
QUICK = {"cifar_steps": 12, "imagenet_layers": 1, "imagenet_n": 2, "imagenet_steps": 3,
         "scale_steps": 12, "headline_steps": 6, "models": ("resnet20", "vgg_small"),
         "model_n": 10, "model_steps": 3}

HEADLINE = dict(c_in=64, c_out=64, k=3, hw=16, n=50, mu=0.6, lr=5e-4, keep=0.5)


def layer_cases(device: str, quick: bool = False, compile_reference: bool = True) -> list[LayerCase]:
    g = GRID["cuda" if device == "cuda" else "cpu"]
    cases: list[LayerCase] = []
    cifar_n = g["cifar_n"][:1] if quick else g["cifar_n"]
    cifar_steps = QUICK["cifar_steps"] if quick else g["cifar_steps"]
    for layer, c, hw in CIFAR_LAYERS:
        for n in cifar_n:
            cases.append(LayerCase("layer", layer, LayerShape(c, c, 3, hw, n), cifar_steps,
                                   lr=1e-3, mu=0.9))  # the authors' ResNet-56 settings
    im_n = (QUICK["imagenet_n"],) if quick else g["imagenet_n"]
    im_steps = QUICK["imagenet_steps"] if quick else g["imagenet_steps"]
    for layer, c, hw in (IMAGENET_LAYERS[:QUICK["imagenet_layers"]] if quick else IMAGENET_LAYERS):
        for n in im_n:
            cases.append(LayerCase("layer", layer, LayerShape(c, c, 3, hw, n), im_steps,
                                   lr=5e-4, mu=0.6))
    h = HEADLINE
    cases.append(LayerCase("headline", "conv_64to64_3x3_16px",
                           LayerShape(h["c_in"], h["c_out"], 3, h["hw"], h["n"]),
                           QUICK["headline_steps"] if quick else g["headline_steps"],
                           lr=h["lr"], mu=h["mu"], keep=h["keep"],
                           impls=CDFAST_IMPLS + ("reference_eager",)))
    scale_steps_n = QUICK["scale_steps"] if quick else g["scale_n_steps"]
    for n in (g["scale_n"][:1] if quick else g["scale_n"]):
        cases.append(LayerCase("scale_N", "conv_32to32_3x3_16px", LayerShape(32, 32, 3, 16, n),
                               scale_steps_n, lr=1e-3, mu=0.9,
                               impls=CDFAST_IMPLS + ("reference_eager",)))
    scale_steps_d = QUICK["scale_steps"] if quick else g["scale_d_steps"]
    for cin in (g["scale_cin"][:1] if quick else g["scale_cin"]):
        cases.append(LayerCase("scale_D", f"conv_{cin}to64_3x3_16px",
                               LayerShape(cin, 64, 3, 16, g["scale_d_n"] if not quick else 10),
                               scale_steps_d, lr=1e-3, mu=0.9,
                               impls=CDFAST_IMPLS + ("reference_eager",)))
    # torch.compile costs a compilation per case; in quick mode compile only the first.
    out = []
    compiled_once = False
    for c in cases:
        if "reference_compile" in c.impls and (not compile_reference or (quick and compiled_once)):
            c = replace(c, impls=tuple(i for i in c.impls if i != "reference_compile"))
        if "reference_compile" in c.impls:
            compiled_once = True
        out.append(c)
    return out


def model_cases(device: str, quick: bool = False) -> list[ModelCase]:
    g = GRID["cuda" if device == "cuda" else "cpu"]
    src = QUICK if quick else g
    out = []
    for name in src["models"]:
        if name.startswith("resnet"):  # the authors' ResNet-56 settings
            out.append(ModelCase("model", name, src["model_n"], 32, src["model_steps"], mu=0.9, lr=1e-3))
        else:                          # the authors' VGG settings
            out.append(ModelCase("model", name, src["model_n"], 32, src["model_steps"], mu=0.6, lr=5e-4))
    return out


# ------------------------------------------------------------------- layer setup
@dataclass
class Prepared:
    case: LayerCase
    device: torch.device
    conv: nn.Conv2d
    h_t: torch.Tensor
    h_s: torch.Tensor
    _stats: object = field(default=None, repr=False)

    def statistics(self):
        if self._stats is None:
            self._stats = cdfast.LayerStatistics(self.conv).update(self.h_t, self.h_s)
        return self._stats


def prepare(case: LayerCase, device: torch.device) -> Prepared:
    s = case.shape
    torch.manual_seed(case.seed)
    conv = nn.Conv2d(s.c_in, s.c_out, s.k, padding=s.k // 2, bias=False)
    conv = conv.to(device)  # requires_grad stays on: the reference trains a deep copy of it
    g = torch.Generator(device=device).manual_seed(case.seed + 1)
    h_t = torch.randn(s.n, s.c_in, s.hw, s.hw, device=device, generator=g)
    h_s = h_t + case.noise * torch.randn(s.n, s.c_in, s.hw, s.hw, device=device, generator=g)
    return Prepared(case, device, conv, h_t, h_s)


def make_fn(prep: Prepared, impl: str, steps: int | None = None):
    """A zero-argument callable running ``impl`` on the prepared layer.

    It returns ``(weight or None, info)``; ``info`` has ``backend`` and the
    implementation's own final-loss figure (``reported_loss``) where it has one.
    ``steps`` overrides the case's step count (the reference under --reference-steps).
    """
    c = prep.case
    steps = c.steps if steps is None else steps
    conv, h_t, h_s = prep.conv, prep.h_t, prep.h_s
    kw = dict(loss="cross", mu=c.mu, compression=cdfast.ChannelPrune(c.keep), solver="adam",
              steps=steps, lr=c.lr)
    if impl == "cdfast":
        def fn():
            r = cdfast.distill_layer(conv, h_t, h_s, **kw)
            return r.weight, {"backend": r.backend, "reported_loss": r.loss_after}
    elif impl == "cdfast_statistics":
        def fn():
            st = cdfast.LayerStatistics(conv).update(h_t, h_s)
            st.G_TT  # noqa: B018  (materialised; on CUDA the timer synchronises)
            return None, {"backend": st.backend_used, "reported_loss": None}
    elif impl == "cdfast_solver":
        stats = prep.statistics()

        def fn():
            r = cdfast.distill_layer(conv, statistics=stats, **kw)
            return r.weight, {"backend": r.backend, "reported_loss": r.loss_after}
    elif impl in REFERENCE_IMPLS:
        compiled = impl == "reference_compile"

        def fn():
            w, _, losses = authors_channel_prune(conv, h_t, h_s, c.keep, steps, c.lr, mu=c.mu,
                                                 compile_step=compiled)
            return w, {"backend": "torch.compile" if compiled else "torch eager",
                       "reported_loss": losses[-1]}
    else:
        raise ValueError(f"impl: unknown implementation {impl!r}")
    return fn


def eval_cross_loss(prep: Prepared, weight: torch.Tensor, chunk_elems: int = 1 << 24) -> float:
    """The cross loss of ``weight``, evaluated the same way for every implementation.

    ``μ·‖W∗h^T − W^T∗h^T‖² + (1−μ)·‖W^T∗h^S − W∗h^S‖²`` over the output elements,
    float64 convolutions (the data form, SPEC §2), in sample chunks.
    """
    c = prep.case
    conv = prep.conv
    wt = conv.weight.detach().double()
    w = weight.detach().to(wt.device).double()
    kw = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    per = max(1, chunk_elems // max(1, prep.h_t[0].numel() + c.shape.c_out * c.shape.hw ** 2))
    lc = li = 0.0
    count = 0
    with torch.no_grad():
        for s in range(0, prep.h_t.shape[0], per):
            ht = prep.h_t[s:s + per].double()
            hs = prep.h_s[s:s + per].double()
            y_tt = F.conv2d(ht, wt, **kw)
            lc += float((F.conv2d(ht, w, **kw) - y_tt).pow(2).sum())
            del y_tt
            li += float((F.conv2d(hs, wt, **kw) - F.conv2d(hs, w, **kw)).pow(2).sum())
            count += ht.shape[0] * c.shape.c_out * c.shape.hw ** 2
    return (c.mu * lc + (1 - c.mu) * li) / count
