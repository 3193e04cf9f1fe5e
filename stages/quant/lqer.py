"""LQER: a low-rank correction of the quantization error of the worst tensors (Zhang et al. 2024,
arXiv:2402.02446; the asymmetric int2/int4 factor packing of PR #1797).

For the `lqer_top_k` quantized matrices with the largest ‖W − Ŵ‖_F, the error E = W − Ŵ is
approximated by its top `lqer_rank` singular directions, A = U_r·S_r (rows × r) and B = V_rᵀ (r × cols),
and both factors are stored as small integers. Dequantization (pgolf.formats.dequant, "int_per_row+lqer")
adds (q_A·s_A)(q_B·s_B) to Q·s.

Packing: when B.numel() is a multiple of 64, A is int2 ({−2, −1, 0, 1}, one fp16 scale max|A|/1.5) and
B int4 ([−8, 7], one fp16 scale max|group|/7.5 per 64 consecutive values of flattened B): A is tall and
cheap to keep coarse, B holds the directions. Otherwise both are symmetric int4 (±7) with per-row scales.

The reference factors E itself, which minimises ‖E − AB‖_F. GPTQ, though, deliberately leaves its error
in the input directions H weighs least, so that rank-r fit can raise the output error
trace(E H Eᵀ) that GPTQ minimised. With `lqer_weighted` the factors fit E·H^½ instead (the best rank-r
correction in the H-weighted norm; same storage, same decoding). Either way a correction is kept only
where it lowers the H-weighted error (the Frobenius error when H is unknown).
"""

from __future__ import annotations

import torch

from pgolf.config.sections import QuantizeConfig
from pgolf.formats.dequant import decode_lqer_factor
from pgolf.quant.encode import Encoded
from pgolf.quant.gptq import weighted_error
from pgolf.quant.grid import round_to_scale

GROUP = 64


def error_factors(error: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with A @ B the best rank-`rank` approximation of `error` (Eckart–Young)."""
    u, s, vh = torch.linalg.svd(error.double(), full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).float(), vh[:r].float()


def hessian_roots(hessian: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(H^½, H^−½) of the damped H (float64), the maps between E and E·H^½; one eigh per tensor."""
    h = hessian.double()
    h = h + max(damp, 1e-6) * float(torch.diag(h).mean().clamp_min(1e-12)) * torch.eye(h.shape[0], dtype=h.dtype,
                                                                                       device=h.device)
    eigvals, eigvecs = torch.linalg.eigh(h)
    root = eigvals.clamp_min(1e-12).sqrt()
    return (eigvecs * root) @ eigvecs.T, (eigvecs / root) @ eigvecs.T


def weighted_error_factors(error: torch.Tensor, roots: tuple[torch.Tensor, torch.Tensor], rank: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) minimising trace((E − AB) H (E − AB)ᵀ): factor E·H^½, then map B back with H^−½."""
    root, inv_root = roots
    a, b = error_factors(error.double().to(root.device) @ root, rank)
    return a, (b.double() @ inv_root).float()


def quantize_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict]:
    """(stored parts, schema meta) of the two factors."""
    if b.numel() % GROUP == 0:
        qa, sa = round_to_scale(a, a.abs().max() / 1.5, -2, 1)
        groups = b.reshape(-1, GROUP)
        qb, sb = round_to_scale(groups, groups.abs().amax(dim=1, keepdim=True) / 7.5, -8, 7)
        parts = {"lqer_a": qa, "lqer_a_scales": sa.reshape(1), "lqer_b": qb.reshape(b.shape),
                 "lqer_b_scales": sb.flatten()}
        meta = {"packing": "asym", "group": GROUP, "a_bits": 2, "b_bits": 4}
    else:
        qa, sa = round_to_scale(a, a.abs().amax(dim=1, keepdim=True) / 7, -7, 7)
        qb, sb = round_to_scale(b, b.abs().amax(dim=1, keepdim=True) / 7, -7, 7)
        parts = {"lqer_a": qa, "lqer_a_scales": sa.flatten(), "lqer_b": qb, "lqer_b_scales": sb.flatten()}
        meta = {"packing": "sym", "group": 0, "a_bits": 4, "b_bits": 4}
    return {k: v.contiguous() for k, v in parts.items()}, meta


def lowrank_term(parts: dict[str, torch.Tensor], meta: dict) -> torch.Tensor:
    a = decode_lqer_factor(parts["lqer_a"], parts["lqer_a_scales"], 0, "lqer")
    b = decode_lqer_factor(parts["lqer_b"], parts["lqer_b_scales"], meta["group"], "lqer")
    return a @ b


def int_error(enc: Encoded, original: torch.Tensor) -> torch.Tensor | None:
    """W − Q·s of a per-row integer encoding (the error LQER corrects); None for other encodings."""
    if enc.entry["encoding"] != "int_per_row" or enc.parts["codes"].ndim != 2:
        return None
    w_hat = enc.parts["codes"].float() * enc.parts["scales"].float()[:, None]
    return original.detach().cpu().float() - w_hat


def with_lqer(enc: Encoded, original: torch.Tensor, cfg: QuantizeConfig, hessian: torch.Tensor | None = None,
              roots: tuple[torch.Tensor, torch.Tensor] | None = None) -> Encoded | None:
    """`enc` plus a rank-`lqer_rank` correction of its error (a new Encoded), or None where the correction
    would not lower the error (H-weighted where H fits, else Frobenius). roots: hessian_roots(H), if known."""
    e = int_error(enc, original)
    if e is None:
        return None
    if hessian is not None and tuple(hessian.shape) != (e.shape[1], e.shape[1]):
        hessian = None
    weighted = bool(cfg.lqer_weighted and hessian is not None)
    if weighted:
        roots = roots or hessian_roots(hessian, cfg.gptq_damp)
        parts, meta = quantize_factors(*weighted_error_factors(e, roots, cfg.lqer_rank))
    else:
        parts, meta = quantize_factors(*error_factors(e, cfg.lqer_rank))
    left = e - lowrank_term(parts, meta)
    if hessian is not None:
        if weighted_error(left, torch.zeros_like(left), hessian) >= weighted_error(e, torch.zeros_like(e), hessian):
            return None
    elif float(left.norm()) >= float(e.norm()):
        return None
    entry = {**enc.entry, "encoding": "int_per_row+lqer",
             "lqer": {"rank": int(parts["lqer_a"].shape[1]), "weighted": weighted, **meta}}
    return Encoded({**enc.parts, **parts}, entry)


def add_lqer(encoded: dict[str, Encoded], originals: dict[str, torch.Tensor], cfg: QuantizeConfig,
             hessians: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Give the top-k per-row quantized tensors (by ‖W − Ŵ‖_F) a low-rank correction, in place.

    A correction that would not lower the error is left out with a notice. Returns the names corrected.
    """
    hessians = hessians or {}
    errors = {name: e for name, enc in encoded.items() if (e := int_error(enc, originals[name])) is not None}
    ranked = sorted(errors, key=lambda n: float(errors[n].norm()), reverse=True)[:cfg.lqer_top_k]
    corrected = []
    for name in ranked:
        better = with_lqer(encoded[name], originals[name], cfg, hessians.get(name))
        if better is None:
            fits = hessians.get(name) is not None and tuple(hessians[name].shape) == (errors[name].shape[1],) * 2
            print(f"quantize: note: LQER left out for {name}: its correction would raise the "
                  f"{'H-weighted' if fits else 'Frobenius'} error")
            continue
        encoded[name] = better
        corrected.append(name)
    return corrected
