"""One layer: its geometry, the loss family and its quadratic, the streamed statistics,
the constraints and their schedule, the solvers, and :func:`distill_layer`.

Data flow: ``(h^T, h^S)`` → :class:`LayerStatistics` (three Gram matrices) →
:class:`~cdfast.layer.losses.Quadratic` of the chosen loss → a solver under a
:class:`~cdfast.layer.plan.ConstraintPlan` → :class:`DistillResult`.
"""
from .constraints import L1, ChannelPrune, FixedSupport, GroupLasso, NMSparsity, Quantize, WeightPrune
from .distill import DistillResult, distill_layer
from .geometry import LayerGeometry
from .losses import ActivationSpec, LossSpec, Quadratic
from .plan import ConstraintPlan
from .statistics import LayerStatistics

__all__ = ["distill_layer", "DistillResult", "LayerGeometry", "LossSpec", "ActivationSpec", "Quadratic",
           "LayerStatistics", "ConstraintPlan", "ChannelPrune", "WeightPrune", "NMSparsity", "GroupLasso", "L1",
           "Quantize", "FixedSupport"]
