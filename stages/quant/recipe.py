"""A whole state dict by one recipe: encode every tensor, correct the worst with LQER, store, report errors.

The report's weighted error, trace((W − Ŵ) H (W − Ŵ)ᵀ), is the expected squared output error over the
calibration inputs; it is given wherever the Hessians hold the tensor's H, whatever the method.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch

from pgolf.config.sections import QuantizeConfig, gradient_widths
from pgolf.errors import PgolfError
from pgolf.formats.dequant import decode_entry, dtype_name
from pgolf.nn.names import tensor_group
from pgolf.quant.encode import Encoded, encode_tensor, is_quantized, store_encoded
from pgolf.quant.gptq import weighted_error
from pgolf.quant.lqer import add_lqer
from pgolf.report.progress import Bar


def _error_stats(original: torch.Tensor, restored: torch.Tensor) -> dict[str, float]:
    w, w_hat = original.detach().double(), restored.detach().double()
    if not w.numel():
        return {"max_abs_err": 0.0, "rmse": 0.0, "rel_err": 0.0}
    diff = w - w_hat
    norm = float(w.norm())
    return {"max_abs_err": float(diff.abs().max()), "rmse": float(diff.pow(2).mean().sqrt()),
            "rel_err": float(diff.norm()) / norm if norm > 0 else float(diff.norm())}


def _report_row(name: str, enc: Encoded, t: torch.Tensor, tensors: dict[str, torch.Tensor],
                h: torch.Tensor | None) -> dict[str, Any]:
    """One tensor's line of the report: how it is stored, its size and its errors."""
    restored = decode_entry(name, enc.entry, tensors, "quantize")
    original = t.detach().cpu()
    stats = (_error_stats(original, restored) if original.is_floating_point()
             else {"max_abs_err": 0.0, "rmse": 0.0, "rel_err": 0.0})
    fits = h is not None and original.ndim == 2 and tuple(h.shape) == (original.shape[1],) * 2
    entry = enc.entry
    stored_as = (f"int{entry['bits']} {entry['scheme'].replace('_', '-')}" if entry["bits"]
                 else dtype_name(next(iter(enc.parts.values())).dtype))
    if "lqer" in entry:
        stored_as += f" +lqer r{entry['lqer']['rank']}"
    return {"name": name, "method": entry["method"], "bits": entry["bits"], "clip": entry["clip"],
            "fallback": entry.get("fallback"), "stored_as": stored_as,
            "shape": entry["shape"], "dtype": entry["dtype"], "numel": original.numel(),
            "original_bytes": original.numel() * original.element_size(),
            "stored_bytes": sum(p.numel() * p.element_size() for p in enc.parts.values()),
            "weighted_err": weighted_error(original, restored, h) if fits else None, **stats}


def gradient_guided_bits(state_dict: dict[str, torch.Tensor], cfg: QuantizeConfig, hessians: dict[str, torch.Tensor],
                         out_grads: dict[str, torch.Tensor]) -> dict[str, int]:
    """PR #375's mixed precision: the quantized tensors no group pins, ranked by E‖∂L/∂W‖² per token, which
    calibrate's statistics give as (Σ_r G_r)·trace(H) (per-token gradient g xᵀ, g and x taken independent),
    get the widths of `gradient_bits` in turn: the most sensitive fraction the first width, and so on."""
    candidates = [name for name, t in state_dict.items() if is_quantized(t, cfg) and t.ndim == 2
                  and not (tensor_group(name) and cfg.group_overrides(tensor_group(name))[0])]
    # a lookup table (PR #398's bigram hash embedding) is no matmul's weight, so calibrate has no H for it: it
    # keeps quantize.bits, unranked
    ranked = [n for n in candidates if n in hessians]
    missing = [n for n in ranked if n not in out_grads] if hessians else candidates
    if missing:
        raise PgolfError(f"quantize.gradient_bits ranks tensors by calibrate's statistics, which lack {missing[:3]}; "
                         "give --hessians from `pgolf calibrate` (with output_grads on)")
    if candidates and not ranked:
        raise PgolfError(f"quantize.gradient_bits has no tensor to rank: the quantized matrices {candidates[:3]} "
                         "are lookup tables, which calibrate gives no Hessian; leave gradient_bits off for this model")
    score = {n: float(out_grads[n].double().sum() * torch.trace(hessians[n].double())) for n in ranked}
    ranked.sort(key=lambda n: -score[n])
    bits, at = {}, 0
    widths = gradient_widths(cfg)
    for i, (b, frac) in enumerate(widths):
        count = len(ranked) - at if i == len(widths) - 1 else round(frac * len(ranked))
        bits.update({n: b for n in ranked[at:at + count]})
        at += count
    return bits


def quantize_state_dict(state_dict: dict[str, torch.Tensor], cfg: QuantizeConfig,
                        hessians: dict[str, torch.Tensor] | None = None, encoded: dict[str, Encoded] | None = None,
                        bits: dict[str, int] | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], dict[str, Any]]:
    """(tensors for quantized.safetensors, schema {name: entry}, report with per-tensor errors).

    The report's weighted error, trace((W − Ŵ) H (W − Ŵ)ᵀ), is given wherever `hessians` has the tensor's H.
    `encoded`: every tensor already encoded (the budget search's choice, pgolf.quant.budget); used as given.
    `bits`: a width per tensor (gradient_guided_bits), over `cfg.bits`.
    """
    hessians, bits = hessians or {}, bits or {}
    if encoded is None:
        with Bar(f"quantize ({cfg.method})", len(state_dict), "tensors") as bar:
            encoded = {name: encode_tensor(name, t, replace(cfg, bits=bits[name]) if name in bits else cfg,
                                           hessians.get(name))
                       for name, t in bar.track(state_dict.items())}
        if cfg.lqer_top_k:
            add_lqer(encoded, state_dict, cfg, hessians)
    fallbacks = {name: enc.entry["fallback"] for name, enc in encoded.items() if "fallback" in enc.entry}
    if fallbacks:
        print(f"quantize: note: {cfg.method} fell back to rtn for {len(fallbacks)} tensor(s): "
              + ", ".join(f"{n} ({why})" for n, why in fallbacks.items())
              + ("; give --hessians from `pgolf calibrate`" if any("Hessian" in w for w in fallbacks.values()) else ""))
    tensors, schema = store_encoded(encoded, state_dict)
    with Bar("quantize: errors", len(encoded), "tensors") as bar:
        rows = [_report_row(name, enc, state_dict[name], tensors, hessians.get(name))
                for name, enc in bar.track(encoded.items())]
    quantized = [r for r in rows if r["method"] not in ("keep_float", "passthrough")]
    sq_err = sum(r["rmse"] ** 2 * r["numel"] for r in quantized)
    n_q = sum(r["numel"] for r in quantized)
    weighted = [r["weighted_err"] for r in quantized if r["weighted_err"] is not None]
    totals = {
        "tensors": len(rows), "quantized_tensors": len(quantized), "params": sum(r["numel"] for r in rows),
        "quantized_params": n_q, "original_bytes": sum(r["original_bytes"] for r in rows),
        "stored_bytes": sum(r["stored_bytes"] for r in rows),
        "max_abs_err": max((r["max_abs_err"] for r in rows), default=0.0),
        "quantized_rmse": math.sqrt(sq_err / n_q) if n_q else 0.0,
        "weighted_err": sum(weighted) if weighted else None, "weighted_tensors": len(weighted),
        "fallback_tensors": sorted(fallbacks), "lqer_tensors": sorted(n for n, e in schema.items() if "lqer" in e),
    }
    return tensors, schema, {"tensors": rows, "totals": totals}
