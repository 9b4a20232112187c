"""FSKD: few-sample knowledge distillation by mergeable 1×1 convolutions (SPEC §5).

Li et al., "Few Sample Knowledge Distillation for Efficient Network Compression".
For every block of the student, a ``C×C`` 1×1 convolution ``Q`` (identity at
start) is placed right after the block's last convolution, i.e. *before* its
BatchNorm::

    z = BN(Q · conv(x))

``Q`` (plus an intercept that is absorbed into the BN shift, or into the conv's
bias when there is no BN) is solved in closed form by (ridge) least squares in
float64 so that the student's block output at that point (pre-activation, after
the BN affine) matches the teacher's on label-free samples. Since BN is affine
per channel, matching after BN is matching ``Q·y_S`` to ``BN_S⁻¹(z_T)`` row by
row. Blocks are processed in execution order, so each block is fitted on the
outputs of the already-corrected earlier blocks. ``Q`` is then merged into the
conv, ``W'[:, :, i, j] = Q·W[:, :, i, j]``, ``b' = Q·b``, so the returned network has
exactly the student's architecture and parameter count.

The student may have pruned *input* channels (e.g. after
:func:`cdfast.model.surgery.shrink_channels`); matching is done on the block's last
conv's *output* channels, which must equal the teacher's.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from .._validation import check_bool, check_finite_model, check_nonneg_float, check_positive_int
from .walk import StopForward, as_sequence, calibration_batches, execution_order

__all__ = ["fskd", "fskd_blocks", "block_end_convs"]

_SHORTCUT_WORDS = ("downsample", "shortcut", "skip")
_MERGEABLE = (nn.Conv2d, nn.Linear)  # a C×C map after either merges into its weight


def _out(layer: nn.Module) -> int:
    return layer.out_channels if isinstance(layer, nn.Conv2d) else layer.out_features


def fskd_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks: ``walk.as_sequence`` when available, else ``stem + blocks``
    (cdfast ResNet), ``features`` (cdfast VGG), else every Conv2d on its own (every Linear
    in a network without convs)."""
    seq = as_sequence(model)
    if seq is not None:
        return seq
    out: list[nn.Module] = []
    stem = getattr(model, "stem", None)
    if isinstance(stem, nn.Module):
        out.append(stem)
    for attr in ("blocks", "features", "layers"):
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Sequential):
            s = as_sequence(sub)
            out.extend(s if s is not None else list(sub))
            break
    if not out:
        out = [m for m in model.modules() if isinstance(m, _kinds(model))]
    return out


def _kinds(model: nn.Module) -> tuple:
    """The layers FSKD corrects: convs, or Linear layers in a network that has no conv."""
    return (nn.Conv2d,) if any(isinstance(m, nn.Conv2d) for m in model.modules()) else (nn.Linear,)


def block_end_convs(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of each block's last Conv2d on the main path (shortcut convs excluded), in execution order
    (each block's last Linear in a network without convs)."""
    order, _ = execution_order(model, example)
    names = {m: n for n, m in model.named_modules()}
    kinds = _kinds(model)
    result = []
    for blk in fskd_blocks(model):
        bname = names.get(blk)
        if bname is None:
            continue
        if isinstance(blk, kinds):
            members = {bname}
        else:
            members = {names[m] for m in blk.modules() if isinstance(m, kinds)}
        cands = [n for n in order if n in members and isinstance(model.get_submodule(n), kinds)]
        main = [n for n in cands if not any(w in n[len(bname):].lower() for w in _SHORTCUT_WORDS)]
        cands = main or cands
        if cands:
            result.append(cands[-1])
    return result


def _following_bn(model: nn.Module, leaves: list[str], conv_name: str) -> str | None:
    i = leaves.index(conv_name)
    if i + 1 < len(leaves):
        m = model.get_submodule(leaves[i + 1])
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.num_features == _out(model.get_submodule(conv_name)):
            return leaves[i + 1]
    return None


def _capture_output(model: nn.Module, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    box = []

    def hook(mod, inp, out):
        box.append(out.detach())
        raise StopForward

    h = module.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
    except StopForward:
        pass
    finally:
        h.remove()
    if not box:
        raise RuntimeError(f"module {module} was not called by the forward pass")
    return box[0]


def _bn_affine(bn: nn.BatchNorm2d | None, C: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale s, shift c) with ``bn(y) = s·y + c`` in eval mode (float64)."""
    if bn is None:
        return torch.ones(C, dtype=torch.float64, device=device), torch.zeros(C, dtype=torch.float64, device=device)
    var = bn.running_var.double() if bn.running_var is not None else torch.ones(C, dtype=torch.float64, device=device)
    mean = bn.running_mean.double() if bn.running_mean is not None else torch.zeros(C, dtype=torch.float64, device=device)
    w = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(var)
    b = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(var)
    s = w / torch.sqrt(var + bn.eps)
    return s, b - mean * s


def fskd(teacher: nn.Module, student: nn.Module, data, batch_size: int = 256, progress: bool = False,
         *, ridge: float = 1e-9, fit_intercept: bool = True, inplace: bool = False,
         return_info: bool = False, kept_outputs: dict | None = None):
    """Recover ``student`` towards ``teacher`` by FSKD; returns the corrected student.

    Args:
        teacher, student: networks with the same block structure and the same output
            width at every block's last conv (input widths may differ).
        data: label-free samples: a tensor, a Dataset/DataLoader of ``(x, y)`` or ``x``
            batches, or a list of tensors (labels are ignored).
        ridge: ridge λ, relative to the mean diagonal of ``YYᵀ``, pulling ``Q`` towards
            the identity.
        fit_intercept: also fit a per-channel shift, absorbed into the BN's bias (or the
            conv's bias); it never adds parameters. With neither a BN nor a conv bias
            no shift is fitted.
        kept_outputs: ``{conv_name: indices}`` of the teacher's output channels a
            narrower student conv kept (output-channel pruning); that conv is then
            matched to the teacher's map restricted to those channels. Convs whose
            output width differs from the teacher's and are not listed are skipped.
        inplace: modify ``student`` itself instead of a copy.
        return_info: also return a dict ``{conv_name: {"err_before", "err_after"}}``
            (relative squared errors of the matched block outputs).
    """
    for name, value in (("teacher", teacher), ("student", student)):
        if not isinstance(value, nn.Module):
            raise TypeError(f"{name}: expected an nn.Module, got {type(value).__name__}")
    check_positive_int("batch_size", batch_size)
    check_nonneg_float("ridge", ridge)
    for name, value in (("progress", progress), ("fit_intercept", fit_intercept), ("inplace", inplace),
                        ("return_info", return_info)):
        check_bool(name, value)
    if kept_outputs is not None and not isinstance(kept_outputs, dict):
        raise TypeError(f"kept_outputs: expected a dict of conv name -> kept channel indices, got "
                        f"{type(kept_outputs).__name__}")
    batches = calibration_batches(data, batch_size)
    if not batches:
        raise ValueError("data: expected at least one sample")
    if not all(bool(torch.isfinite(b).all()) for b in batches):
        raise ValueError("data: contains NaN or Inf")
    check_finite_model("teacher", teacher)
    check_finite_model("student", student)
    t_mode, s_mode = teacher.training, student.training
    teacher.eval()
    if not inplace:
        student = copy.deepcopy(student)
    student.eval()
    convs = block_end_convs(student, batches[0][:1])
    _, leaves_s = execution_order(student, batches[0][:1])
    _, leaves_t = execution_order(teacher, batches[0][:1])
    info: dict[str, dict] = {}
    it = convs
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(convs, desc="fskd", unit="block")
    for name in it:
        conv_s = student.get_submodule(name)
        try:
            conv_t = teacher.get_submodule(name)
        except AttributeError:
            continue
        sel = None
        if kept_outputs and name in kept_outputs and isinstance(conv_t, _MERGEABLE) \
                and _out(conv_t) != _out(conv_s):
            sel = torch.as_tensor(kept_outputs[name]).long().view(-1)
            if len(sel) != _out(conv_s):
                raise ValueError(f"kept_outputs[{name!r}]: {len(sel)} indices for {_out(conv_s)} channels")
        if not isinstance(conv_t, _MERGEABLE) or (_out(conv_t) != _out(conv_s) and sel is None):
            info[name] = {"skipped": "teacher conv missing or output width differs"}
            continue
        bn_s_name = _following_bn(student, leaves_s, name)
        bn_t_name = _following_bn(teacher, leaves_t, name) if name in leaves_t else None
        bn_s = student.get_submodule(bn_s_name) if bn_s_name else None
        point_t = teacher.get_submodule(bn_t_name) if bn_t_name else conv_t
        C = _out(conv_s)
        ch = 1 if isinstance(conv_s, nn.Conv2d) else -1  # the channel dimension of its output
        dev = conv_s.weight.device
        s, c = _bn_affine(bn_s, C, dev)
        ok = s.abs() > 1e-8
        intercept = fit_intercept and (bn_s is not None or conv_s.bias is not None)
        D = C + int(intercept)
        A = torch.zeros(D, D, dtype=torch.float64, device=dev)   # Σ y yᵀ
        B = torch.zeros(C, D, dtype=torch.float64, device=dev)   # Σ t yᵀ
        tt = 0.0
        rows = 0
        for x in batches:
            y = _capture_output(student, conv_s, x).double()            # N×C×H×W (or N×…×C), pre-BN
            z_t = _capture_output(teacher, point_t, x).double()         # teacher point
            if sel is not None:
                z_t = z_t.index_select(ch, sel.to(z_t.device))
            shape = [1] * y.dim()
            shape[ch] = -1
            t = torch.where(ok.view(shape), (z_t - c.view(shape)) / torch.where(ok, s, 1.0).view(shape), y)
            Y = y.movedim(ch, 0).reshape(C, -1)
            T = t.movedim(ch, 0).reshape(C, -1)
            if intercept:
                Y = torch.cat([Y, torch.ones_like(Y[:1])], 0)
            A += Y @ Y.T
            B += T @ Y.T
            tt += float((T * T * (s * s).view(-1, 1)).sum())
            rows += Y.shape[1]
        # ridge towards [I | 0]
        lam = ridge * float(A.diagonal()[:C].mean()) + 1e-12
        I0 = torch.zeros(C, D, dtype=torch.float64, device=dev)
        I0[:, :C] = torch.eye(C, dtype=torch.float64, device=dev)
        reg = lam * torch.eye(D, dtype=torch.float64, device=dev)
        Qfull = torch.linalg.solve(A + reg, (B + lam * I0).T).T           # C×D
        Qfull[~ok] = I0[~ok]

        def err(M):  # Σ_k s_k² ‖M_k Y − T_k‖²
            sq = (M @ A * M).sum(1) - 2 * (M * B).sum(1)
            return float((sq * s * s).sum()) + tt

        e0, e1 = err(I0), err(Qfull)
        info[name] = {"err_before": e0 / max(tt, 1e-300), "err_after": e1 / max(tt, 1e-300), "rows": rows}
        Q = Qfull[:, :C]
        with torch.no_grad():
            W = conv_s.weight.detach().double()
            conv_s.weight.copy_((Q @ W.reshape(C, -1)).reshape(W.shape).to(conv_s.weight.dtype))
            if conv_s.bias is not None:
                b_new = Q @ conv_s.bias.detach().double()
                if intercept and bn_s is None:
                    b_new = b_new + Qfull[:, C]
                conv_s.bias.copy_(b_new.to(conv_s.bias.dtype))
            if intercept and bn_s is not None:
                # BN(Q y + q0) = s·(Q y) + c + s·q0
                if bn_s.bias is not None:
                    bn_s.bias.add_((s * Qfull[:, C]).to(bn_s.bias.dtype))
                else:  # no affine: shift the running mean instead
                    bn_s.running_mean.sub_(Qfull[:, C].to(bn_s.running_mean.dtype))
    teacher.train(t_mode)
    student.train(s_mode if not inplace else s_mode)
    if return_info:
        return student, info
    return student
