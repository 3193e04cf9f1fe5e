"""Quantization building blocks: weights → integer codes + scales, and back.

`quantize_state_dict` turns a float state dict into the tensors of `quantized.safetensors` plus a
per-tensor schema that makes them self-describing; `dequantize` needs nothing but those two. With
`bits=8` and the default percentile clip it reproduces the challenge baseline's int8 export exactly
(TECHNIQUES.md §5.2): per-row clip at the 99.99984th percentile of |w|, fp16 row scales floored at
1/127, small float tensors kept (fp16; control tensors fp32).

Methods (how codes are chosen: `rtn`, `gptq`) and encodings (how stored parts decode) live in two
registries. Per-group bit widths and clips are resolved per tensor name before a method runs; LQER
(stages/lqer.py) adds a low-rank correction to the worst tensors afterwards, stored under its own
encoding so that a reader which does not know it refuses the file instead of dropping the correction.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .artifacts import PgolfError
from .config import QuantizeConfig, resolve_device
from .model import CONTROL_TENSOR_PATTERNS

# The small tensors that steer the residual stream stay fp32 (as in the reference export): the model's
# control tensors. Matching is by substring, so these cover every name of the reference's own list too
# (attn_scales, resid_mixes, skip_weights, ...).
CONTROL_PATTERNS = CONTROL_TENSOR_PATTERNS
OFFICIAL_INT8_FORMAT = "int8_clean_per_row_v1"
CLIPS = ("percentile", "sdclip")
MIN_BITS, MAX_BITS = 2, 8
# The reference's int8 floor: a row whose clip is below 1 still gets step 1/127. Kept bit-exact for the
# reference path only; at lower bits a floor of 1/R would round every trained weight to 0 (R = 1 at
# 2 bits), so there the scale only avoids zero (fp16's smallest subnormal) for all-zero rows.
REFERENCE_INT8_SCALE_FLOOR = 1.0 / 127.0
ZERO_ROW_GUARD = 2.0 ** -24
# torch.quantile refuses inputs above 2^24 elements; rows are processed in chunks below that.
QUANTILE_MAX_NUMEL = 1 << 24

# Dtypes a stored file may name; anything else is refused rather than looked up with getattr.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: Any, source: str) -> torch.dtype:
    if name not in DTYPES:
        raise PgolfError(f"{source}: unsupported dtype {name!r}; the file is corrupt or from another tool")
    return DTYPES[name]


def levels(bits: int) -> int:
    """R: codes run over −R..R (symmetric, so zero is exact)."""
    return 2 ** (bits - 1) - 1


def validate_config(cfg: QuantizeConfig, source: str = "quantize params") -> None:
    if not MIN_BITS <= cfg.bits <= MAX_BITS:
        raise PgolfError(f"{source}: bits={cfg.bits} is out of range; choose {MIN_BITS}..{MAX_BITS}")
    if cfg.method not in QUANTIZERS:
        raise PgolfError(f"{source}: unknown method {cfg.method!r}; choose one of {', '.join(QUANTIZERS)}")
    if cfg.clip not in CLIPS:
        raise PgolfError(f"{source}: unknown clip {cfg.clip!r}; choose one of {', '.join(CLIPS)}")
    if not 0.0 < cfg.clip_percentile <= 100.0:
        raise PgolfError(f"{source}: clip_percentile={cfg.clip_percentile} must be in (0, 100]")
    if not (cfg.sdclip_k > 0 and math.isfinite(cfg.sdclip_k)):
        raise PgolfError(f"{source}: sdclip_k={cfg.sdclip_k} must be a positive number")
    if cfg.keep_float_max_numel < 0:
        raise PgolfError(f"{source}: keep_float_max_numel={cfg.keep_float_max_numel} must be >= 0")
    for group in GROUPS:
        bits, k = getattr(cfg, f"{group}_bits"), getattr(cfg, f"{group}_k")
        if bits != 0 and not MIN_BITS <= bits <= MAX_BITS:
            raise PgolfError(f"{source}: {group}_bits={bits} is out of range; choose 0 (use bits) or {MIN_BITS}..{MAX_BITS}")
        if not (k >= 0 and math.isfinite(k)):
            raise PgolfError(f"{source}: {group}_k={k} must be 0 (use sdclip_k) or a positive number")
    if not (cfg.gptq_damp >= 0 and math.isfinite(cfg.gptq_damp)) or cfg.gptq_block_size < 1:
        raise PgolfError(f"{source}: gptq_damp must be >= 0 and gptq_block_size >= 1")
    if cfg.lqer_top_k < 0 or cfg.lqer_rank < 1:
        raise PgolfError(f"{source}: lqer_top_k must be >= 0 and lqer_rank >= 1")


# Tensor groups that may get their own bits / SDClip k: name → group, by the baseline's parameter names.
GROUPS = ("embed", "attn", "mlp")


def tensor_group(name: str) -> str | None:
    if name.startswith(("tok_emb.", "lm_head.")):
        return "embed"
    if any(f".attn.{m}." in f".{name}" for m in ("c_q", "c_k", "c_v", "proj")):
        return "attn"
    if any(f".mlp.{m}." in f".{name}" for m in ("fc", "proj")):
        return "mlp"
    return None


def config_for(name: str, cfg: QuantizeConfig) -> QuantizeConfig:
    """cfg with bits and sdclip_k replaced by the overrides of the tensor's group, where set."""
    group = tensor_group(name)
    if group is None:
        return cfg
    bits, k = getattr(cfg, f"{group}_bits"), getattr(cfg, f"{group}_k")
    return replace(cfg, bits=bits or cfg.bits, sdclip_k=k or cfg.sdclip_k)


def is_control(name: str) -> bool:
    return any(p in name for p in CONTROL_PATTERNS)


# ---------------------------------------------------------------------------------------------------
# Round-to-nearest, symmetric

def _quantile_flat(x: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(x, q) (linear interpolation) for 1-D inputs of any size."""
    if x.numel() <= QUANTILE_MAX_NUMEL:
        return torch.quantile(x, q)
    values = x.sort().values
    rank = torch.tensor(q, dtype=x.dtype) * (x.numel() - 1)
    below = int(rank.floor())
    above = min(int(rank.ceil()), x.numel() - 1)
    return torch.lerp(values[below], values[above], rank - below)


def _row_quantile(a: torch.Tensor, q: float) -> torch.Tensor:
    rows_per_chunk = max(1, QUANTILE_MAX_NUMEL // max(1, a.shape[1]))
    return torch.cat([torch.quantile(chunk, q, dim=1) for chunk in a.split(rows_per_chunk)])


def clip_values(w: torch.Tensor, per_row: bool, clip: str, clip_percentile: float, sdclip_k: float) -> torch.Tensor:
    """|w| beyond the returned value saturates: one value per row (per_row) or a 0-d tensor."""
    if clip == "percentile":
        q = clip_percentile / 100.0
        return _row_quantile(w.abs(), q) if per_row else _quantile_flat(w.abs().flatten(), q)
    # SDClip: c = k·std; the grid spans ±kσ, so k sets how many levels the bulk of the row uses.
    std = w.std(dim=1) if per_row else w.std()
    return (sdclip_k * torch.nan_to_num(std, nan=0.0)).float()


def quantize_rtn_tensor(t: torch.Tensor, bits: int, clip: str = "percentile", clip_percentile: float = 99.99984,
                        sdclip_k: float = 12.85) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(int8 codes, scale, scheme). 2-D: per-row fp16 scales; other ranks: one fp32 scale.

    bits=8 with the percentile clip is the reference export: codes are rounded with the fp32 scale
    floored at 1/127, and the scale is stored fp16 afterwards. Other settings round with the fp16
    scale that is stored, so |w − ŵ| ≤ scale/2 holds exactly for every unclipped weight.
    """
    w = t.detach().float()
    R = levels(bits)
    reference = bits == 8 and clip == "percentile"
    if w.ndim == 2:
        c = clip_values(w, True, clip, clip_percentile, sdclip_k)
        clipped = torch.clamp(w, -c[:, None], c[:, None])
        if reference:
            scale = (c / 127.0).clamp_min(REFERENCE_INT8_SCALE_FLOOR)
            q = torch.clamp(torch.round(clipped / scale[:, None]), -R, R)
            return q.to(torch.int8).contiguous(), scale.to(torch.float16).contiguous(), "per_row"
        scale16 = (c / R).clamp_min(ZERO_ROW_GUARD).to(torch.float16)
        q = torch.clamp(torch.round(clipped / scale16.float()[:, None]), -R, R)
        return q.to(torch.int8).contiguous(), scale16.contiguous(), "per_row"
    c = clip_values(w, False, clip, clip_percentile, sdclip_k)
    c_value = float(c)
    scale = torch.tensor(c_value / R if c_value > 0 else 1.0, dtype=torch.float32)
    q = torch.clamp(torch.round(torch.clamp(w, -c_value, c_value) / scale), -R, R)
    return q.to(torch.int8).contiguous(), scale, "per_tensor"


# ---------------------------------------------------------------------------------------------------
# Methods (quantize one large float tensor) and encodings (decode stored parts)

@dataclass
class Encoded:
    """One tensor as stored: its parts by role ("codes", "scales", "value") and its schema entry."""

    parts: dict[str, torch.Tensor]
    entry: dict[str, Any]


def _clip_entry(cfg: QuantizeConfig) -> dict[str, Any]:
    return ({"kind": "percentile", "percentile": cfg.clip_percentile} if cfg.clip == "percentile"
            else {"kind": "sdclip", "k": cfg.sdclip_k})


def _rtn(name: str, t: torch.Tensor, cfg: QuantizeConfig, hessian: torch.Tensor | None) -> Encoded:
    q, scale, scheme = quantize_rtn_tensor(t, cfg.bits, cfg.clip, cfg.clip_percentile, cfg.sdclip_k)
    floor = REFERENCE_INT8_SCALE_FLOOR if (cfg.bits == 8 and cfg.clip == "percentile" and scheme == "per_row") else None
    entry = {"encoding": "int_" + scheme, "method": "rtn", "bits": cfg.bits, "clip": _clip_entry(cfg), "scheme": scheme,
             "scale_floor": floor}
    return Encoded({"codes": q, "scales": scale}, entry)


def _gptq(name: str, t: torch.Tensor, cfg: QuantizeConfig, hessian: torch.Tensor | None) -> Encoded:
    """GPTQ on the grid RTN would use (same clip, same fp16 row scales); RTN where it cannot run."""
    from .gptq import gptq_quantize

    if hessian is None or t.ndim != 2:
        enc = _rtn(name, t, cfg, hessian)
        enc.entry["fallback"] = "no Hessian for this tensor" if t.ndim == 2 else "GPTQ needs a 2-D weight"
        return enc
    w = t.float()
    scale16 = (clip_values(w, True, cfg.clip, cfg.clip_percentile, cfg.sdclip_k) / levels(cfg.bits)
               ).clamp_min(ZERO_ROW_GUARD).to(torch.float16)
    device = torch.device(resolve_device(cfg.device))
    q = gptq_quantize(w, hessian.to(device), scale16.float(), cfg.bits, cfg.gptq_damp, cfg.gptq_block_size,
                      cfg.gptq_act_order, name)
    entry = {"encoding": "int_per_row", "method": "gptq", "bits": cfg.bits, "clip": _clip_entry(cfg),
             "scheme": "per_row", "scale_floor": None, "act_order": cfg.gptq_act_order, "damp": cfg.gptq_damp}
    return Encoded({"codes": q, "scales": scale16.contiguous()}, entry)


# method name -> fn(name, tensor, cfg resolved for that tensor, hessian or None) -> Encoded.
QUANTIZERS: dict[str, Callable[[str, torch.Tensor, QuantizeConfig, torch.Tensor | None], Encoded]] = {
    "rtn": _rtn, "gptq": _gptq}


def _decode_int(parts: dict[str, torch.Tensor], entry: dict[str, Any], source: str) -> torch.Tensor:
    q, s = parts["codes"], parts["scales"]
    if q.dtype != torch.int8 or not s.is_floating_point():
        raise PgolfError(f"{source}: codes must be int8 and scales float (got {q.dtype}, {s.dtype})")
    if entry["encoding"] != "int_per_tensor":  # int_per_row, with or without a low-rank correction
        if q.ndim < 1 or tuple(s.shape) != (q.shape[0],):
            raise PgolfError(f"{source}: per-row scales of shape {tuple(s.shape)} do not fit codes {tuple(q.shape)}")
        return q.float() * s.float().view(q.shape[0], *([1] * (q.ndim - 1)))
    if s.numel() != 1:
        raise PgolfError(f"{source}: a per-tensor scale must be a single value, got shape {tuple(s.shape)}")
    return q.float() * float(s.reshape(()).item())


def _decode_value(parts: dict[str, torch.Tensor], entry: dict[str, Any], source: str) -> torch.Tensor:
    return parts["value"]


LQER_ROLES = ("lqer_a", "lqer_a_scales", "lqer_b", "lqer_b_scales")


def decode_lqer_factor(q: torch.Tensor, s: torch.Tensor, group: int, source: str) -> torch.Tensor:
    """One int8-held factor: one scale (s.numel() == 1), one per row, or one per `group` flattened values."""
    if q.dtype != torch.int8 or q.ndim != 2 or not s.is_floating_point():
        raise PgolfError(f"{source}: LQER factors must be 2-D int8 with float scales (got {q.dtype}, {s.dtype})")
    s = s.float().flatten()
    if s.numel() == 1:
        return q.float() * s[0]
    if s.numel() == q.shape[0]:
        return q.float() * s[:, None]
    if group > 0 and q.numel() == s.numel() * group:
        return (q.float().reshape(-1, group) * s[:, None]).reshape(q.shape)
    raise PgolfError(f"{source}: {s.numel()} LQER scales do not fit a factor of shape {tuple(q.shape)}")


def _decode_int_lqer(parts: dict[str, torch.Tensor], entry: dict[str, Any], source: str) -> torch.Tensor:
    """W = Q·s + (q_A·s_A)(q_B·s_B) (TECHNIQUES.md §4.5)."""
    group = (entry.get("lqer") or {}).get("group", 0)
    a = decode_lqer_factor(parts["lqer_a"], parts["lqer_a_scales"], 0, source)
    b = decode_lqer_factor(parts["lqer_b"], parts["lqer_b_scales"], int(group or 0), source)
    base = _decode_int(parts, entry, source)
    if a.shape[1] != b.shape[0] or (a.shape[0], b.shape[1]) != tuple(base.shape):
        raise PgolfError(f"{source}: LQER factors {tuple(a.shape)}·{tuple(b.shape)} do not fit {tuple(base.shape)}")
    return base + a @ b


# encoding -> (required part roles, decoder).
ENCODINGS: dict[str, tuple[tuple[str, ...], Callable[[dict, dict, str], torch.Tensor]]] = {
    "int_per_row": (("codes", "scales"), _decode_int),
    "int_per_row+lqer": (("codes", "scales") + LQER_ROLES, _decode_int_lqer),
    "int_per_tensor": (("codes", "scales"), _decode_int),
    "float": (("value",), _decode_value),
    "raw": (("value",), _decode_value),
}


def keep_float(name: str, t: torch.Tensor) -> Encoded:
    """Small float tensors: control tensors fp32, others fp16 when they were fp32/bf16 (reference rules)."""
    if is_control(name):
        stored = t.float()
    elif t.dtype in (torch.float32, torch.bfloat16):
        stored = t.to(torch.float16)
    else:
        stored = t
    return Encoded({"value": stored.contiguous()}, {"encoding": "float", "method": "keep_float", "bits": None,
                                                    "clip": None, "scheme": None})


def is_quantized(t: torch.Tensor, cfg: QuantizeConfig) -> bool:
    """Whether `t` gets integer codes (large float tensors) rather than being kept as it is."""
    return t.is_floating_point() and t.numel() > max(cfg.keep_float_max_numel, 0)


def encode_tensor(name: str, t: torch.Tensor, cfg: QuantizeConfig, hessian: torch.Tensor | None = None) -> Encoded:
    t = t.detach().cpu().contiguous()
    if not t.is_floating_point():
        enc = Encoded({"value": t}, {"encoding": "raw", "method": "passthrough", "bits": None, "clip": None, "scheme": None})
    elif not is_quantized(t, cfg):
        enc = keep_float(name, t)
    else:
        enc = QUANTIZERS[cfg.method](name, t, config_for(name, cfg), hessian)
    enc.entry.update({"dtype": dtype_name(t.dtype), "shape": list(t.shape)})
    for role, part in enc.parts.items():
        if part.is_floating_point() and not bool(torch.isfinite(part).all()):
            raise PgolfError(f"tensor {name!r}: its stored {role} overflow fp16 (values beyond ±65504); "
                             "the checkpoint's weights are out of range for this format")
    return enc


def part_key(name: str, role: str) -> str:
    """Key of a stored part: kept tensors under their own name, codes/scales under name#role."""
    return name if role == "value" else f"{name}#{role}"


# ---------------------------------------------------------------------------------------------------
# State dicts

def _error_stats(original: torch.Tensor, restored: torch.Tensor) -> dict[str, float]:
    w, w_hat = original.detach().double(), restored.detach().double()
    if not w.numel():
        return {"max_abs_err": 0.0, "rmse": 0.0, "rel_err": 0.0}
    diff = w - w_hat
    norm = float(w.norm())
    return {"max_abs_err": float(diff.abs().max()), "rmse": float(diff.pow(2).mean().sqrt()),
            "rel_err": float(diff.norm()) / norm if norm > 0 else float(diff.norm())}


def store_encoded(encoded: dict[str, Encoded], state_dict: dict[str, torch.Tensor]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """(stored tensors keyed by part_key, schema {name: entry with its part keys}), in state-dict order."""
    tensors: dict[str, torch.Tensor] = {}
    schema: dict[str, dict[str, Any]] = {}
    for name in state_dict:
        enc = encoded[name]
        keys = {}
        for role, part in enc.parts.items():
            key = part_key(name, role)
            if key in tensors or (key != name and key in state_dict):
                raise PgolfError(f"tensor name {key!r} is used twice; rename the parameter containing '#'")
            tensors[key] = part
            keys[role] = key
        enc.entry["parts"] = keys
        schema[name] = enc.entry
    return tensors, schema


def quantize_state_dict(state_dict: dict[str, torch.Tensor], cfg: QuantizeConfig,
                        hessians: dict[str, torch.Tensor] | None = None, encoded: dict[str, Encoded] | None = None
                        ) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]], dict[str, Any]]:
    """(tensors for quantized.safetensors, schema {name: entry}, report with per-tensor errors).

    The report's weighted error, trace((W − Ŵ) H (W − Ŵ)ᵀ), is given wherever `hessians` has the tensor's H.
    `encoded`: every tensor already encoded (the budget search's choice, stages/budget.py); used as given.
    """
    from .gptq import weighted_error

    validate_config(cfg)
    hessians = hessians or {}
    if encoded is None:
        encoded = {name: encode_tensor(name, t, cfg, hessians.get(name)) for name, t in state_dict.items()}
        if cfg.lqer_top_k:
            from .lqer import add_lqer
            add_lqer(encoded, state_dict, cfg, hessians)
    fallbacks = {name: enc.entry["fallback"] for name, enc in encoded.items() if "fallback" in enc.entry}
    if fallbacks:
        print(f"quantize: note: {cfg.method} fell back to rtn for {len(fallbacks)} tensor(s): "
              + ", ".join(f"{n} ({why})" for n, why in fallbacks.items())
              + ("; give --hessians from `pgolf calibrate`" if any("Hessian" in w for w in fallbacks.values()) else ""))
    tensors, schema = store_encoded(encoded, state_dict)
    rows = []
    for name, enc in encoded.items():
        t = state_dict[name]
        restored = decode_entry(name, enc.entry, tensors, "quantize")
        original = t.detach().cpu()
        stats = (_error_stats(original, restored) if original.is_floating_point()
                 else {"max_abs_err": 0.0, "rmse": 0.0, "rel_err": 0.0})
        h = hessians.get(name)
        fits = h is not None and original.ndim == 2 and tuple(h.shape) == (original.shape[1],) * 2
        entry = enc.entry
        stored_as = (f"int{entry['bits']} {entry['scheme'].replace('_', '-')}" if entry["bits"]
                     else dtype_name(next(iter(enc.parts.values())).dtype))
        if "lqer" in entry:
            stored_as += f" +lqer r{entry['lqer']['rank']}"
        rows.append({"name": name, "method": entry["method"], "bits": entry["bits"], "clip": entry["clip"],
                     "fallback": entry.get("fallback"), "stored_as": stored_as,
                     "shape": entry["shape"], "dtype": entry["dtype"], "numel": original.numel(),
                     "original_bytes": original.numel() * original.element_size(),
                     "stored_bytes": sum(p.numel() * p.element_size() for p in enc.parts.values()),
                     "weighted_err": weighted_error(original, restored, h) if fits else None, **stats})
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


def decode_entry(name: str, entry: Any, tensors: dict[str, torch.Tensor], source: str) -> torch.Tensor:
    where = f"{source}: tensor {name!r}"
    if not isinstance(entry, dict) or entry.get("encoding") not in ENCODINGS:
        enc = entry.get("encoding") if isinstance(entry, dict) else entry
        raise PgolfError(f"{where}: unknown encoding {enc!r}; made by a newer pgolf or corrupt (upgrade pgolf)")
    roles, decode = ENCODINGS[entry["encoding"]]
    keys = entry.get("parts")
    if not isinstance(keys, dict) or any(r not in keys or keys[r] not in tensors for r in roles):
        raise PgolfError(f"{where}: stored parts {roles} are missing; the file is incomplete or corrupt")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise PgolfError(f"{where}: bad shape {shape!r} in the schema")
    out = decode({r: tensors[keys[r]] for r in roles}, entry, where)
    if list(out.shape) != shape:
        raise PgolfError(f"{where}: decodes to shape {list(out.shape)}, schema says {shape}; the file is corrupt")
    return out.to(dtype_from_name(entry.get("dtype"), where)).contiguous()


def dequantize(tensors: dict[str, torch.Tensor], schema: dict[str, Any], source: str = "quantized weights"
               ) -> dict[str, torch.Tensor]:
    """The float state dict back from stored tensors + schema, in the original dtypes."""
    if not isinstance(schema, dict) or not schema:
        raise PgolfError(f"{source}: missing or empty quantization schema; not made by `pgolf quantize`")
    return {name: decode_entry(name, entry, tensors, source) for name, entry in schema.items()}


# ---------------------------------------------------------------------------------------------------
# The challenge baseline's own artifact: final_model.int8.ptz

def read_official_int8(path: str | Path, max_size: int = 1 << 31) -> dict[str, Any]:
    """The validated dict inside a final_model.int8.ptz: zlib, then torch.load(weights_only=True)."""
    from .codecs import decompress

    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        raw = decompress("zlib", data, max_size)
    except PgolfError as exc:
        raise PgolfError(f"{path}: not a challenge int8 artifact: {exc}") from None
    try:
        # weights_only: a restricted unpickler that builds tensors and containers, never runs code.
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PgolfError(f"{path}: zlib data, but not a torch.save file loadable with weights_only=True ({exc}); "
                         "refusing to unpickle it") from None
    if not isinstance(obj, dict) or "__quant_format__" not in obj:
        raise PgolfError(f"{path}: no '__quant_format__' key; not a challenge int8 artifact")
    if obj["__quant_format__"] != OFFICIAL_INT8_FORMAT:
        raise PgolfError(f"{path}: quant format {obj['__quant_format__']!r} is not supported "
                         f"(only {OFFICIAL_INT8_FORMAT!r})")
    for key in ("quantized", "scales", "dtypes", "passthrough"):
        if not isinstance(obj.get(key), dict):
            raise PgolfError(f"{path}: key {key!r} missing or not a dict; the artifact is corrupt")
    return obj


def official_int8_state_dict(obj: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """Dequantize the reference format: q·scale (per row when scales are a vector), then the recorded dtype."""
    out: dict[str, torch.Tensor] = {}
    qmeta = obj.get("qmeta") or {}
    orig = obj.get("passthrough_orig_dtypes") or {}
    for name, q in obj["quantized"].items():
        where = f"{source}: tensor {name!r}"
        s = obj["scales"].get(name)
        if not isinstance(q, torch.Tensor) or not isinstance(s, torch.Tensor):
            raise PgolfError(f"{where}: codes or scale missing; the artifact is corrupt")
        per_row = (qmeta.get(name) or {}).get("scheme") == "per_row" or s.ndim > 0
        entry = {"encoding": "int_per_row" if per_row else "int_per_tensor", "shape": list(q.shape),
                 "dtype": obj["dtypes"].get(name), "parts": {"codes": "q", "scales": "s"}}
        out[name] = decode_entry(name, entry, {"q": q, "s": s}, source)
    for name, t in obj["passthrough"].items():
        if not isinstance(t, torch.Tensor):
            raise PgolfError(f"{source}: passthrough {name!r} is not a tensor; the artifact is corrupt")
        t = t.detach().cpu().contiguous()
        if name in orig:
            t = t.to(dtype_from_name(orig[name], f"{source}: tensor {name!r}")).contiguous()
        out[name] = t
    return out


def official_int8_to_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read and dequantize a challenge `final_model.int8.ptz`."""
    return official_int8_state_dict(read_official_int8(path), str(path))
