"""A plain eager implementation of the authors' per-layer procedure (SPEC §4).

Written from the procedure, independently of cdfast: four convolutions per step
(the teacher and student layers each on h^T and h^S), ``torch.optim.Adam`` on the
weight, gradient and optimizer state masked, the top-k input-channel budget
shrinking linearly over the first third of the steps, then the mask fixed and
the learning rate divided by 10. The tests hold cdfast's solvers to it step for
step, and ``bench/`` times it as the reference.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def authors_channel_counts(ci: int, target: int, steps: int) -> list[int]:
    """The input channels the procedure keeps after each ramp step ``i = 0 … ⌊T/3⌋``.

    The released ``chnl_learner.py``'s formula, evaluated in its order (the fraction first,
    then the product). It reaches ``target`` only when ``T/3`` is close enough to an
    integer: with ``T = 20`` it stops at ``target + ⌊(C_in − target)/10⌋`` (281 of 512
    channels for a target of 256), a budget cdfast's schedule does not share (it always
    ends on the target), so comparisons with cdfast use step counts where it does.
    """
    third = steps / 3
    return [int((ci - target) * float((third - i) / third)) + target if third > 0 else target
            for i in range(steps // 3 + 1)]


def authors_channel_prune(teacher: nn.Conv2d, h_t: torch.Tensor, h_s: torch.Tensor, keep: float,
                          steps: int, lr: float, mu: float | None = 0.6, record: bool = False,
                          compile_step: bool = False):
    """Returns ``(weight, mask, losses)``; ``mu=None`` is the no-cross ``nc`` loss.

    ``losses[i]`` is the loss at step ``i``'s gradient point (float64 if the inputs are).
    """
    full = copy.deepcopy(teacher).to(h_t.dtype)
    student = copy.deepcopy(teacher).to(h_t.dtype)
    for p in full.parameters():
        p.requires_grad_(False)
    student.bias.requires_grad_(False) if student.bias is not None else None
    weight = student.weight
    co, ci = weight.shape[:2]
    target = int(keep * ci + 1e-9)
    opt = torch.optim.Adam([weight], lr=lr, foreach=False)
    mask = torch.ones_like(weight)
    prev = ci
    losses = []

    def loss_fn():
        y_tt, y_st = full(h_t), full(h_s)
        y_ts, y_ss = student(h_t), student(h_s)
        n = y_tt.numel()
        if mu is None:
            return (y_ss - y_tt).pow(2).sum() / n
        lc = (y_ts - y_tt).pow(2).sum() / n
        li = (y_st - y_ss).pow(2).sum() / n
        return mu * lc + (1 - mu) * li

    step_loss = torch.compile(loss_fn) if compile_step else loss_fn
    counts = authors_channel_counts(ci, target, steps)
    for i in range(steps):
        loss = step_loss()
        opt.zero_grad()
        loss.backward()
        weight.grad.mul_(mask)
        state = opt.state[weight]
        if state:
            state["exp_avg"].mul_(mask)
            state["exp_avg_sq"].mul_(mask)
        opt.step()
        if record:
            losses.append(float(loss.detach()))
        if i <= steps // 3:
            left = counts[i]
            if left < prev:
                with torch.no_grad():
                    norms = weight.permute(1, 0, 2, 3).reshape(ci, -1).norm(dim=1)
                    thresh = torch.topk(norms, left).values[-1]
                    weight[:, norms < thresh] = 0
                prev = left
            alive = weight.detach().permute(1, 0, 2, 3).reshape(ci, -1).abs().sum(1) > 0
            mask = alive.to(weight.dtype)[None, :, None, None].expand_as(weight).clone()
        else:
            for group in opt.param_groups:
                group["lr"] = lr * 0.1
    if not record:
        losses.append(float(loss_fn().detach()))
    return weight.detach(), mask.bool(), losses
