"""A whole network: the walk over its layers, channel surgery, :func:`compress`, FSKD.

Data flow: calibration inputs → the walk (each layer's teacher and student input)
→ :func:`cdfast.layer.distill_layer` per layer, written back into the student →
surgery (pruned channels physically removed) → ``(student, CompressionReport)`` →
:func:`save` (quantized codes packed at their bit width, safetensors + JSON) and :func:`load`.
"""
from . import fskd
from .compress import CompressionReport, compress
from .counting import count_flops, count_parameters
from .export import load, read_info, save
from .reconstruct import reconstruct

__all__ = ["compress", "reconstruct", "CompressionReport", "fskd", "count_parameters", "count_flops", "save", "load",
           "read_info"]
