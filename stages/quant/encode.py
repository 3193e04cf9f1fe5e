"""One tensor to its stored parts: the method that chooses its codes, its grid, and its schema entry.

Methods (how codes are chosen: `rtn`, `gptq`, `kmeans`) are a registry; per-group bit widths and clips are
resolved per tensor name before a method runs. `store_encoded` lays the parts out as the tensors of
`quantized.safetensors` plus the schema that makes them self-describing (pgolf.formats.dequant reads
them back with nothing else).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import torch

from pgolf.config.sections import QuantizeConfig
from pgolf.errors import PgolfError
from pgolf.formats.dequant import dtype_name
from pgolf.nn.model import resolve_device
from pgolf.nn.names import is_control_name, tensor_group
from pgolf.quant.gptq import gptq_quantize
from pgolf.quant.grid import (REFERENCE_INT8_SCALE_FLOOR, is_reference_int8, kmeans_codebook, quantize_rtn_tensor,
                              round_to_scale, row_scales)


@dataclass
class Encoded:
    """One tensor as stored: its parts by role ("codes", "scales", "value", LQER factors) and its schema entry."""

    parts: dict[str, torch.Tensor]
    entry: dict[str, Any]


def config_for(name: str, cfg: QuantizeConfig) -> QuantizeConfig:
    """cfg with bits and sdclip_k replaced by the overrides of the tensor's group, where set."""
    group = tensor_group(name)
    if group is None:
        return cfg
    bits, k = cfg.group_overrides(group)
    return replace(cfg, bits=bits or cfg.bits, sdclip_k=k or cfg.sdclip_k)


def _clip_entry(cfg: QuantizeConfig) -> dict[str, Any]:
    return ({"kind": "percentile", "percentile": cfg.clip_percentile} if cfg.clip == "percentile"
            else {"kind": "sdclip", "k": cfg.sdclip_k})


def _rtn(name: str, t: torch.Tensor, cfg: QuantizeConfig, hessian: torch.Tensor | None) -> Encoded:
    q, scale, scheme = quantize_rtn_tensor(t, cfg.bits, cfg.clip, cfg.clip_percentile, cfg.sdclip_k)
    floor = REFERENCE_INT8_SCALE_FLOOR if (is_reference_int8(cfg.bits, cfg.clip) and scheme == "per_row") else None
    entry = {"encoding": "int_" + scheme, "method": "rtn", "bits": cfg.bits, "clip": _clip_entry(cfg), "scheme": scheme,
             "scale_floor": floor}
    return Encoded({"codes": q, "scales": scale}, entry)


def _gptq(name: str, t: torch.Tensor, cfg: QuantizeConfig, hessian: torch.Tensor | None) -> Encoded:
    """GPTQ on the grid RTN would use (same clip, same fp16 row scales); RTN where it cannot run."""
    if hessian is None or t.ndim != 2:
        enc = _rtn(name, t, cfg, hessian)
        enc.entry["fallback"] = "no Hessian for this tensor" if t.ndim == 2 else "GPTQ needs a 2-D weight"
        return enc
    w = t.float()
    scale16 = row_scales(w, cfg.bits, cfg.clip, cfg.clip_percentile, cfg.sdclip_k)
    device = torch.device(resolve_device(cfg.device))
    q = gptq_quantize(w, hessian.to(device), scale16.float(), cfg.bits, cfg.gptq_damp, cfg.gptq_block_size,
                      cfg.gptq_act_order, name)
    entry = {"encoding": "int_per_row", "method": "gptq", "bits": cfg.bits, "clip": _clip_entry(cfg),
             "scheme": "per_row", "scale_floor": None, "act_order": cfg.gptq_act_order, "damp": cfg.gptq_damp}
    return Encoded({"codes": q, "scales": scale16.contiguous()}, entry)


def _kmeans(name: str, t: torch.Tensor, cfg: QuantizeConfig, hessian: torch.Tensor | None) -> Encoded:
    """A per-tensor k-means codebook of 2^bits fp16 levels (PR #212); the codes are level indices shifted into
    int8's range (index − 2^(bits−1)), so they pack like integer codes."""
    idx, book = kmeans_codebook(t, cfg.bits)
    codes = (idx - 2 ** (cfg.bits - 1)).to(torch.int8)
    entry = {"encoding": "codebook", "method": "kmeans", "bits": cfg.bits, "clip": None, "scheme": "per_tensor"}
    return Encoded({"codes": codes.contiguous(), "codebook": book}, entry)


# method name (config QUANT_METHODS) -> fn(name, tensor, cfg resolved for that tensor, hessian or None).
QUANTIZERS: dict[str, Callable[[str, torch.Tensor, QuantizeConfig, torch.Tensor | None], Encoded]] = {
    "rtn": _rtn, "gptq": _gptq, "kmeans": _kmeans}


def keep_float(name: str, t: torch.Tensor, control_fp16: bool) -> Encoded:
    """Small float tensors: control tensors fp32 (the baseline's rule; fp16 with `control_fp16`, as the
    record stores every passthrough tensor, PR #1855), others fp16 when they were fp32/bf16."""
    if is_control_name(name) and not control_fp16:
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


def pruned(name: str, t: torch.Tensor, cfg: QuantizeConfig, hessian: torch.Tensor | None) -> Encoded:
    """Magnitude pruning (PR #212): the `prune_sparsity` fraction of the tensor's smallest-|w| weights are
    zeroed before it is quantized, and their codes kept at 0 after (GPTQ's error feedback would move them),
    so the zeros are stored as such and the packed size shows what pruning saves."""
    k = int(cfg.prune_sparsity * t.numel())
    if k == 0:
        return QUANTIZERS[cfg.method](name, t, config_for(name, cfg), hessian)
    w = t.float()
    cut = w.abs().flatten().kthvalue(k).values
    mask = w.abs() <= cut
    enc = QUANTIZERS[cfg.method](name, w.masked_fill(mask, 0.0).to(t.dtype), config_for(name, cfg), hessian)
    enc.parts["codes"] = enc.parts["codes"].masked_fill(mask, 0)
    enc.entry["pruned"] = round(float(mask.float().mean()), 6)
    return enc


def low_rank(name: str, t: torch.Tensor, rank: int) -> Encoded:
    """Embedding factorisation (PR #212): the rank-r truncated SVD W ≈ A·B with A = U√S and B = √S·Vᵀ, each
    factor int8 with fp16 per-row scales (its own scale per row of A and of B)."""
    u, s, vh = torch.linalg.svd(t.float(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    parts = {}
    for role, factor in (("lowrank_a", u[:, :r] * root), ("lowrank_b", root[:, None] * vh[:r])):
        codes, scale = round_to_scale(factor, factor.abs().amax(dim=1, keepdim=True) / 127, -127, 127)
        parts[role], parts[role + "_scales"] = codes.contiguous(), scale.flatten()
    return Encoded(parts, {"encoding": "lowrank", "method": "svd", "bits": 8, "rank": r, "clip": None,
                           "scheme": "per_row"})


def encode_tensor(name: str, t: torch.Tensor, cfg: QuantizeConfig, hessian: torch.Tensor | None = None) -> Encoded:
    t = t.detach().cpu().contiguous()
    if not t.is_floating_point():
        enc = Encoded({"value": t}, {"encoding": "raw", "method": "passthrough", "bits": None, "clip": None, "scheme": None})
    elif not is_quantized(t, cfg):
        enc = keep_float(name, t, cfg.control_fp16)
    elif cfg.embed_rank and t.ndim == 2 and tensor_group(name) == "embed":
        enc = low_rank(name, t, cfg.embed_rank)
    elif cfg.prune_sparsity:
        enc = pruned(name, t, cfg, hessian)
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
