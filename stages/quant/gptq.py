"""GPTQ (Frantar et al. 2022, arXiv:2210.17323), full Hessian, as the record scripts run it (PR #1855).

For a weight W (rows = out, cols = in) whose inputs x have second moment H = E[x xᵀ], the output error
of Ŵ is E‖(W − Ŵ)x‖² = trace((W − Ŵ) H (W − Ŵ)ᵀ). GPTQ quantizes one column at a time and moves each
column's rounding error onto the columns not yet quantized, weighted by H⁻¹, so that later columns
compensate for it. The per-row scale is fixed up front (by the caller's clip), so the codes use
exactly the grid that is stored.
"""

from __future__ import annotations

import torch

from pgolf.errors import PgolfError
from pgolf.quant.grid import levels


def check_hessian(name: str, hessian: torch.Tensor, cols: int) -> None:
    if tuple(hessian.shape) != (cols, cols):
        raise PgolfError(f"tensor {name!r}: its Hessian has shape {tuple(hessian.shape)}, the weight has {cols} "
                         f"input columns (expected {cols}×{cols}); the Hessians are from another model")
    if not bool(torch.isfinite(hessian).all()):
        raise PgolfError(f"tensor {name!r}: its Hessian holds NaN or inf; re-run `pgolf calibrate`")


def upper_cholesky_of_inverse(h: torch.Tensor, name: str) -> torch.Tensor:
    """U with UᵀU = H⁻¹: row j of U carries how column j's error spreads over the columns after it."""
    factor, info = torch.linalg.cholesky_ex(h)
    if int(info) == 0:
        factor, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(factor), upper=True)
    if int(info) != 0:
        raise PgolfError(f"tensor {name!r}: its damped Hessian is not positive definite; "
                         "raise gptq_damp (e.g. --set gptq_damp=0.1)")
    return factor


def gptq_quantize(w: torch.Tensor, hessian: torch.Tensor, scale: torch.Tensor, bits: int, damp: float,
                  block_size: int, act_order: bool, name: str) -> torch.Tensor:
    """int8 codes (−R..R, R = 2^(bits−1) − 1) of w, in w's column order; Ŵ = codes · scale[:, None].

    w: rows × cols; hessian: cols × cols; scale: one (positive) step per row, as it will be stored.
    Runs on the device of `hessian` (move both there for GPU speed).
    """
    if w.ndim != 2:
        raise PgolfError(f"tensor {name!r}: GPTQ needs a 2-D weight, got shape {tuple(w.shape)}")
    rows, cols = w.shape
    check_hessian(name, hessian, cols)
    device = hessian.device
    W = w.detach().to(device, torch.float32).clone()
    H = hessian.detach().to(device, torch.float32).clone()
    s = scale.detach().to(device, torch.float32)
    R = levels(bits)

    # Columns no input ever reached carry no information: quantize them to 0 and keep H invertible.
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(damp * float(torch.diag(H).mean()))

    # Act-order: the columns with the largest input energy go first, while most columns are left to
    # absorb their error.
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]

    U = upper_cholesky_of_inverse(H, name)
    Q = torch.zeros(rows, cols, dtype=torch.float32, device=device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        block = W[:, start:end].clone()
        errors = torch.zeros_like(block)
        u = U[start:end, start:end]
        for j in range(end - start):
            q = torch.clamp(torch.round(block[:, j] / s), -R, R)
            Q[:, start + j] = q
            err = (block[:, j] - q * s) / u[j, j]
            block[:, j:] -= err[:, None] * u[j, j:][None, :]
            errors[:, j] = err
        # Lazy update: the rest of the matrix sees the whole block's error at once (one matmul).
        W[:, end:] -= errors @ U[start:end, end:]

    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.int8).cpu().contiguous()


def weighted_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor) -> float:
    """trace((W − Ŵ) H (W − Ŵ)ᵀ): the expected squared output error over the calibration inputs."""
    e = (w.detach().double() - w_hat.detach().double())
    return float(((e @ hessian.detach().double()) * e).sum())


def loss_error(w: torch.Tensor, w_hat: torch.Tensor, hessian: torch.Tensor, out_grad_sq: torch.Tensor) -> float:
    """½ Σ_r G_r (W − Ŵ)_r H (W − Ŵ)_rᵀ: the loss (nats per token) that Ŵ's error costs to second order, with
    G = E[(∂L/∂y)²] of the outputs (diagonal, Kronecker-factored Fisher; Martens & Grosse 2015)."""
    e = (w.detach().double() - w_hat.detach().double())
    per_row = ((e @ hessian.detach().double()) * e).sum(1)
    return float(0.5 * (out_grad_sq.detach().double() * per_row).sum())
