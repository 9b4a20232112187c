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

Two economies, both exact:

* **equal inputs** (``E = 0``: the first layer, or a teacher fed its own inputs, as
  post-training quantizers are): only ``G_TT`` is built — one Gram, not three —
  and ``G_EE = G_ET = 0`` are implied (``has_error`` is False);
* **fewer rows than columns** (``M < D``, the few-shot regime): the ``D × D`` Grams
  hold no more than the ``D × M`` unfolded inputs themselves, so those are kept
  instead (``representation == "lowrank"``); a Gram is formed only when asked for.
  A 25,088-input Linear from 64 samples keeps 13 MB of factors, not 7.5 GB of
  Grams. The statistics switch to Grams when the rows reach the columns.

Symmetric Grams are formed in blocks of their upper triangle (two thirds of the
products of a plain ``X·Xᵀ`` at three blocks).

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

__all__ = ["LayerStatistics", "ERROR_BASIS", "symmetric_gram"]

#: Mixing coefficients (a, b, c, d) of the statistics op: x1 = h^T, x2 = h^S − h^T.
ERROR_BASIS = (1.0, 0.0, -1.0, 1.0)
#: Columns per block of :func:`symmetric_gram`.
GRAM_BLOCK = 256
#: Unfold at most this many elements at once when building a Gram from raw inputs.
_UNFOLD_BUDGET = 1 << 25


def symmetric_gram(X: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``X·Xᵀ`` for ``X`` ``(G, D, M)``, added to ``out`` when given: the blocks of the upper
    triangle are products, the lower ones their mirror images."""
    G, D, _ = X.shape
    res = torch.zeros(G, D, D, dtype=X.dtype, device=X.device) if out is None else out
    blocks = [(b, min(D, b + GRAM_BLOCK)) for b in range(0, D, GRAM_BLOCK)]
    for i, (a0, a1) in enumerate(blocks):
        for b0, b1 in blocks[i:]:
            part = torch.bmm(X[:, a0:a1], X[:, b0:b1].transpose(1, 2))
            res[:, a0:a1, b0:b1] += part
            if b0 != a0:
                res[:, b0:b1, a0:a1] += part.transpose(1, 2)
    return res

#: Inputs beyond these magnitudes are accumulated in float64 (their squares leave float32).
_FLOAT32_RANGE = (2.0 ** -30, 2.0 ** 30)


class LayerStatistics:
    """Accumulates ``G_TT``, ``G_EE``, ``G_ET`` of one layer over batches.

    Args:
        layer: the teacher layer (``nn.Conv2d``/``nn.Linear``) or its :class:`LayerGeometry`.
        dtype: accumulation dtype, ``torch.float32`` (default) or ``torch.float64``.
            Half-precision inputs are always accumulated in at least float32.
        fit_bias: append a row of ones to ``X`` so that the bias can be fitted.
        device: where the statistics live (default: the device of the first batch).
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"cuda"`` (see :mod:`cdfast.dispatch`).
        lowrank: keep the unfolded inputs while they have fewer rows than columns
            (default True; False forms the Grams from the first batch on).

    Example::

        stats = cdfast.LayerStatistics(conv)
        for h_t, h_s in batches:
            stats.update(h_t, h_s)
        stats.all_reduce()          # no-op unless torch.distributed is initialised
    """

    def __init__(self, layer: nn.Module | LayerGeometry, dtype: torch.dtype = torch.float32,
                 fit_bias: bool = False, device: torch.device | str | None = None,
                 backend: str = "auto", lowrank: bool = True):
        self.geometry = layer if isinstance(layer, LayerGeometry) else LayerGeometry.of(layer)
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype: expected torch.float32 or torch.float64, got {dtype}")
        if not isinstance(lowrank, bool):
            raise TypeError(f"lowrank: expected True or False, got {lowrank!r}")
        self.dtype = dtype
        self.fit_bias = bool(fit_bias)
        self.device = torch.device(device) if device is not None else None
        self.backend = backend
        self.backend_used: str | None = None
        self.lowrank = lowrank
        self.rows = 0      # M = N·H_out·W_out so far
        self.samples = 0   # N so far
        self._grams: torch.Tensor | None = None   # (3, G, D, D) TT, EE, ET; or (1, G, D, D) while E = 0
        self._factors: list[tuple[torch.Tensor, torch.Tensor | None]] = []  # (X^T, E or None) per batch
        self._unseen: float | None = None

    @property
    def dim(self) -> int:
        return self.geometry.cols + int(self.fit_bias)

    @property
    def representation(self) -> str:
        """``"lowrank"`` while the unfolded inputs are kept, else ``"gram"``."""
        return "gram" if self._grams is not None or not self._factors else "lowrank"

    @property
    def has_error(self) -> bool:
        """Whether any batch had a student input different from the teacher's (``E ≠ 0``)."""
        if self._grams is not None:
            return self._grams.shape[0] == 3
        return any(e is not None for _, e in self._factors)

    # --------------------------------------------------------------- updates
    def update(self, h_teacher: torch.Tensor, h_student: torch.Tensor) -> "LayerStatistics":
        """Add one batch: ``h_teacher`` and ``h_student`` are this layer's two inputs."""
        check_pair(self.geometry, h_teacher, h_student)
        h_teacher, h_student = h_teacher.detach(), h_student.detach()
        if self.dtype == torch.float32:
            m = float(h_teacher.abs().max() if h_student is h_teacher
                      else torch.maximum(h_teacher.abs().max(), h_student.abs().max()))
            if m > _FLOAT32_RANGE[1] or 0 < m < _FLOAT32_RANGE[0]:
                self._promote()
        equal = h_student is h_teacher or torch.equal(h_teacher, h_student)
        device = self.device or h_teacher.device
        rows = self.geometry.rows(h_teacher)
        self._unseen = None
        if self._grams is None and self.lowrank and self.rows + rows < self.dim:
            g, dt = self.geometry, self.dtype
            x = g.unfold(h_teacher.to(dt), self.fit_bias).to(device)
            e = None if equal else g.unfold((h_student.to(dt) - h_teacher.to(dt)), self.fit_bias).to(device)
            if e is not None and self.fit_bias:
                e[:, -1] = 0.0  # the ones row does not differ
            self._factors.append((x, e))
            self.backend_used = "torch"
        else:
            self._to_grams(device)
            if equal and self._grams.shape[0] == 1:  # E = 0 so far: one Gram
                self._grams[0] += self._gram(h_teacher, device)
                self.backend_used = "torch"
            else:
                self._with_error()
                # call() falls back to torch where a kernel does not take these arguments (float64).
                self.backend_used, part = call("statistics", h_teacher.device, self.backend, None, h_teacher,
                                               h_student, self.geometry, self.fit_bias, self.dtype, ERROR_BASIS)
                self._grams += part.to(self._grams.device)
        self.rows += rows
        self.samples += h_teacher.shape[0]
        return self

    def _promote(self) -> None:
        """Accumulate in float64 from now on (the Grams or inputs so far convert exactly)."""
        self.dtype = torch.float64
        if self._grams is not None:
            self._grams = self._grams.double()
        self._factors = [(x.double(), None if e is None else e.double()) for x, e in self._factors]

    def update_many(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> "LayerStatistics":
        for h_t, h_s in batches:
            self.update(h_t, h_s)
        return self

    def add(self, other: "LayerStatistics") -> "LayerStatistics":
        """Add the statistics of other samples of the same layer (another fold, another
        rank's part): the kept inputs side by side while the rows stay below the columns,
        else the Grams summed."""
        if not isinstance(other, LayerStatistics):
            raise TypeError(f"other: expected LayerStatistics, got {type(other).__name__}")
        if other.geometry != self.geometry or other.fit_bias != self.fit_bias:
            raise ValueError("other: statistics of another layer (its shape or fit_bias differ)")
        if other.rows == 0:
            return self
        if other.dtype == torch.float64 and self.dtype != torch.float64:
            self._promote()
        self._unseen = None
        if self._grams is None and other._grams is None and self.lowrank and self.rows + other.rows < self.dim:
            self._factors += [(x.to(self.dtype), None if e is None else e.to(self.dtype)) for x, e in other._factors]
        else:
            self._to_grams(other._grams.device if other._grams is not None else other._factors[0][0].device)
            if other.has_error:
                self._with_error()
            for which in range(self._grams.shape[0]):
                self._grams[which] += other._gram_of(which).to(self._grams)
        self.rows += other.rows
        self.samples += other.samples
        return self

    def _gram(self, h: torch.Tensor, device) -> torch.Tensor:
        """``X·Xᵀ`` of one batch, unfolded in chunks of bounded size."""
        g = self.geometry
        per_sample = max(1, g.cols * g.groups * max(1, g.rows(h[:1])))
        chunk = max(1, _UNFOLD_BUDGET // per_sample)
        out = torch.zeros(g.groups, self.dim, self.dim, dtype=self.dtype, device=device)
        for s in range(0, h.shape[0], chunk):
            symmetric_gram(g.unfold(h[s:s + chunk].to(self.dtype), self.fit_bias).to(device), out)
        return out

    def _to_grams(self, device=None) -> None:
        """Form the Grams from the kept factors (nothing to do once they are Grams)."""
        if self._grams is not None:
            return
        g = self.geometry
        device = device or (self._factors[0][0].device if self._factors else self.device)
        error = self.has_error
        self._grams = torch.zeros(3 if error else 1, g.groups, self.dim, self.dim, dtype=self.dtype, device=device)
        for x, e in self._factors:
            symmetric_gram(x.to(device), self._grams[0])
            if e is not None:
                e = e.to(device)
                symmetric_gram(e, self._grams[1])
                self._grams[2] += torch.bmm(e, x.to(device).transpose(1, 2))
        self._factors = []

    def _with_error(self) -> None:
        """Give the Grams their ``G_EE`` and ``G_ET`` (zero so far)."""
        if self._grams.shape[0] == 1:
            self._grams = torch.cat([self._grams, torch.zeros_like(self._grams), torch.zeros_like(self._grams)])

    def all_reduce(self, group=None) -> "LayerStatistics":
        """Sum the statistics (and row counts) over the processes of ``torch.distributed``.

        A no-op when ``torch.distributed`` is not initialised. Every rank must call it.
        Kept factors are formed into all three Grams first (ranks sum Grams, not factors).
        """
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return self
        if self._grams is None and not self._factors:
            raise ValueError("all_reduce: no batch was added on this rank; every rank needs "
                             "at least one batch (or create the Grams with update first)")
        self._to_grams()
        self._with_error()
        wide = torch.tensor([float(self.dtype == torch.float64)], device=self._grams.device)
        dist.all_reduce(wide, op=dist.ReduceOp.MAX, group=group)  # one rank promoted: all do
        if float(wide) and self.dtype != torch.float64:
            self._promote()
        dist.all_reduce(self._grams, group=group)
        counts = torch.tensor([self.rows, self.samples], dtype=torch.float64,
                              device=self._grams.device)
        dist.all_reduce(counts, group=group)
        self.rows, self.samples = int(counts[0].item()), int(counts[1].item())
        self._unseen = None
        return self

    # --------------------------------------------------------------- access
    def _require(self) -> None:
        if self.rows == 0:
            raise ValueError("statistics: empty; call update() with at least one non-empty batch first")

    def _gram_of(self, which: int) -> torch.Tensor:
        self._require()
        if self._grams is not None:
            if which < self._grams.shape[0]:
                return self._grams[which]
            return torch.zeros_like(self._grams[0])
        x = self.factors()[0]
        if which == 0:
            return symmetric_gram(x)
        e = self.factors()[1]
        if e is None:
            return torch.zeros(x.shape[0], x.shape[1], x.shape[1], dtype=x.dtype, device=x.device)
        return symmetric_gram(e) if which == 1 else torch.bmm(e, x.transpose(1, 2))

    @property
    def G_TT(self) -> torch.Tensor:
        return self._gram_of(0)

    @property
    def G_EE(self) -> torch.Tensor:
        return self._gram_of(1)

    @property
    def G_ET(self) -> torch.Tensor:
        return self._gram_of(2)

    @property
    def G_SS(self) -> torch.Tensor:
        g_et = self.G_ET
        return self.G_TT + g_et + g_et.transpose(1, 2) + self.G_EE

    @property
    def G_ST(self) -> torch.Tensor:
        return self.G_TT + self.G_ET

    def factors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The kept unfolded inputs ``(X^T, E)``, each ``(G, D, M)`` (``E`` None when it is
        zero); only while ``representation == "lowrank"``."""
        self._require()
        if self.representation != "lowrank":
            raise ValueError("factors: the statistics hold Grams (the rows reached the columns), "
                             "not the unfolded inputs")
        if len(self._factors) > 1:  # joined once: later calls (and a single batch) copy nothing
            x = torch.cat([f[0] for f in self._factors], dim=2)
            e = None
            if self.has_error:
                e = torch.cat([f[1] if f[1] is not None else torch.zeros_like(f[0]) for f in self._factors], dim=2)
            self._factors = [(x, e)]
        return self._factors[0]

    def unseen_energy(self) -> float:
        r"""The energy per direction that fresh inputs have outside the span of the
        calibration rows, relative to ``mean(diag G_TT)``; 0 once the rows span every column.

        With ``M < D`` rows, ``G_TT`` says nothing about ``D − M`` directions. Leaving each row
        out in turn, its energy outside the span of the others is ``1/[K⁻¹]_mm`` (``K = XᵀX``,
        ``M × M``); spread over the unseen directions it estimates their variance,
        ``ν = mean_m(1/[K⁻¹]_mm)/(D − M + 1)``, which in the units of ``G_TT`` is ``M·ν``. The
        exact solver damps its sweeps by at least this much (:mod:`cdfast.layer.solvers.exact`).
        Averaged over groups; cached until the next update.
        """
        if self._unseen is not None:
            return self._unseen
        self._require()
        value = 0.0
        if self.representation == "lowrank":
            x = self.factors()[0].double()
            G, D, M = x.shape
            if 1 < M < D:
                K = symmetric_gram(x.transpose(1, 2))  # its upper triangle: half the products
                K.diagonal(dim1=-2, dim2=-1).add_(1e-10 * K.diagonal(dim1=-2, dim2=-1).mean(-1, keepdim=True)
                                                  .clamp_min(torch.finfo(K.dtype).tiny))
                loo = 1.0 / torch.diagonal(torch.cholesky_inverse(torch.linalg.cholesky(K)), dim1=-2, dim2=-1)
                nu = loo.mean(-1) / (D - M + 1)
                mean_diag = x.pow(2).sum(dim=(1, 2)) / D
                value = float((M * nu / mean_diag.clamp_min(torch.finfo(x.dtype).tiny)).mean())
        self._unseen = value
        return value

    def state_dict(self) -> dict:
        self._require()
        state = {"rows": self.rows, "samples": self.samples, "fit_bias": self.fit_bias}
        if self.representation == "lowrank":
            x, e = self.factors()
            state["factors"] = (x.clone(), None if e is None else e.clone())
        else:
            g = self._grams.clone()
            state["grams"] = torch.cat([g, torch.zeros_like(g), torch.zeros_like(g)]) if g.shape[0] == 1 else g
        return state

    def load_state_dict(self, state: dict) -> None:
        wide = state["factors"][0] if "factors" in state else state["grams"]
        if wide.dtype == torch.float64:
            self.dtype = torch.float64
        self.rows, self.samples, self.fit_bias = int(state["rows"]), int(state["samples"]), bool(state["fit_bias"])
        self._unseen = None
        if "factors" in state:
            x, e = state["factors"]
            self._grams, self._factors = None, [(x.to(self.dtype), None if e is None else e.to(self.dtype))]
        else:
            self._grams, self._factors = state["grams"].to(self.dtype), []
