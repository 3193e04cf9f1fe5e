"""Muon: momentum SGD whose update is orthogonalised by a Newton–Schulz iteration.

Each 2-D update G is replaced by (approximately) U Vᵀ from its SVD, scaled by √max(1, rows/cols).
Under torch.distributed each rank orthogonalises every world_size-th matrix and the updates are
summed across ranks, so the work is shared and all ranks apply identical updates.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# The quintic iteration's coefficients (Jordan et al.); five steps suffice in bf16.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def newton_schulz(G: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    a, b, c = NS_COEFFICIENTS
    X = G.to(dtype)
    X = X / (X.norm() + eps)
    transposed = G.size(0) > G.size(1)
    if transposed:
        X = X.T
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if transposed else X


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, backend_steps: int = 5, nesterov: bool = True,
                 ns_dtype: torch.dtype = torch.bfloat16):
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        distributed = dist.is_available() and dist.is_initialized()
        world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            updates = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=self.ns_dtype)
            offset = 0
            for i, p in enumerate(params):
                if i % world == rank and p.grad is not None:
                    g = p.grad
                    buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(g))
                    buf.mul_(group["momentum"]).add_(g)
                    if group["nesterov"]:
                        g = g.add(buf, alpha=group["momentum"])
                    g = newton_schulz(g, steps=group["backend_steps"], dtype=self.ns_dtype)
                    g = g * max(1.0, g.size(0) / g.size(1)) ** 0.5
                    updates[offset:offset + p.numel()] = g.reshape(-1)
                offset += p.numel()
            if distributed:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            offset = 0
            for p in params:
                p.add_(updates[offset:offset + p.numel()].view_as(p).to(p.dtype), alpha=-group["lr"])
                offset += p.numel()
