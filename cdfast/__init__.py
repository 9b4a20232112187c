"""cdfast: few-shot network compression by cross distillation.

A trained network is pruned or quantized from a few samples, each layer of the
student fit to the teacher with the teacher's and the student's hidden features
interwoven (Bai et al., AAAI 2020). See README.md for a tour.

Public API:
    distill_layer, DistillResult          compress one layer
    compress, CompressionReport           compress a whole network from a few samples
    LayerStatistics                       streaming Gram statistics of a layer
    ChannelPrune, WeightPrune, NMSparsity,
    GroupLasso, L1, Quantize              compression constraints
    LossSpec, ActivationSpec              the loss family
    backends                              which kernels can run here
"""
from .compress import CompressionReport, compress
from .constraints import L1, ChannelPrune, GroupLasso, NMSparsity, Quantize, WeightPrune
from .dispatch import BackendUnavailable, backends
from .distill import DistillResult, distill_layer
from .geometry import LayerGeometry
from .losses import ActivationSpec, LossSpec
from .statistics import LayerStatistics

__version__ = "0.1.0"

__all__ = [
    "distill_layer", "DistillResult", "compress", "CompressionReport", "LayerStatistics", "LayerGeometry",
    "ChannelPrune", "WeightPrune", "NMSparsity", "GroupLasso", "L1", "Quantize",
    "LossSpec", "ActivationSpec", "backends", "BackendUnavailable",
]
