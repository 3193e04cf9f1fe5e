"""Reptile (PR #375's study: inner lr 0.1, outer 0.01, 3 inner steps over the last 20 % of training; Nichol et
al. 2018, "On First-Order Meta-Learning Algorithms"), `train.reptile_frac`.

One outer step: save θ, take `inner_steps` plain SGD steps θ ← θ − inner_lr·∇L_k(θ) on consecutive
micro-batches (the meta-objective is fast adaptation, which is what score-first TTT does at evaluation),
then move the saved weights toward the result, θ ← θ + outer_lr·(θ' − θ).

The trainer takes this step instead of its regular one during the last `reptile_frac` of the run (by the same
progress as the rest of the schedule: steps, or wall-clock under a cap). The regular optimizers are paused
then: they do not step, and their state (Adam moments, Muon momentum) is left as it was. Reptile's rates are
the study's fixed values, not scaled by the LR schedule. Under torchrun each rank takes its own micro-batch and
DDP averages the inner gradients, so every rank's θ' (and θ) stays the same.
"""

from __future__ import annotations

from typing import Callable

import torch


def reptile_step(params: list[torch.Tensor], inner_loss: Callable[[int], torch.Tensor], inner_lr: float,
                 outer_lr: float, inner_steps: int) -> torch.Tensor:
    """One outer step over `params` (updated in place); `inner_loss(k)` is inner step k's loss, backpropagated
    here. Gradients are left cleared. Returns the inner losses' mean (each at the weights it was taken at)."""
    start = [p.detach().clone() for p in params]
    total = torch.zeros((), device=params[0].device)
    for k in range(inner_steps):
        loss = inner_loss(k)
        loss.backward()
        with torch.no_grad():
            for p in params:
                if p.grad is not None:
                    p.add_(p.grad.to(p.dtype), alpha=-inner_lr)
                    p.grad = None
        total += loss.detach().float()
    with torch.no_grad():
        for p, theta in zip(params, start):  # in float32 where the weight is stored lower (the bf16 embedding)
            p.copy_(theta.float() + outer_lr * (p.float() - theta.float()))
    return total / inner_steps
