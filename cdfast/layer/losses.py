r"""The cross-distillation loss family and its two forms.

Every loss of SPEC §2 is a weighted sum of *terms*; a term compares the teacher
weight ``A = W^T`` applied to a teacher-side input ``P`` with the student weight
``W`` applied to a student-side input ``Q``, both linear mixtures of the teacher's
input ``h^T`` and the student's input ``h^S``:

    P = a·h^T + b·h^S,   Q = c·h^T + d·h^S,   a + b = c + d = 1,
    L(W) = Σ_i w_i · ‖σ(A∗P_i) − σ(W∗Q_i)‖² / (M·C_out)

=============  ==========================================  ====================
loss           terms (w; a, b; c, d)                        SPEC name
=============  ==========================================  ====================
``nc``         (1; 1, 0; 0, 1)                              Ours-NC
``correction`` (1; 1, 0; 1, 0)                              student on h^T
``imitation``  (1; 0, 1; 0, 1)                              teacher on h^S
``cross``      (μ; 1, 0; 1, 0) + (1−μ; 0, 1; 0, 1)          Ours
``soft``       (1; α, 1−α; 1−β, β)                          Ours-S
=============  ==========================================  ====================

**The Gram form (linear objective, σ = identity).** Write ``E = X^S − X^T`` for the
accumulated estimation error. Because ``a + b = c + d = 1``,

    Q = X^T + d·E,      Q − P = (d − b)·E,

so with ``Δ = W − A`` each term is ``‖Δ·Q + A·(Q − P)‖²`` and the loss is the quadratic

    L(W) = s·[ tr(Δ H Δᵀ) + 2·tr(Δ Fᵀ) + f₀ ],        s = 1/(M·C_out)
    H  = Σ w_i (G_TT + d_i(G_ET + G_ETᵀ) + d_i² G_EE)
    F  = A·Kᵀ,   K = Σ w_i (d_i − b_i)(G_ETᵀ + d_i G_EE)
    f₀ = Σ w_i (d_i − b_i)² tr(A G_EE Aᵀ)

with the statistics ``G_TT = X^T X^Tᵀ``, ``G_EE = E Eᵀ``, ``G_ET = E X^Tᵀ``
(:class:`~cdfast.layer.statistics.LayerStatistics` holds them and also gives the
``G_SS``/``G_ST`` of SPEC §2.1). The gradient is ``∇L = 2s·(Δ H + F)``: one
``C_out × D`` by ``D × D`` product, independent of the sample count. Working in
``Δ`` and ``E`` rather than ``W`` and ``X^S`` keeps every term at the size of the
quantity it measures, so float32 statistics do not lose the loss to cancellation.

**Canonical form.** Completing the square gives

    L(W) = s·[ tr((W − W*) H (W − W*)ᵀ) + c ],   W* = A − F H⁻¹,  c = f₀ − tr(F H⁻¹ Fᵀ).

``H`` is singular when the layer sees fewer sampled rows than it has columns
(``M < D``, the few-shot regime) or when input channels are dead. ``W*`` is then
computed with ``H_δ = H + δ·mean(diag H)·I`` (``δ = damping``, default 1e-6), which
picks the minimiser closest to the teacher along directions the data cannot see;
the loss and gradient that the solvers use never involve ``H⁻¹`` and stay exact.
``δ`` is never below ``ε·D``, ``ε`` the machine epsilon of the statistics' dtype:
float32 statistics are only that accurate, and a smaller ``δ`` would fit the rounding
noise of the null space of ``H`` (a refit classifier with fewer samples than features
grew its weight norm 200-fold that way).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from .geometry import LayerGeometry

__all__ = ["LossSpec", "Quadratic", "ActivationSpec", "LOSSES", "robust_cholesky", "row_dots"]


def row_dots(X: torch.Tensor, Y: torch.Tensor) -> torch.Tensor:
    """``⟨x, y⟩`` of every pair of rows (last dimension) of ``X`` and ``Y``, as float64 of their
    leading shape: each in the tensors' dtype, in one pass that allocates nothing their size
    (a float32 loss summed in float64 without a float64 copy of a large matrix)."""
    n = X.shape[-1]
    if X.dtype != Y.dtype:
        dtype = torch.promote_types(X.dtype, Y.dtype)
        X, Y = X.to(dtype), Y.to(dtype)
    dots = torch.bmm(X.reshape(-1, 1, n), Y.reshape(-1, n, 1))
    return dots.view(X.shape[:-1]).double()

#: Elements of the weight per chunk of rows when the low-rank form evaluates the loss.
LOSS_CHUNK_ELEMENTS = 1 << 20


def robust_cholesky(H: torch.Tensor, upper: bool = False) -> torch.Tensor:
    """Cholesky factor of the symmetric PSD batch ``H``, adding diagonal jitter if needed.

    Rounding can leave a damped but nearly singular ``H`` (few rows, dead channels)
    with a tiny negative pivot; the jitter starts at 1e-7·mean(diag H) and grows
    tenfold until the factorisation succeeds. A group whose input is dead in every
    sample has a zero diagonal, and its float32 statistics can still leave rounding
    noise off the diagonal (``G_TT + G_ET + G_ETᵀ + G_EE`` cancelling to ``G_SS ≈ 0``);
    its jitter is then scaled by ``D·max|H|``, which makes ``H`` diagonally dominant
    (Gershgorin) by the last step.
    """
    L, info = torch.linalg.cholesky_ex(H, upper=upper)
    failed = info > 0
    if not bool(failed.any()):
        return L
    tiny = torch.finfo(H.dtype).tiny
    eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
    for d in (torch.diagonal(H, dim1=-2, dim2=-1).mean(-1).abs(), H.abs().amax((-2, -1)) * H.shape[-1]):
        d = d.clamp_min(tiny)
        for p in range(-7, 1):
            # only the groups that still fail get jitter: the others keep their exact factor
            L_p, info = torch.linalg.cholesky_ex(H + failed[..., None, None] * (10.0 ** p) * d[..., None, None] * eye,
                                                 upper=upper)
            L = torch.where(failed[..., None, None], L_p, L)
            failed = failed & (info > 0)
            if not bool(failed.any()):
                return L
    raise ValueError("H: the layer's Gram matrix is not positive semi-definite (NaN or Inf in the inputs?)")

LOSSES = ("nc", "correction", "imitation", "cross", "soft")
OBJECTIVES = ("linear", "activation")


def _check_unit(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float in [0, 1], got {type(value).__name__}")
    value = float(value)
    if not (0.0 <= value <= 1.0) or math.isnan(value):
        raise ValueError(f"{name}: expected a value in [0, 1], got {value}")
    return value


@dataclass(frozen=True)
class Term:
    """One ``w·‖A∗(a·h^T + b·h^S) − W∗(c·h^T + d·h^S)‖²`` term."""

    weight: float
    a: float
    b: float
    c: float
    d: float


@dataclass(frozen=True)
class ActivationSpec:
    """σ of the ``activation`` objective: ``ReLU(scale·y + shift)`` per output channel.

    ``scale``/``shift`` fold a BatchNorm that follows the layer; ``None`` means
    a plain ReLU.
    """

    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None

    @classmethod
    def from_batchnorm(cls, bn: torch.nn.Module) -> "ActivationSpec":
        """Fold an eval-mode ``BatchNorm1d/2d`` into ``scale·y + shift``."""
        if not isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
            raise TypeError(f"bn: expected a BatchNorm module, got {type(bn).__name__}")
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError("bn: the BatchNorm must track running statistics to be folded")
        inv = torch.rsqrt(bn.running_var.detach() + bn.eps)
        scale = inv * (bn.weight.detach() if bn.weight is not None else 1.0)
        shift = (bn.bias.detach() if bn.bias is not None else 0.0) - bn.running_mean.detach() * scale
        return cls(scale.detach().clone(), shift.detach().clone())

    def __call__(self, y: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
        """σ(y) with the output channels on ``channel_dim`` (1 for Conv2d, −1 for Linear)."""
        if self.scale is not None:
            view = [1] * y.dim()
            view[channel_dim] = -1
            y = y * self.scale.to(y).view(view) + self.shift.to(y).view(view)
        return torch.relu(y)


@dataclass(frozen=True)
class LossSpec:
    """Which loss of the family, with its mixing parameters and objective point.

    Args:
        name: one of ``nc``, ``correction``, ``imitation``, ``cross``, ``soft``.
        mu: μ of ``cross`` (weight of the correction term).
        alpha, beta: α, β of ``soft``.
        objective: ``"linear"`` (raw layer outputs, the authors' code, default) or
            ``"activation"`` (σ applied to both sides, the paper's formula).
        activation: σ for the activation objective; a plain ReLU by default.
    """

    name: str = "cross"
    mu: float = 0.6
    alpha: float = 0.5
    beta: float = 0.5
    objective: str = "linear"
    activation: ActivationSpec | None = field(default=None, compare=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or self.name not in LOSSES:
            raise ValueError(f"loss: expected one of {LOSSES}, got {self.name!r}")
        if not isinstance(self.objective, str) or self.objective not in OBJECTIVES:
            raise ValueError(f"objective: expected one of {OBJECTIVES}, got {self.objective!r}")
        object.__setattr__(self, "mu", _check_unit("mu", self.mu))
        object.__setattr__(self, "alpha", _check_unit("alpha", self.alpha))
        object.__setattr__(self, "beta", _check_unit("beta", self.beta))

    @property
    def terms(self) -> tuple[Term, ...]:
        if self.name == "nc":
            return (Term(1.0, 1.0, 0.0, 0.0, 1.0),)
        if self.name == "correction":
            return (Term(1.0, 1.0, 0.0, 1.0, 0.0),)
        if self.name == "imitation":
            return (Term(1.0, 0.0, 1.0, 0.0, 1.0),)
        if self.name == "cross":
            terms = []
            if self.mu > 0:
                terms.append(Term(self.mu, 1.0, 0.0, 1.0, 0.0))
            if self.mu < 1:
                terms.append(Term(1.0 - self.mu, 0.0, 1.0, 0.0, 1.0))
            return tuple(terms)
        a, b = self.alpha, 1.0 - self.alpha
        return (Term(1.0, a, b, 1.0 - self.beta, self.beta),)

    # ------------------------------------------------------------ data form
    def data_loss(self, geometry: LayerGeometry, weight: torch.Tensor, bias: torch.Tensor | None,
                  teacher_outputs: list[torch.Tensor], h_teacher: torch.Tensor,
                  h_student: torch.Tensor) -> torch.Tensor:
        """Loss of the data form (SPEC §2.2), differentiable in ``weight``/``bias``.

        ``teacher_outputs`` come from :meth:`teacher_outputs` (computed once per
        solve). The student's inputs of all terms are stacked along the batch
        dimension so its paths run as one convolution.
        """
        terms = self.terms
        n = h_teacher.shape[0]
        q = torch.cat([_mix(h_teacher, h_student, t.c, t.d) for t in terms])
        y = geometry.apply(q, weight, bias)
        if self.objective == "activation":
            y = (self.activation or ActivationSpec())(y, 1 if geometry.kind == "conv2d" else -1)
        total = y.new_zeros(())
        for i, (t, target) in enumerate(zip(terms, teacher_outputs)):
            total = total + t.weight * (y[i * n:(i + 1) * n] - target).pow(2).sum()
        return total / target.numel()

    def teacher_outputs(self, geometry: LayerGeometry, teacher_weight: torch.Tensor,
                        teacher_bias: torch.Tensor | None, h_teacher: torch.Tensor,
                        h_student: torch.Tensor) -> list[torch.Tensor]:
        """``σ(A∗P_i + b)`` for every term; constant during a solve."""
        outs = []
        for t in self.terms:
            y = geometry.apply(_mix(h_teacher, h_student, t.a, t.b), teacher_weight, teacher_bias)
            if self.objective == "activation":
                y = (self.activation or ActivationSpec())(y, 1 if geometry.kind == "conv2d" else -1)
            outs.append(y.detach())
        return outs


def _mix(h_t: torch.Tensor, h_s: torch.Tensor, a: float, b: float) -> torch.Tensor:
    if b == 0.0 and a == 1.0:
        return h_t
    if a == 0.0 and b == 1.0:
        return h_s
    return a * h_t + b * h_s


@dataclass
class Quadratic:
    r"""The canonical quadratic of one layer: ``L(W) = s·[tr(ΔHΔᵀ) + 2tr(ΔFᵀ) + f₀]``.

    Shapes: ``H`` is ``(G, D, D)``, ``anchor`` (the teacher weight ``A``) and ``F`` are
    ``(G, C_out/G, D)``; ``f0`` is a scalar and ``scale = s = 1/(M·C_out)``. ``damping`` is
    ``δ`` (see the module docstring); ``unseen`` is the energy per direction that fresh
    inputs have outside the span of the calibration rows, relative to ``mean(diag H)``
    (:meth:`LayerStatistics.unseen_energy`; 0 when the rows span every direction): the
    exact solver's sweeps damp by at least that much.

    **Low-rank form.** With ``factor`` ``Z`` ``(G, D, K)`` given and ``H`` None, ``H = Z·Zᵀ`` is
    never formed: a product ``V·H`` is ``(V·Z)·Zᵀ``, which costs less than one with ``H`` when
    ``K`` (the rows of all terms, ``M`` per term) is below ``D/2``, and ``Z`` is smaller than
    ``H`` (:attr:`representation`). :meth:`dense` forms ``H`` when a solver needs it.
    """

    H: torch.Tensor | None
    F: torch.Tensor
    anchor: torch.Tensor
    f0: torch.Tensor
    scale: float
    damping: float = 1e-6
    unseen: float = 0.0
    factor: torch.Tensor | None = None

    @classmethod
    def from_statistics(cls, stats, spec: LossSpec, teacher_matrix: torch.Tensor,
                        dtype: torch.dtype | None = None, damping: float = 1e-6,
                        lowrank: bool = False, unseen: bool = True) -> "Quadratic":
        """Build the quadratic of ``spec`` from a filled :class:`LayerStatistics`.

        ``lowrank``: keep ``H`` as the factor ``Z`` when the statistics hold the unfolded
        inputs (``stats.representation == "lowrank"``); otherwise ``H`` is formed.
        ``unseen``: measure :attr:`unseen` (only the exact solver reads it; with ``M < D``
        rows it costs an ``M × M`` float64 Gram and its Cholesky factor), else leave it 0.
        """
        if spec.objective != "linear":
            raise ValueError("objective: the Gram form exists only for objective='linear'; "
                             "use form='data' for the activation objective")
        dtype = dtype or stats.dtype
        a = teacher_matrix.to(dtype)
        scale = 1.0 / (stats.rows * teacher_matrix.shape[0] * teacher_matrix.shape[1])
        # H and F carry the rounding of the statistics' dtype, about ε·D·mean(diag H) in
        # spectral norm; damping below that would invert rounding noise along the null
        # space of H (M < D), so δ never goes under it.
        damping = max(damping, torch.finfo(stats.dtype).eps * stats.dim)
        unseen = stats.unseen_energy() if unseen else 0.0
        terms = spec.terms
        e_coef = sum(t.weight * (t.d - t.b) ** 2 for t in terms)
        if stats.representation == "lowrank":
            x, e = stats.factors()
            x = x.to(dtype)
            e = e.to(dtype) if e is not None else None
            if e is None:  # every term sees X^T: H = (Σ w)·X·Xᵀ, F = 0, f₀ = 0
                w = sum(t.weight for t in terms)
                Z = x if w == 1 else math.sqrt(w) * x
                Fm, f0 = torch.zeros_like(a), a.new_zeros(())
            else:
                qs = [x + t.d * e if t.d else x for t in terms]
                Z = torch.cat([math.sqrt(t.weight) * q for t, q in zip(terms, qs)], dim=2)
                Fm, f0 = torch.zeros_like(a), a.new_zeros(())
                if any(t.d != t.b for t in terms):  # else (cross: like inputs) F = 0 and f₀ = 0
                    ae = torch.bmm(a, e)  # A·E, (G, R, M)
                    for t, q in zip(terms, qs):
                        if t.d != t.b:
                            Fm.baddbmm_(ae, q.transpose(1, 2), alpha=t.weight * (t.d - t.b))
                    f0 = e_coef * ae.pow(2).sum()
            if lowrank:
                return cls(None, Fm, a, f0, scale, damping, unseen, factor=Z)
            from .statistics import symmetric_gram

            return cls(symmetric_gram(Z), Fm, a, f0, scale, damping, unseen)
        g_tt = stats.G_TT.to(dtype)
        if not stats.has_error:  # E = 0: H = (Σ w)·G_TT, F = 0, f₀ = 0
            return cls(sum(t.weight for t in terms) * g_tt, torch.zeros_like(a), a, a.new_zeros(()), scale,
                       damping, unseen)
        g_ee, g_et = stats.G_EE.to(dtype), stats.G_ET.to(dtype)
        g_te = g_et.transpose(1, 2)
        H = torch.zeros_like(g_tt)
        K = torch.zeros_like(g_tt)
        for t in terms:
            H += t.weight * g_tt
            if t.d:
                H += (t.weight * t.d) * (g_et + g_te) + (t.weight * t.d * t.d) * g_ee
            db = t.d - t.b
            if db:
                K += (t.weight * db) * g_te
                if t.d:
                    K += (t.weight * db * t.d) * g_ee
        Fm = torch.bmm(a, K.transpose(1, 2))
        f0 = e_coef * (torch.bmm(a, g_ee) * a).sum() if e_coef else a.new_zeros(())
        return cls(H, Fm, a, f0, scale, damping, unseen)

    # ------------------------------------------------------ the representation
    @property
    def representation(self) -> str:
        """``"gram"`` (``H`` held) or ``"lowrank"`` (``H = Z·Zᵀ`` through ``factor``)."""
        return "gram" if self.H is not None else "lowrank"

    def hmul(self, V: torch.Tensor) -> torch.Tensor:
        """``V·H`` for ``V`` ``(G, n, D)``."""
        if self.H is not None:
            return torch.bmm(V, self.H)
        return torch.bmm(torch.bmm(V, self.factor), self.factor.transpose(1, 2))

    def residual(self, delta: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """``Δ·H + F`` at ``Δ = W − A`` (the gradient is ``2s`` times this); ``delta`` may hold
        only the output rows ``rows``."""
        F = self.F[:, rows]
        if self.H is not None:
            return torch.baddbmm(F, delta, self.H)
        return self.hmul(delta).add_(F)

    def diag_H(self) -> torch.Tensor:
        """``diag(H)`` per group, ``(G, D)``."""
        if self.H is not None:
            return torch.diagonal(self.H, dim1=-2, dim2=-1)
        return self.factor.pow(2).sum(-1)

    def H_block(self, rows: slice, cols: slice) -> torch.Tensor:
        """``H[:, rows, cols]``."""
        if self.H is not None:
            return self.H[:, rows, cols]
        return torch.bmm(self.factor[:, rows], self.factor[:, cols].transpose(1, 2))

    def dense(self) -> "Quadratic":
        """The same quadratic with ``H`` formed (itself when it already is)."""
        if self.H is not None:
            return self
        from .statistics import symmetric_gram

        return replace(self, H=symmetric_gram(self.factor), factor=None)

    def restrict(self, cols: torch.Tensor) -> "Quadratic":
        """The quadratic over the columns ``cols`` with every other weight fixed at zero.

        With ``Δ_out = −A_out`` fixed, ``F' = F_in − A_out·H_out,in`` and
        ``f₀' = f₀ + tr(A_out H_out,out A_outᵀ) − 2·tr(A_out F_outᵀ)``.
        """
        D = self.anchor.shape[-1]
        out = torch.ones(D, dtype=torch.bool, device=self.anchor.device)
        out[cols] = False
        a_out = self.anchor[..., out]
        if self.H is not None:
            H_in = self.H[:, cols][:, :, cols].contiguous()
            F_in = self.F[..., cols] - torch.bmm(a_out, self.H[:, out][:, :, cols])
            out_energy = (torch.bmm(a_out, self.H[:, out][:, :, out]) * a_out).sum()  # tr(A_out H_out,out A_outᵀ)
            Z_in = None
        else:
            az = torch.bmm(a_out, self.factor[:, out])  # A_out·Z_out
            Z_in = self.factor[:, cols].contiguous()
            F_in = self.F[..., cols] - torch.bmm(az, Z_in.transpose(1, 2))
            out_energy = az.pow(2).sum()  # the same trace, ‖A_out·Z_out‖²: no product with Z_outᵀ
            H_in = None
        f0 = self.f0 + out_energy - 2 * (a_out * self.F[..., out]).sum()
        return Quadratic(H_in, F_in.contiguous(), self.anchor[..., cols].contiguous(), f0,
                         self.scale, self.damping, self.unseen, Z_in)

    def to(self, dtype: torch.dtype) -> "Quadratic":
        """The same quadratic with its tensors in ``dtype``."""
        return Quadratic(None if self.H is None else self.H.to(dtype), self.F.to(dtype), self.anchor.to(dtype),
                         self.f0.to(dtype), self.scale, self.damping, self.unseen,
                         None if self.factor is None else self.factor.to(dtype))

    # -------------------------------------------------------------- values
    def residual_grad(self, W: torch.Tensor) -> torch.Tensor:
        """``ΔH + F`` (the gradient is ``2s`` times this)."""
        return self.residual(W - self.anchor)

    def loss(self, W: torch.Tensor) -> torch.Tensor:
        """``L(W)`` as a float64 scalar (``s`` may lie outside float32's range), float32 products
        summed in float64 by row dot products. The low-rank form takes a chunk of rows at a
        time, ``tr(ΔHΔᵀ) = ‖Δ·Z‖²``: one product, and no temporary of the weight's size (a wide
        layer's weight is the largest thing a low-rank solve holds)."""
        if self.H is not None:
            delta = W - self.anchor
            return self.scale * (row_dots(delta, self.residual(delta) + self.F).sum() + self.f0.double())
        R, D = self.anchor.shape[1:]
        step = max(1, LOSS_CHUNK_ELEMENTS // D)
        value = self.f0.double()
        for r0 in range(0, R, step):
            rows = slice(r0, r0 + step)
            delta = W[:, rows] - self.anchor[:, rows]
            dz = torch.bmm(delta, self.factor)
            value = value + row_dots(dz, dz).sum() + 2 * row_dots(delta, self.F[:, rows]).sum()
        return self.scale * value

    def step_terms(self, delta: torch.Tensor, alpha: float, want_value: bool, rows: slice = slice(None)
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(α·(ΔH + F), tr(ΔHΔᵀ) + 2tr(ΔFᵀ))`` at ``Δ`` (the output rows ``rows`` of it), the
        value only when ``want_value`` (else None), in float64 and without ``f₀``, so that the
        values of chunks of rows add up: an iterative step's gradient (``α = 2s``) and its loss
        without ``s·f₀``. On the low-rank form both come from one ``Δ·Z``: the value is
        ``‖Δ·Z‖² + 2⟨Δ, F⟩`` and ``α`` is applied inside the second product, so nothing of
        size ``C_out × D`` is swept again."""
        F = self.F[:, rows]
        if self.H is not None:
            G = self.residual(delta, rows)
            value = row_dots(delta, G + F).sum() if want_value else None
            return G.mul_(alpha), value
        dz = torch.bmm(delta, self.factor)
        value = row_dots(dz, dz).sum() + 2 * row_dots(delta, F).sum() if want_value else None
        return torch.baddbmm(F, dz, self.factor.transpose(1, 2), beta=alpha, alpha=alpha), value

    def teacher_loss(self) -> torch.Tensor:
        """``L(A) = s·f₀``: the loss at the teacher's weight, without a product (float64, as :meth:`loss`)."""
        return self.scale * self.f0.double()

    def grad(self, W: torch.Tensor) -> torch.Tensor:
        return (2.0 * self.scale) * self.residual_grad(W)

    @property
    def R(self) -> torch.Tensor:
        """``R = A·H − F``: the gradient is ``2s·(W·H − R)``."""
        return self.hmul(self.anchor) - self.F

    def damping_lambda(self, H: torch.Tensor | None = None) -> torch.Tensor:
        """``λ = δ·mean(diag H)`` per group, shape ``(G,)``: the damping added where ``H`` is inverted."""
        d = self.diag_H() if H is None else torch.diagonal(H, dim1=-2, dim2=-1)
        return self.damping * d.mean(-1).clamp_min(torch.finfo(d.dtype).tiny)

    def damped_H(self, H: torch.Tensor | None = None) -> torch.Tensor:
        H = self.dense().H if H is None else H
        eye = torch.eye(H.shape[-1], dtype=H.dtype, device=H.device)
        return H + self.damping_lambda(H)[..., None, None] * eye

    def minimizer(self) -> torch.Tensor:
        """``W* = A − F H_δ⁻¹`` (unconstrained optimum; see the module docstring)."""
        L = robust_cholesky(self.damped_H())
        # Solve X H = F  ⇔  H Xᵀ = Fᵀ
        X = torch.cholesky_solve(self.F.transpose(1, 2), L).transpose(1, 2)
        return self.anchor - X

    def row_values(self, W: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
        """Per output row, ``(ΔHΔᵀ + 2ΔFᵀ)_rr`` (the loss without ``f₀`` and ``s``), shape
        ``(G, C_out/G)``: how grid scales are compared row by row. ``W`` may hold only the
        output rows ``rows``."""
        delta = W - self.anchor[:, rows]
        return (delta * (self.hmul(delta) + 2 * self.F[:, rows])).sum(-1)

    def best_scale(self, codes: torch.Tensor, levels: int, per_channel: bool, old: torch.Tensor,
                   W: torch.Tensor, zH: torch.Tensor | None = None) -> torch.Tensor:
        r"""Closed-form grid scale for fixed codes ``z = codes/L`` on the first ``w =
        codes.shape[-1]`` columns, the other columns of ``W`` (a fitted bias) held fixed.

        With ``W = [s·z, u]``, minimising the quadratic over ``s`` gives per row
        ``s = z̃·(r − ũ·H)ᵀ / (z̃ H z̃ᵀ)``, ``z̃ = [z, 0]``, ``ũ = [0, u]`` and ``r`` the row of
        ``R = A·H − F`` (numerator and denominator summed over rows for a per-layer scale).
        ``H`` being symmetric, ``z̃·(r − ũH)ᵀ = (z̃H)·(a − ũ)ᵀ − z̃·fᵀ``: one product ``z̃·H`` (pass
        it as ``zH`` when known). Rows whose codes are all zero (or with no positive
        optimum) keep their ``old`` scale.
        """
        wc = codes.shape[-1]
        D = self.anchor.shape[-1]
        z = codes.to(self.anchor.dtype) / levels
        target = self.anchor
        if wc < D:
            z = torch.cat([z, torch.zeros_like(z[..., : D - wc])], dim=-1)
            target = self.anchor.clone()
            target[..., wc:] -= W[..., wc:].to(target.dtype)
        if zH is None:
            zH = self.hmul(z)
        num = (zH * target).sum(-1, keepdim=True) - (z * self.F).sum(-1, keepdim=True)
        den = (zH * z).sum(-1, keepdim=True)
        if not per_channel:
            num, den = num.sum().reshape(1, 1, 1), den.sum().reshape(1, 1, 1)
        ok = (den > 0) & (num > 0)
        return torch.where(ok, num / den.clamp_min(torch.finfo(den.dtype).tiny), old)

    def refit_grid(self, codes: torch.Tensor, levels: int, per_channel: bool, old: torch.Tensor,
                   W: torch.Tensor, rounds: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The grid scale and the free columns (a fitted bias) that minimise the quadratic
        for fixed codes: ``W = [s·z, u]``. Returns ``(scale, u)``, ``u`` of shape
        ``(G, C_out/G, D − w)`` (empty without free columns).

        ``s`` given ``u`` is :meth:`best_scale`; ``u`` given ``s`` solves
        ``u·H_uu = R_u − s·(z̃H)_u`` (the gradient of the free columns vanishes). The two
        alternate until they settle: each round lowers the loss, and the pair is the
        joint optimum to rounding (a 2×2 problem per row for per-channel scales).
        """
        wc = codes.shape[-1]
        D = self.anchor.shape[-1]
        z = torch.cat([codes.to(self.anchor.dtype) / levels,
                       torch.zeros(*codes.shape[:-1], D - wc, dtype=self.anchor.dtype, device=codes.device)], -1)
        zH_full = self.hmul(z)
        scale = self.best_scale(codes, levels, per_channel, old, W, zH_full)
        if wc == D:
            return scale, W[..., wc:]
        zH = zH_full[..., wc:]
        # R_u = (A·H − F)_u = A·H_{:,u} − F_u, with H_{:,u} the products of the free columns
        R = torch.bmm(self.anchor, self.H_block(slice(0, D), slice(wc, D))) - self.F[..., wc:]
        Huu = self.damped_H(self.H_block(slice(wc, D), slice(wc, D)))
        L = robust_cholesky(Huu)
        W = W.clone()
        for _ in range(rounds):
            rhs = R - scale * zH
            u = torch.cholesky_solve(rhs.transpose(1, 2), L).transpose(1, 2)
            W[..., wc:] = u
            new = self.best_scale(codes, levels, per_channel, scale, W, zH_full)
            settled = bool(((new - scale).abs() <= 1e-12 * scale.abs()).all())
            scale = new
            if settled:
                break
        rhs = R - scale * zH
        return scale, torch.cholesky_solve(rhs.transpose(1, 2), L).transpose(1, 2)

    def canonical(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W*, c)`` with ``L(W) = s·[tr((W−W*)H(W−W*)ᵀ) + c]`` (exact for non-singular H)."""
        w_star = self.minimizer()
        delta = w_star - self.anchor
        c = self.f0 - (self.hmul(delta) * delta).sum()
        return w_star, c
