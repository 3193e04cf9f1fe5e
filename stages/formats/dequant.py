"""Stored quantized tensors back to floats: the decode half of quantization, all a blob needs to be read.

A quantized file (or blob) holds stored parts (integer codes, scales, low-rank factors, kept floats) and
a per-tensor schema entry naming the entry's `encoding`, its part keys, shape and dtype. Each encoding is
a decoder in ENCODINGS; an encoding this version does not know is refused, never guessed, so a reader that
predates a correction cannot silently drop it. Nothing here imports the encoders (pgolf.quant).

The decoders scale their fresh float copies in place (mul_, add_): one temporary less per tensor, and on
meta tensors (the blob header check decodes the schema on them) far cheaper than out-of-place ops.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from pgolf.errors import PgolfError

# Dtypes a stored file may name; anything else is refused rather than looked up with getattr.
DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8,
    "uint8": torch.uint8, "bool": torch.bool,
}
LQER_ROLES = ("lqer_a", "lqer_a_scales", "lqer_b", "lqer_b_scales")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: Any, source: str) -> torch.dtype:
    if not isinstance(name, str) or name not in DTYPES:  # a name read from a file may be any JSON value
        raise PgolfError(f"{source}: unsupported dtype {name!r}; the file is corrupt or from another tool")
    return DTYPES[name]


def _decode_int(parts: dict[str, torch.Tensor], entry: dict[str, Any], source: str) -> torch.Tensor:
    q, s = parts["codes"], parts["scales"]
    if q.dtype != torch.int8 or not s.is_floating_point():
        raise PgolfError(f"{source}: codes must be int8 and scales float (got {q.dtype}, {s.dtype})")
    if entry["encoding"] != "int_per_tensor":  # int_per_row, with or without a low-rank correction
        if q.ndim < 1 or tuple(s.shape) != (q.shape[0],):
            raise PgolfError(f"{source}: per-row scales of shape {tuple(s.shape)} do not fit codes {tuple(q.shape)}")
        return q.float().mul_(s.float().view(q.shape[0], *([1] * (q.ndim - 1))))
    if s.numel() != 1:
        raise PgolfError(f"{source}: a per-tensor scale must be a single value, got shape {tuple(s.shape)}")
    return q.float().mul_(s.float().reshape(()))  # a 0-d tensor, not .item(): the header check decodes on meta tensors


def _decode_value(parts: dict[str, torch.Tensor], entry: dict[str, Any], source: str) -> torch.Tensor:
    return parts["value"]


def decode_lqer_factor(q: torch.Tensor, s: torch.Tensor, group: int, source: str) -> torch.Tensor:
    """One int8-held factor: one scale (s.numel() == 1), one per row, or one per `group` flattened values."""
    if q.dtype != torch.int8 or q.ndim != 2 or not s.is_floating_point():
        raise PgolfError(f"{source}: low-rank factors (LQER, embed_rank) must be 2-D int8 with float scales (got {q.dtype}, {s.dtype})")
    s = s.float().flatten()
    if s.numel() == 1:
        return q.float().mul_(s[0])
    if s.numel() == q.shape[0]:
        return q.float().mul_(s[:, None])
    if group > 0 and q.numel() == s.numel() * group:
        return q.float().reshape(-1, group).mul_(s[:, None]).reshape(q.shape)
    raise PgolfError(f"{source}: {s.numel()} LQER scales do not fit a factor of shape {tuple(q.shape)}")


def _decode_int_lqer(parts: dict[str, torch.Tensor], entry: dict[str, Any], source: str) -> torch.Tensor:
    """W = Q·s + (q_A·s_A)(q_B·s_B): the codes plus their low-rank (LQER) correction."""
    lqer = entry.get("lqer") or {}
    group = lqer.get("group", 0) if isinstance(lqer, dict) else None
    if not isinstance(group, int) or isinstance(group, bool) or group < 0:
        raise PgolfError(f"{source}: LQER group {group!r} is not a count; the file is corrupt")
    a = decode_lqer_factor(parts["lqer_a"], parts["lqer_a_scales"], 0, source)
    b = decode_lqer_factor(parts["lqer_b"], parts["lqer_b_scales"], group, source)
    base = _decode_int(parts, entry, source)
    if a.shape[1] != b.shape[0] or (a.shape[0], b.shape[1]) != tuple(base.shape):
        raise PgolfError(f"{source}: LQER factors {tuple(a.shape)}·{tuple(b.shape)} do not fit {tuple(base.shape)}")
    return base.add_(a @ b)


def _decode_codebook(parts: dict[str, torch.Tensor], entry: dict[str, Any], source: str) -> torch.Tensor:
    """W = codebook[codes + levels/2]: a per-tensor k-means codebook (PR #212), indices held as int8."""
    q, book = parts["codes"], parts["codebook"]
    if q.dtype != torch.int8 or book.ndim != 1 or not book.is_floating_point() or book.numel() not in (
            2, 4, 8, 16, 32, 64, 128, 256):
        raise PgolfError(f"{source}: a codebook needs int8 codes and 2^k float levels (got {q.dtype}, "
                         f"{tuple(book.shape)})")
    idx = q.long() + book.numel() // 2
    if q.device.type != "meta" and q.numel() and (int(idx.min()) < 0 or int(idx.max()) >= book.numel()):
        raise PgolfError(f"{source}: codes point outside the {book.numel()}-level codebook; the file is corrupt")
    return book.float()[idx]


def _decode_lowrank(parts: dict[str, torch.Tensor], entry: dict[str, Any], source: str) -> torch.Tensor:
    """W = (q_A·s_A)(q_B·s_B): a truncated SVD stored as two int8 factors with per-row scales (PR #212)."""
    a = decode_lqer_factor(parts["lowrank_a"], parts["lowrank_a_scales"], 0, source)
    b = decode_lqer_factor(parts["lowrank_b"], parts["lowrank_b_scales"], 0, source)
    if a.shape[1] != b.shape[0]:
        raise PgolfError(f"{source}: low-rank factors {tuple(a.shape)}·{tuple(b.shape)} do not multiply; corrupt")
    return a @ b


# encoding -> (required part roles, decoder).
ENCODINGS: dict[str, tuple[tuple[str, ...], Callable[[dict, dict, str], torch.Tensor]]] = {
    "int_per_row": (("codes", "scales"), _decode_int),
    "int_per_row+lqer": (("codes", "scales") + LQER_ROLES, _decode_int_lqer),
    "int_per_tensor": (("codes", "scales"), _decode_int),
    "codebook": (("codes", "codebook"), _decode_codebook),
    "lowrank": (("lowrank_a", "lowrank_a_scales", "lowrank_b", "lowrank_b_scales"), _decode_lowrank),
    "float": (("value",), _decode_value),
    "raw": (("value",), _decode_value),
}


def decode_entry(name: str, entry: Any, tensors: dict[str, torch.Tensor], source: str) -> torch.Tensor:
    where = f"{source}: tensor {name!r}"
    if not isinstance(entry, dict) or not isinstance(entry.get("encoding"), str) or entry["encoding"] not in ENCODINGS:
        enc = entry.get("encoding") if isinstance(entry, dict) else entry
        raise PgolfError(f"{where}: unknown encoding {enc!r}; made by a newer pgolf or corrupt (upgrade pgolf)")
    roles, decode = ENCODINGS[entry["encoding"]]
    keys = entry.get("parts")
    if not isinstance(keys, dict) or any(not isinstance(keys.get(r), str) or keys[r] not in tensors for r in roles):
        raise PgolfError(f"{where}: stored parts {roles} are missing; the file is incomplete or corrupt")
    shape = entry.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise PgolfError(f"{where}: bad shape {shape!r} in the schema")
    out = decode({r: tensors[keys[r]] for r in roles}, entry, where)
    if list(out.shape) != shape:
        raise PgolfError(f"{where}: decodes to shape {list(out.shape)}, schema says {shape}; the file is corrupt")
    return out.to(dtype_from_name(entry.get("dtype"), where)).contiguous()


def dequantize(tensors: dict[str, torch.Tensor], schema: Any, source: str) -> dict[str, torch.Tensor]:
    """The float state dict back from stored tensors + schema, in the original dtypes."""
    if not isinstance(schema, dict) or not schema:
        raise PgolfError(f"{source}: missing or empty quantization schema; not made by `pgolf quantize`")
    return {name: decode_entry(name, entry, tensors, source) for name, entry in schema.items()}
