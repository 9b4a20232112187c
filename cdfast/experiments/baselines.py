"""The baselines of the comparison tables (SPEC §6), behind one interface.

``run(method, teacher, data, keep=..., ...) -> (student, info)``

========  ====================================================================
method    what it does
========  ====================================================================
l1        keep each compressed conv's input channels of largest L1 norm
          ``Σ|W[:, i]|`` (Li et al. 2017), no reconstruction
bp        l1, then fine-tune with cross-entropy on the few labelled samples (Adam)
fitnet    l1, then hint training: MSE to the teacher's block outputs, then to its
          logits (label-free)
thinet    greedy channel removal minimising the layer-output reconstruction error
          (Luo et al. 2017), then least squares on the kept channels
cp        LASSO channel selection (He et al. 2017), then least squares
fskd      l1, then :func:`cdfast.model.fskd.fskd`
nc/cross/soft/auto  :func:`cdfast.compress` with ``loss=`` that name
========  ====================================================================

Layer selection is :func:`cdfast.compress`'s policy (``"resnet"``: each block's
``conv2``; ``"skip_first"``: all convs but the first; ``"all"``). ThiNet and CP
work on the layer's Gram statistics (:class:`cdfast.LayerStatistics`, float64):
with ``Z_i`` the contribution of input channel ``i`` to the teacher layer's output
on the student's input and ``Y`` the teacher layer's output on the teacher's
input, ``a_ij = <Z_i, Z_j>`` and ``b_i = <Z_i, Y>`` are read off the Grams, so
selection costs ``O(C_in²)`` per step and the final least squares is one ``D×D``
solve. All students are physically shrunk (:func:`cdfast.model.surgery.shrink_channels`).
"""
from __future__ import annotations

import copy
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._validation import check_fraction, check_positive_float, check_positive_int
from ..layer.constraints import ChannelPrune
from ..model.compress import plan_policy
from ..model.graph import ModelGraph
from .models import count_flops, count_parameters
from ..layer.statistics import LayerStatistics
from ..model.surgery import shrink_channels
from ..model.walk import capture_input, execution_order

__all__ = ["run", "METHODS", "layer_gram_terms", "reconstruction_error"]

METHODS = ("l1", "bp", "fitnet", "thinet", "cp", "fskd", "nc", "cross", "soft", "auto")


# ------------------------------------------------------------------ helpers
def _split(data, labels, batch_size):
    """(list of x batches, list of y batches or None)."""
    if isinstance(data, torch.Tensor):
        xs = [data[i:i + batch_size] for i in range(0, len(data), batch_size)]
        ys = None
        if labels is not None:
            labels = torch.as_tensor(labels)
            ys = [labels[i:i + batch_size] for i in range(0, len(labels), batch_size)]
        return xs, ys
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=False)
    xs, ys = [], []
    for item in data:
        if isinstance(item, (tuple, list)):
            xs.append(item[0])
            if len(item) > 1:
                ys.append(torch.as_tensor(item[1]))
        else:
            xs.append(item)
    if labels is not None:
        labels = torch.as_tensor(labels)
        ys, i = [], 0
        for x in xs:
            ys.append(labels[i:i + len(x)])
            i += len(x)
    return xs, (ys if ys and len(ys) == len(xs) else None)


def _compressed_layers(teacher, example, policy):
    """The convs whose input channels the policy prunes: the only reader of a channel group
    that :func:`cdfast.compress` would prune (``shrink_channels`` removes one producer's
    channels per consumer)."""
    order, leaves = execution_order(teacher, example)
    graph = ModelGraph(copy.deepcopy(teacher).eval(), example)
    _, _, keep = plan_policy(policy, order, graph, (ChannelPrune(0.5),), {}, False)
    readers = {g.consumers[0] for g in graph.groups if g.root in keep and len(g.consumers) == 1}
    names = [n for n in order if n in readers and isinstance(teacher.get_submodule(n), nn.Conv2d)
             and teacher.get_submodule(n).groups == 1]
    return names, leaves


def _n_keep(C: int, keep: float) -> int:
    return max(1, min(C, int(keep * C)))


def _zero_channels(conv: nn.Conv2d, kept: torch.Tensor) -> None:
    mask = torch.zeros(conv.in_channels, dtype=torch.bool, device=conv.weight.device)
    mask[kept] = True
    with torch.no_grad():
        conv.weight[:, ~mask] = 0


def _stats(teacher, student, name, xs) -> LayerStatistics:
    lt, ls = teacher.get_submodule(name), student.get_submodule(name)
    st = LayerStatistics(lt, dtype=torch.float64, backend="torch")
    for x in xs:
        h_t = capture_input(lambda: teacher(x), lt)
        h_s = capture_input(lambda: student(x), ls)
        st.update(h_t, h_s)
    return st


def layer_gram_terms(W: torch.Tensor, stats: LayerStatistics):
    """Per-input-channel quadratic terms of the layer-output reconstruction error.

    For ``W`` (C_out×C_in×k×k, the teacher weight) returns ``(a, b, c, Wm, G_SS, G_ST, G_TT)``:
    ``‖Σ_i β_i Z_i − Y‖² = βᵀaβ − 2bᵀβ + c`` with ``Z_i = W[:, i] * h^S_i`` and
    ``Y = W * h^T``.
    """
    C_in = W.shape[1]
    taps = W.shape[2] * W.shape[3]
    Wm = W.detach().double().reshape(W.shape[0], -1)               # C_out × D, column = i·taps + t
    G_SS, G_ST, G_TT = stats.G_SS[0].double(), stats.G_ST[0].double(), stats.G_TT[0].double()
    WtW = Wm.T @ Wm                                                 # D × D
    a = (WtW * G_SS).reshape(C_in, taps, C_in, taps).sum(dim=(1, 3))
    b = (G_ST @ WtW).diagonal().reshape(C_in, taps).sum(1)
    c = float((WtW * G_TT).sum())
    return a, b, c, Wm, G_SS, G_ST, G_TT


def reconstruction_error(W_new: torch.Tensor, W_teacher: torch.Tensor, stats: LayerStatistics) -> float:
    """``‖W_new * h^S − W_teacher * h^T‖² / ‖W_teacher * h^T‖²`` from the Grams."""
    A = W_new.detach().double().reshape(W_new.shape[0], -1)
    B = W_teacher.detach().double().reshape(W_teacher.shape[0], -1)
    G_SS, G_ST, G_TT = stats.G_SS[0].double(), stats.G_ST[0].double(), stats.G_TT[0].double()
    num = (A @ G_SS * A).sum() - 2 * (A @ G_ST * B).sum() + (B @ G_TT * B).sum()
    den = (B @ G_TT * B).sum()
    return float(num.clamp_min(0) / den.clamp_min(1e-300))


def _least_squares(Wm, G_SS, G_ST, kept, taps, ridge=1e-8):
    """Best ``W`` on the kept channels' columns: ``W_S G_SS[S,S] = W_T G_ST[S,:]ᵀ``."""
    cols = (kept.view(-1, 1) * taps + torch.arange(taps, device=kept.device).view(1, -1)).reshape(-1)
    H = G_SS[cols][:, cols]
    H = H + ridge * float(H.diagonal().mean() + 1e-300) * torch.eye(len(cols), dtype=H.dtype, device=H.device)
    R = Wm @ G_ST[cols].T                                            # C_out × |S|
    Ws = torch.linalg.solve(H, R.T).T
    out = torch.zeros_like(Wm)
    out[:, cols] = Ws
    return out


def _thinet_select(a, b, c, k):
    """Greedy removal (ThiNet): drop, one at a time, the channel whose removal keeps the
    no-refit reconstruction error ``1ᵀa1 − 2bᵀ1 + c`` over the kept set smallest."""
    C = a.shape[0]
    keep = torch.ones(C, dtype=torch.bool, device=a.device)
    for _ in range(C - k):
        # E(S \ r) − E(S) = −2 Σ_{j∈S} a_rj + a_rr + 2 b_r
        delta = -2 * (a[:, keep].sum(1)) + a.diagonal() + 2 * b
        delta[~keep] = float("inf")
        keep[int(torch.argmin(delta))] = False
    return keep.nonzero().view(-1)


def _lasso(a, b, lam, beta=None, iters=500):
    """min βᵀaβ − 2bᵀβ + λ‖β‖₁ by FISTA (vectorised)."""
    C = a.shape[0]
    beta = torch.ones(C, dtype=a.dtype, device=a.device) if beta is None else beta.clone()
    L = 2 * float(torch.linalg.eigvalsh(a).max().clamp_min(1e-300))
    z, t = beta.clone(), 1.0
    for _ in range(iters):
        g = 2 * (a @ z - b)
        u = z - g / L
        new = torch.sign(u) * torch.clamp(u.abs() - lam / L, min=0)
        t_new = 0.5 * (1 + (1 + 4 * t * t) ** 0.5)
        z = new + ((t - 1) / t_new) * (new - beta)
        if float((new - beta).abs().max()) < 1e-10 * float(new.abs().max() + 1e-300):
            beta = new
            break
        beta, t = new, t_new
    return beta


def _cp_select(a, b, k):
    """LASSO channel selection (He et al. 2017): raise λ until at most ``k`` β_i ≠ 0,
    keep the ``k`` largest ``|β_i|`` (bisection on λ)."""
    scale = float(a.diagonal().mean() + 1e-300)
    an, bn = a / scale, b / scale
    lo, hi = 0.0, float(2 * bn.abs().max() + 2 * an.abs().sum(1).max()) + 1e-12  # β = 0 at hi
    beta_best = _lasso(an, bn, lo)
    beta = beta_best
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        beta = _lasso(an, bn, mid, beta)
        nnz = int((beta != 0).sum())
        if nnz > k:
            lo = mid
        else:
            hi = mid
            beta_best = beta
            if nnz == k:
                break
    beta = beta_best if int((beta_best != 0).sum()) > 0 else beta
    score = beta.abs()
    # fill up to k with the largest no-refit channel relevance when λ zeroed too many
    score = score + 1e-12 * (b.abs() / (b.abs().max() + 1e-300))
    return torch.topk(score, k).indices.sort().values


def _l1_prune(teacher, xs, keep, policy):
    student = copy.deepcopy(teacher).eval()
    names, leaves = _compressed_layers(teacher, xs[0][:1], policy)
    kept = {}
    for n in names:
        conv = student.get_submodule(n)
        score = conv.weight.detach().abs().sum(dim=(0, 2, 3))
        k = _n_keep(conv.in_channels, keep)
        kept[n] = torch.topk(score, k).indices.sort().values
        _zero_channels(conv, kept[n])
    return student, kept, leaves


def _shrink(student, kept, leaves, xs):
    if not kept:
        return {}
    return shrink_channels(student, kept, leaves, xs[0][: min(8, len(xs[0]))])


def _block_points(model):
    from ..model.fskd import fskd_blocks

    names = {m: n for n, m in model.named_modules()}
    return [names[b] for b in fskd_blocks(model) if b in names]


def _fit_fitnet(teacher, student, xs, steps, lr, seed):
    points = _block_points(teacher)
    feats_t: dict[str, torch.Tensor] = {}
    feats_s: dict[str, torch.Tensor] = {}

    def hook(store, n):
        def f(mod, inp, out):
            store[n] = out
        return f

    hs = [teacher.get_submodule(n).register_forward_hook(hook(feats_t, n)) for n in points]
    hs += [student.get_submodule(n).register_forward_hook(hook(feats_s, n)) for n in points]
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    student.eval()  # BN statistics stay frozen on a few samples
    hint_steps = steps // 2
    try:
        for step in range(steps):
            x = xs[int(torch.randint(len(xs), (1,), generator=g))]
            with torch.no_grad():
                out_t = teacher(x)
            out_s = student(x)
            if step < hint_steps:
                loss = sum(F.mse_loss(feats_s[n], feats_t[n].detach()) for n in points
                           if feats_s[n].shape == feats_t[n].shape)
            else:
                loss = F.mse_loss(out_s, out_t)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for h in hs:
            h.remove()
    return student


def _fit_bp(student, xs, ys, steps, lr, seed):
    opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    student.eval()
    for _ in range(steps):
        i = int(torch.randint(len(xs), (1,), generator=g))
        loss = F.cross_entropy(student(xs[i]), ys[i].to(xs[i].device).long())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return student


def _reconstruct(teacher, xs, keep, policy, method):
    """ThiNet / CP: per compressed layer, in execution order, on the student so far."""
    student = copy.deepcopy(teacher).eval()
    names, leaves = _compressed_layers(teacher, xs[0][:1], policy)
    kept, layers = {}, {}
    for n in names:
        conv_t, conv_s = teacher.get_submodule(n), student.get_submodule(n)
        st = _stats(teacher, student, n, xs)
        a, b, c, Wm, G_SS, G_ST, _ = layer_gram_terms(conv_t.weight, st)
        k = _n_keep(conv_t.in_channels, keep)
        sel = _thinet_select(a, b, c, k) if method == "thinet" else _cp_select(a, b, k)
        taps = conv_t.kernel_size[0] * conv_t.kernel_size[1]
        W_new = _least_squares(Wm, G_SS, G_ST, sel, taps).reshape(conv_t.weight.shape)
        with torch.no_grad():
            conv_s.weight.copy_(W_new.to(conv_s.weight.dtype))
        kept[n] = sel
        # the L1 choice (no refit) on the same inputs, for comparison
        l1_sel = torch.topk(conv_t.weight.detach().abs().sum(dim=(0, 2, 3)), k).indices
        W_l1 = conv_t.weight.detach().clone()
        mask = torch.zeros(conv_t.in_channels, dtype=torch.bool)
        mask[l1_sel] = True
        W_l1[:, ~mask] = 0
        layers[n] = {"recon_error": reconstruction_error(conv_s.weight, conv_t.weight, st),
                     "recon_error_l1": reconstruction_error(W_l1, conv_t.weight, st),
                     "kept": sel.tolist()}
    return student, kept, leaves, layers


# ---------------------------------------------------------------------- run
FSKD_OPTIONS = ("ridge", "fit_intercept", "kept_outputs")


def run(method: str, teacher: nn.Module, data, *, keep: float, labels=None, policy: str = "resnet",
        steps: int | None = None, seed: int = 0, lr: float = 1e-3, batch_size: int = 256, **kw):
    """Compress ``teacher`` with baseline ``method``; returns ``(student, info)``.

    Args:
        method: one of :data:`METHODS`.
        teacher: the trained network (not modified).
        data: few-shot samples: a tensor, a Dataset/DataLoader of ``(x, y)`` or list of batches.
        keep: fraction of input channels kept in each compressed conv.
        labels: labels for ``data`` when it is a plain tensor (``bp`` needs labels).
        policy: layer selection as :func:`cdfast.compress` (``"resnet"``, ``"skip_first"``, ``"all"``).
        steps: iterations (bp/fitnet: default 300; nc/cross/soft: compress's default 3000).
        seed: seed of the batch order (bp/fitnet).
        lr: Adam learning rate of bp/fitnet.
        **kw: options of :func:`cdfast.compress` (``solver``, ``mu`` …), used by nc/cross/soft,
            and of :func:`cdfast.model.fskd.fskd` (``ridge``, ``fit_intercept``, ``kept_outputs``),
            used by fskd; the other methods have no such options, so one set of keywords
            can be passed to every method of a comparison.

    Returns:
        ``info``: ``method, params, flops, params_teacher, flops_teacher, seconds,
        shrink`` (per layer surgery status), ``layers`` (thinet/cp: reconstruction
        errors; compress: the report's layers).
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {METHODS}, got {method!r}")
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher: expected an nn.Module, got {type(teacher).__name__}")
    check_fraction("keep", keep)
    check_positive_int("seed", seed, 0)
    check_positive_int("batch_size", batch_size)
    if steps is not None:
        check_positive_int("steps", steps)
    check_positive_float("lr", lr)
    start = time.perf_counter()
    torch.manual_seed(seed)
    t_mode = teacher.training
    teacher.eval()
    xs, ys = _split(data, labels, batch_size)
    if not xs:
        raise ValueError("data: expected at least one sample")
    shape = tuple(xs[0].shape[1:])
    info: dict = {"method": method, "keep": keep, "policy": policy}
    if method in ("nc", "cross", "soft", "auto"):
        from ..model.compress import compress

        ckw = dict(progress=False, verbose=False)
        if steps is not None:
            ckw["steps"] = steps
        ckw.update(kw)
        student, report = compress(teacher, xs, compression=ChannelPrune(keep), loss=method, policy=policy,
                                   batch_size=batch_size, **ckw)
        info["shrink"] = report.shrink
        info["layers"] = {l.name: {"loss_before": l.loss_before, "loss_after": l.loss_after,
                                   "action": l.action, "loss": l.loss, "choice": l.choice}
                          for l in report.layers}
    elif method in ("thinet", "cp"):
        student, kept, leaves, layers = _reconstruct(teacher, xs, keep, policy, method)
        info["layers"] = layers
        info["shrink"] = _shrink(student, kept, leaves, xs)
    else:
        student, kept, leaves = _l1_prune(teacher, xs, keep, policy)
        info["shrink"] = _shrink(student, kept, leaves, xs)
        if method == "bp":
            if ys is None:
                raise ValueError("bp: needs labels (pass (x, y) batches or labels=)")
            student = _fit_bp(student, xs, ys, steps or 300, lr, seed)
        elif method == "fitnet":
            student = _fit_fitnet(teacher, student, xs, steps or 300, lr, seed)
        elif method == "fskd":
            from ..model.fskd import fskd

            from ..model.surgery import _producer

            kept_out = {}
            for cons, idx in kept.items():
                if info["shrink"].get(cons) == "removed":
                    found = _producer(teacher, leaves, cons)
                    if found is not None:
                        kept_out[found[0]] = idx
            fkw = {k: v for k, v in kw.items() if k in FSKD_OPTIONS}
            fkw.setdefault("kept_outputs", kept_out)
            student, finfo = fskd(teacher, student, xs, batch_size=batch_size, inplace=True,
                                  return_info=True, **fkw)
            info["layers"] = finfo
    student.eval()
    for p in student.parameters():
        p.requires_grad_(True)
    info.update(params=count_parameters(student), flops=count_flops(student, shape),
                params_teacher=count_parameters(teacher), flops_teacher=count_flops(teacher, shape),
                seconds=time.perf_counter() - start)
    teacher.train(t_mode)
    return student, info
