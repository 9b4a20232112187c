r"""Streaming second-order statistics of a layer's two inputs (SPEC §2.1).

For the linear objective every loss of the family is fixed by three ``D × D``
Gram matrices of the unfolded inputs. :class:`LayerStatistics` accumulates them
over any number of batches, so the sample count is bounded by time, not memory,
and sums them across processes with :meth:`LayerStatistics.all_reduce`.

It accumulates in the *teacher/error basis* ``X^T`` and ``E = X^S − X^T``:

    G_TT = X^T X^Tᵀ,   G_EE = E Eᵀ,   G_ET = E X^Tᵀ

and gives SPEC's ``G_SS = X^S X^Sᵀ`` and ``G_ST = X^S X^Tᵀ`` as the exact linear
combinations ``G_SS = G_TT + G_ET + G_ETᵀ + G_EE`` and ``G_ST = G_TT + G_ET``.
The error basis matters in float32: ``E`` is small when the student is close to
the teacher, and Grams of ``E`` keep its digits where ``G_SS − G_TT`` would not.

**Extreme magnitudes.** Inputs whose largest entry lies outside ``[2⁻³⁰, 2³⁰]`` would
overflow (×1e18) or underflow (×1e-30) float32 Grams; such statistics are accumulated
in float64 instead (``dtype`` becomes ``torch.float64``, and the solve follows).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from ..dispatch import call
from .geometry import LayerGeometry
from .._validation import check_pair

__all__ = ["LayerStatistics", "ERROR_BASIS"]

#: Mixing coefficients (a, b, c, d) of the statistics op: x1 = h^T, x2 = h^S − h^T.
ERROR_BASIS = (1.0, 0.0, -1.0, 1.0)

#: Inputs beyond these magnitudes are accumulated in float64 (their squares leave float32).
_FLOAT32_RANGE = (2.0 ** -30, 2.0 ** 30)


class LayerStatistics:
    """Accumulates ``G_TT``, ``G_EE``, ``G_ET`` of one layer over batches.

    Args:
        layer: the teacher layer (``nn.Conv2d``/``nn.Linear``) or its :class:`LayerGeometry`.
        dtype: accumulation dtype, ``torch.float32`` (default) or ``torch.float64``.
            Half-precision inputs are always accumulated in at least float32.
        fit_bias: append a row of ones to ``X`` so that the bias can be fitted.
        device: where the Grams live (default: the device of the first batch).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (see :mod:`cdfast.dispatch`).

    Example::

        stats = cdfast.LayerStatistics(conv)
        for h_t, h_s in batches:
            stats.update(h_t, h_s)
        stats.all_reduce()          # no-op unless torch.distributed is initialised
    """

    def __init__(self, layer: nn.Module | LayerGeometry, dtype: torch.dtype = torch.float32,
                 fit_bias: bool = False, device: torch.device | str | None = None,
                 backend: str = "auto"):
        self.geometry = layer if isinstance(layer, LayerGeometry) else LayerGeometry.of(layer)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        self.dtype = dtype
        self.fit_bias = bool(fit_bias)
        self.device = torch.device(device) if device is not None else None
        self.backend = backend
        self.backend_used: str | None = None
        self.rows = 0      # M = N·H_out·W_out so far
        self.samples = 0   # N so far
        self._grams: torch.Tensor | None = None  # (3, G, D, D): TT, EE, ET

    @property
    def dim(self) -> int:
        return self.geometry.cols + int(self.fit_bias)

    def _zeros(self, device) -> torch.Tensor:
        g = self.geometry
        return torch.zeros(3, g.groups, self.dim, self.dim, dtype=self.dtype, device=device)

    def update(self, h_teacher: torch.Tensor, h_student: torch.Tensor) -> "LayerStatistics":
        """Add one batch: ``h_teacher`` and ``h_student`` are this layer's two inputs."""
        check_pair(self.geometry, h_teacher, h_student)
        h_teacher, h_student = h_teacher.detach(), h_student.detach()
        if self.dtype == torch.float32:
            m = float(torch.maximum(h_teacher.abs().max(), h_student.abs().max()))
            if m > _FLOAT32_RANGE[1] or 0 < m < _FLOAT32_RANGE[0]:
                self._promote()
        if self._grams is None:
            self._grams = self._zeros(self.device or h_teacher.device)
        # call() falls back to torch where a kernel does not take these arguments (float64).
        self.backend_used, part = call("statistics", h_teacher.device, self.backend, None, h_teacher,
                                       h_student, self.geometry, self.fit_bias, self.dtype, ERROR_BASIS)
        self._grams += part.to(self._grams.device)
        self.rows += self.geometry.rows(h_teacher)
        self.samples += h_teacher.shape[0]
        return self

    def _promote(self) -> None:
        """Accumulate in float64 from now on (the Grams so far convert exactly)."""
        self.dtype = torch.float64
        if self._grams is not None:
            self._grams = self._grams.double()

    def update_many(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> "LayerStatistics":
        for h_t, h_s in batches:
            self.update(h_t, h_s)
        return self

    def all_reduce(self, group=None) -> "LayerStatistics":
        """Sum the statistics (and row counts) over the processes of ``torch.distributed``.

        A no-op when ``torch.distributed`` is not initialised. Every rank must call it.
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self._grams is None:
            raise ValueError("all_reduce: no batch was added on this rank; every rank needs "
                             "at least one batch (or create the Grams with update first)")
        wide = torch.tensor([float(self.dtype == torch.float64)], device=self._grams.device)
        dist.all_reduce(wide, op=dist.ReduceOp.MAX, group=group)  # one rank promoted: all do
        if float(wide) and self.dtype != torch.float64:
            self._promote()
        dist.all_reduce(self._grams, group=group)
        counts = torch.tensor([self.rows, self.samples], dtype=torch.float64,
                              device=self._grams.device)
        dist.all_reduce(counts, group=group)
        self.rows, self.samples = int(counts[0].item()), int(counts[1].item())
        return self

    # --------------------------------------------------------------- access
    def _require(self) -> torch.Tensor:
        if self._grams is None or self.rows == 0:
            raise ValueError("statistics: empty; call update() with at least one non-empty batch first")
        return self._grams

    @property
    def G_TT(self) -> torch.Tensor:
        return self._require()[0]

    @property
    def G_EE(self) -> torch.Tensor:
        return self._require()[1]

    @property
    def G_ET(self) -> torch.Tensor:
        return self._require()[2]

    @property
    def G_SS(self) -> torch.Tensor:
        g = self._require()
        return g[0] + g[2] + g[2].transpose(1, 2) + g[1]

    @property
    def G_ST(self) -> torch.Tensor:
        g = self._require()
        return g[0] + g[2]

    def state_dict(self) -> dict:
        return {"grams": self._require().clone(), "rows": self.rows, "samples": self.samples,
                "fit_bias": self.fit_bias}

    def load_state_dict(self, state: dict) -> None:
        if state["grams"].dtype == torch.float64:
            self.dtype = torch.float64
        self._grams = state["grams"].to(self.dtype)
        self.rows, self.samples, self.fit_bias = int(state["rows"]), int(state["samples"]), bool(state["fit_bias"])
