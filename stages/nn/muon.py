"""Muon: momentum SGD whose update is orthogonalised by a Newton–Schulz iteration.

Each 2-D update G is replaced by (approximately) U Vᵀ from its SVD, scaled by √max(1, rows/cols). A 3-D
parameter is a stack of matrices (the block-diagonal factors of a Monarch MLP, pgolf.nn.studies): each is
orthogonalised (and scaled by its rows/cols) on its own, as the block-diagonal matrix they make would be.
Options of the record runs: MuonEq-R (normalise the update's rows first), the Polar-Express
per-iteration coefficients, and decoupled weight decay W ← W·(1 − lr·wd).
Under torch.distributed each rank orthogonalises every world_size-th matrix and the updates are
summed across ranks, so the work is shared and all ranks apply identical updates. Each rank therefore
holds only its own matrices' momentum; `gathered_state_dict` collects all of them for a saved state.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# (a, b, c) of X ← aX + (bA + cA²)X, A = XXᵀ, per iteration (the last repeats if more steps are asked).
NS_COEFFICIENTS = {
    "classic": [(3.4445, -4.7750, 2.0315)],  # Jordan et al.; five steps suffice in bf16
    "polar_express": [  # tuned per iteration; converges tighter in the same five steps
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.042929935166739, -2.808917465908714, 0.5000178451051316),
        (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
        (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
        (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
    ],
}


def newton_schulz(G: torch.Tensor, steps: int, dtype: torch.dtype, coefficients: str, eps: float = 1e-7) -> torch.Tensor:
    """The orthogonalised G [rows, cols], or a stack of same-shaped matrices [n, rows, cols] at once (one batched
    matmul per iteration instead of one per matrix: a step's dozens of small matmuls are launch-bound)."""
    coeffs = NS_COEFFICIENTS[coefficients]
    X = G.to(dtype)
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + eps)
    transposed = G.size(-2) > G.size(-1)
    if transposed:
        X = X.mT
    for i in range(steps):
        a, b, c = coeffs[min(i, len(coeffs) - 1)]
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if transposed else X


class Muon(torch.optim.Optimizer):
    def __init__(self, params, lr: float, momentum: float, backend_steps: int, ns_dtype: torch.dtype,
                 coefficients: str, row_norm: bool, weight_decay: float, nesterov: bool = True, cautious: bool = False):
        if coefficients not in NS_COEFFICIENTS:
            raise ValueError(f"unknown Newton–Schulz coefficients {coefficients!r}; choose {', '.join(NS_COEFFICIENTS)}")
        super().__init__(params, dict(lr=lr, momentum=momentum, backend_steps=backend_steps, nesterov=nesterov,
                                      coefficients=coefficients, row_norm=row_norm, weight_decay=weight_decay,
                                      cautious=cautious))
        self.ns_dtype = ns_dtype

    @staticmethod
    def _world() -> tuple[int, int, bool]:
        distributed = dist.is_available() and dist.is_initialized()
        return (dist.get_world_size(), dist.get_rank(), True) if distributed else (1, 0, False)

    def _params_owned(self) -> list[tuple[torch.Tensor, bool]]:
        """Every parameter in state-dict order, with whether this rank updates it (every world-th of a group)."""
        world, rank, _ = self._world()
        return [(p, i % world == rank) for group in self.param_groups for i, p in enumerate(group["params"])]

    @torch.no_grad()
    def gathered_state_dict(self) -> dict:
        """The state dict with every rank's momentum buffers (a collective: every rank must call it)."""
        if not self._world()[2]:
            return self.state_dict()
        owned = self._params_owned()
        mine = [self.state[p].get("momentum_buffer") if own and p in self.state else None for p, own in owned]
        # a matrix without a gradient yet has no buffer on its owner either
        has = torch.tensor([b is not None for b in mine], dtype=torch.int32, device=owned[0][0].device)
        dist.all_reduce(has)
        has = has.tolist()
        sd = self.state_dict()
        sd["state"] = {}
        for n, ((p, _), buf) in enumerate(zip(owned, mine)):
            if has[n]:
                buf = buf.clone() if buf is not None else torch.zeros_like(p)
                dist.all_reduce(buf)  # only the owner's copy is non-zero
                sd["state"][n] = {"momentum_buffer": buf}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a (gathered) state; this rank keeps only the buffers of the matrices it updates."""
        super().load_state_dict(state_dict)
        for p, own in self._params_owned():
            if not own:
                self.state.pop(p, None)

    @torch.no_grad()
    def step(self, closure=None):
        world, rank, distributed = self._world()
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue
            updates = torch.zeros(sum(p.numel() for p in params), device=params[0].device, dtype=self.ns_dtype)
            offsets, offset = [], 0
            for p in params:
                offsets.append(offset)
                offset += p.numel()
            # this rank's matrices (every world-th), stacked by shape so each shape orthogonalises in one batch
            by_shape: dict[tuple[int, ...], list[int]] = {}
            for i, p in enumerate(params):
                if i % world == rank and p.grad is not None:
                    by_shape.setdefault(tuple(p.shape), []).append(i)
            for shape, index in by_shape.items():
                grads = [params[i].grad for i in index]
                bufs = [self.state[params[i]].setdefault("momentum_buffer", torch.zeros_like(g))
                        for i, g in zip(index, grads)]
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, grads)
                g = torch.stack(torch._foreach_add(grads, bufs, alpha=group["momentum"]) if group["nesterov"] else bufs)
                if group["row_norm"]:  # MuonEq-R
                    g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-7)
                g = newton_schulz(g, steps=group["backend_steps"], dtype=self.ns_dtype, coefficients=group["coefficients"])
                g = g * max(1.0, shape[-2] / shape[-1]) ** 0.5  # a 3-D parameter: its blocks' rows / cols
                for j, i in enumerate(index):
                    updates[offsets[i]:offsets[i] + params[i].numel()] = g[j].reshape(-1)
            if distributed:
                dist.all_reduce(updates, op=dist.ReduceOp.SUM)
            for p, offset in zip(params, offsets):
                update = updates[offset:offset + p.numel()].view_as(p).to(p.dtype)
                if group["weight_decay"] and group.get("cautious"):
                    # cautious weight decay: only where the step already moves w towards 0 (update and w agree)
                    p.sub_(p * (update * p > 0), alpha=group["lr"] * group["weight_decay"])
                elif group["weight_decay"]:
                    p.mul_(1.0 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
