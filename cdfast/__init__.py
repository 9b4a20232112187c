"""cdfast: few-shot network compression by cross distillation.

A trained network is pruned or quantized from a few samples, each layer of the
student fit to the teacher with the teacher's and the student's hidden features
interwoven (Bai et al., AAAI 2020). See README.md for a tour and
docs/ARCHITECTURE.md for the layout.

Public API:
    distill_layer, DistillResult          compress one layer
    compress, CompressionReport           compress a whole network from a few samples
    reconstruct                           refit a student another tool compressed
    save, load                            a compressed network to one small file and back
    LayerStatistics                       streaming Gram statistics of a layer
    ChannelPrune, WeightPrune, NMSparsity,
    GroupLasso, L1, Quantize,
    FixedSupport                          compression constraints (FixedSupport: a given support)
    LossSpec, ActivationSpec              the loss family
    fskd                                  FSKD's closed-form recovery (cdfast.fskd.fskd)
    baselines                             the paper's baselines (loaded on first use)
    backends                              which kernels can run here
"""
from . import _backends  # noqa: F401  (registers every backend's implementations with the dispatcher)
from .dispatch import BackendUnavailable, backends
from .layer import (L1, ActivationSpec, ChannelPrune, DistillResult, FixedSupport, GroupLasso, LayerGeometry, LayerStatistics,
                    LossSpec, NMSparsity, Quantize, WeightPrune, distill_layer)
from .model import CompressionReport, compress, fskd, load, reconstruct, save

__version__ = "0.1.0"

__all__ = [
    "distill_layer", "DistillResult", "compress", "reconstruct", "CompressionReport", "save", "load",
    "LayerStatistics", "LayerGeometry",
    "ChannelPrune", "WeightPrune", "NMSparsity", "GroupLasso", "L1", "Quantize", "FixedSupport",
    "LossSpec", "ActivationSpec", "fskd", "baselines", "backends", "BackendUnavailable",
]


def __getattr__(name: str):
    # The baselines belong to the experiments; load them only when asked for, so that
    # ``import cdfast`` never imports the research harness.
    if name == "baselines":
        import importlib

        return importlib.import_module(".experiments.baselines", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
