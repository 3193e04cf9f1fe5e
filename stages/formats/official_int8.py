"""The challenge baseline's own artifact, `final_model.int8.ptz`: zlib of a torch.save dict.

Read with torch.load(weights_only=True) only (a restricted unpickler that builds tensors and containers
and never runs code), then dequantized through the same decoders as pgolf's own files.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import torch

from pgolf.config.build import build_section
from pgolf.config.sections import ModelConfig
from pgolf.errors import PgolfError
from pgolf.formats.blob import max_raw_bytes
from pgolf.formats.codecs import decompress
from pgolf.formats.dequant import decode_entry, dtype_from_name

FORMAT = "int8_clean_per_row_v1"


def read_official_int8(data: bytes, path: str | Path, limit: int) -> dict[str, Any]:
    """The validated dict inside a final_model.int8.ptz's bytes (read with formats.blob.read_capped): zlib,
    then torch.load(weights_only=True), decompressed within `limit`'s bounds as a pgolf blob is."""
    try:
        raw = decompress("zlib", data, max_raw_bytes(limit))
    except PgolfError as exc:
        raise PgolfError(f"{path}: not a challenge int8 artifact: {exc}") from None
    try:
        obj = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PgolfError(f"{path}: zlib data, but not a torch.save file loadable with weights_only=True ({exc}); "
                         "refusing to unpickle it") from None
    if not isinstance(obj, dict) or "__quant_format__" not in obj:
        raise PgolfError(f"{path}: no '__quant_format__' key; not a challenge int8 artifact")
    if obj["__quant_format__"] != FORMAT:
        raise PgolfError(f"{path}: quant format {obj['__quant_format__']!r} is not supported (only {FORMAT!r})")
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


def infer_baseline_config(state_dict: dict[str, torch.Tensor], vocab_size: int) -> ModelConfig:
    """The baseline architecture, shaped by the tensors present (layers, width, heads, MLP, tying)."""
    layers = {int(m.group(1)) for n in state_dict if (m := re.match(r"blocks\.(\d+)\.", n))}
    need = ["tok_emb.weight", "blocks.0.attn.q_gain", "blocks.0.attn.c_k.weight", "blocks.0.mlp.fc.weight"]
    missing = [n for n in need if n not in state_dict]
    if missing or layers != set(range(len(layers))):
        raise PgolfError(f"not the baseline architecture: missing {missing or 'a contiguous blocks.0..N-1'}")
    emb = state_dict["tok_emb.weight"]
    dim = int(emb.shape[1])
    heads = int(state_dict["blocks.0.attn.q_gain"].numel())
    if heads < 1 or dim % heads:
        raise PgolfError(f"not the baseline architecture: {heads} q_gain heads do not divide width {dim}")
    head_dim = dim // heads
    cfg = build_section(ModelConfig, {
        "vocab_size": vocab_size, "num_layers": len(layers), "model_dim": dim, "num_heads": heads,
        "num_kv_heads": max(1, int(state_dict["blocks.0.attn.c_k.weight"].shape[0]) // head_dim),
        "mlp_mult": max(1, int(state_dict["blocks.0.mlp.fc.weight"].shape[0]) // dim),
        "tie_embeddings": "lm_head.weight" not in state_dict}, "official int8 artifact")
    if int(emb.shape[0]) != vocab_size:
        raise PgolfError(f"tok_emb has {int(emb.shape[0])} rows but the data's vocabulary is {vocab_size}: "
                         "vocab/tokenizer mismatch; verify against the data the model was trained on")
    return cfg
