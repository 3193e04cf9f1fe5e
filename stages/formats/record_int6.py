"""The record family's own artifact, `final_model.int6.ptz` (PR #1855 and the submissions built on it):
read, dequantized and renamed onto pgolf's model, so `pgolf verify` can re-score it without its script.

Two containers, both from the record's public script:
- brotli of a `torch.save` dict {"w": quantized tensors, "m": per-weight kind};
- `PGRP` (COMPRESSOR=pergroup): b"PGRP", u32 n = 9, n × u32 stream lengths, the streams. Streams 1–7 are
  the int8 codes by role (tok_emb, attn c_k, c_q, c_v, proj, mlp fc, proj; layers concatenated), each
  matrix written column-major, with tok_emb, c_q and mlp.fc first row-sorted; each is lrzip'd (ZPAQ).
  Stream 8 is brotli of a `torch.save` dict {"r": the other tensors, "m": kinds, "s": the groups' shapes};
  stream 9 is brotli of every sorted matrix's row order, u16, in group order.

Pickles are read with torch.load(weights_only=True) only (tensors and plain containers; nothing runs),
every stream is decompressed within the bounds the artifact limit sets, and every shape and permutation
is checked before it is used. The kinds (`m`) are "passthrough (float16)", "gate_int8_row" and
"gptq (intN)" with an optional "+lqer" or "+lqer_asym" correction; the weights come out in the
script's flat names (its banks already split per layer), which to_pgolf_names maps onto pgolf's.
"""

from __future__ import annotations

import io
import re
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pgolf.config.build import build_section
from pgolf.config.presets import PRESETS
from pgolf.config.sections import ModelConfig
from pgolf.errors import PgolfError
from pgolf.formats import codecs
from pgolf.formats.blob import max_raw_bytes
from pgolf.formats.streams import is_permutation

PGRP = b"PGRP"
GROUPS = ("_tok_emb.weight.q", "attn.c_k.weight.q", "attn.c_q.weight.q", "attn.c_v.weight.q",
          "attn.proj.weight.q", "mlp.fc.weight.q", "mlp.proj.weight.q")
SORTED_GROUPS = ("_tok_emb.weight.q", "attn.c_q.weight.q", "mlp.fc.weight.q")
MAX_STREAMS = 64
ZIP = b"PK\x03\x04"  # torch.save's container


def is_record_artifact(data: bytes) -> bool:
    """PGRP by its magic; the brotli container when its first decoded bytes are a torch.save zip."""
    if data.startswith(PGRP):
        return True
    try:
        import brotli

        head = brotli.Decompressor().process(data[:4096], output_buffer_limit=64)
    except Exception:  # noqa: BLE001 — not brotli at all
        return False
    return head.startswith(ZIP)


def _load(raw: bytes, path: Any, what: str) -> Any:
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 — the unpickler's own errors
        raise PgolfError(f"{path}: {what} is not a torch.save file loadable with weights_only=True ({exc}); "
                         "refusing to unpickle it") from None


def _decompress(codec: str, data: bytes, cap: int, path: Any, what: str) -> bytes:
    try:
        return codecs.decompress(codec, data, cap)
    except PgolfError as exc:
        raise PgolfError(f"{path}: {what}: {exc}") from None


def read_record_int6(data: bytes, path: str | Path, limit: int) -> dict[str, Any]:
    """{"w": quantized tensors by the script's names, "m": their kinds, "container": "pergroup" | "brotli"}."""
    cap = max_raw_bytes(limit)
    if data.startswith(PGRP):
        result, meta = _read_pergroup(data, path, cap)
        container = "pergroup"
    else:
        obj = _load(_decompress("brotli", data, cap, path, "not a record artifact (brotli)"), path, "the artifact")
        if not isinstance(obj, dict) or not isinstance(obj.get("w"), dict) or not isinstance(obj.get("m"), dict):
            raise PgolfError(f"{path}: no 'w' and 'm' dicts; not a record int6 artifact")
        result, meta, container = obj["w"], obj["m"], "brotli"
    for name, t in result.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise PgolfError(f"{path}: entry {str(name)[:80]!r} is not a named tensor; the artifact is corrupt")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise PgolfError(f"{path}: its kinds table is not names to strings; the artifact is corrupt")
    return {"w": result, "m": meta, "container": container}


def _read_pergroup(data: bytes, path: Any, cap: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if len(data) < 8:
        raise PgolfError(f"{path}: PGRP artifact truncated before its stream count")
    n = struct.unpack_from("<I", data, 4)[0]
    if n != len(GROUPS) + 2:
        raise PgolfError(f"{path}: PGRP artifact with {n} streams; the record's container has {len(GROUPS) + 2}")
    lengths = struct.unpack_from(f"<{n}I", data, 8) if len(data) >= 8 + 4 * n else None
    if lengths is None or 8 + 4 * n + sum(lengths) != len(data):
        raise PgolfError(f"{path}: PGRP length table does not match the file ({len(data):,} bytes); truncated or "
                         "corrupt")
    starts = np.cumsum([8 + 4 * n] + list(lengths))
    streams = [data[a:b] for a, b in zip(starts[:-1], starts[1:])]
    rest = _load(_decompress("brotli", streams[len(GROUPS)], cap, path, "PGRP remainder stream"), path,
                 "the PGRP remainder")
    if not (isinstance(rest, dict) and isinstance(rest.get("r"), dict) and isinstance(rest.get("m"), dict)
            and isinstance(rest.get("s"), dict)):
        raise PgolfError(f"{path}: PGRP remainder lacks its 'r', 'm' and 's' dicts; corrupt")
    result = dict(rest["r"])
    perms = _decompress("brotli", streams[len(GROUPS) + 1], cap, path, "PGRP permutation stream") \
        if streams[len(GROUPS) + 1] else b""
    at_perm = 0
    for group, stream in zip(GROUPS, streams):
        if not stream:
            continue
        shapes = rest["s"].get(group)
        if not isinstance(shapes, (list, tuple)) or not all(
                isinstance(s, (list, tuple)) and all(isinstance(d, int) and d > 0 for d in s) for s in shapes):
            raise PgolfError(f"{path}: PGRP shape list of {group!r} is missing or not a list of shapes; corrupt")
        raw = np.frombuffer(_decompress("lrzip", stream, cap, path, f"PGRP stream {group}"), dtype=np.int8)
        if sum(int(np.prod(s)) for s in shapes) != raw.size:
            raise PgolfError(f"{path}: PGRP stream {group} holds {raw.size:,} codes, its shapes say otherwise; corrupt")
        names = [group[1:]] if group.startswith("_") else [f"blocks.{i}.{group}" for i in range(len(shapes))]
        at = 0
        for name, shape in zip(names, shapes):
            size = int(np.prod(shape))
            chunk = raw[at:at + size]
            at += size
            if len(shape) == 2:
                rows, cols = shape
                chunk = chunk.reshape(cols, rows).T
                if group in SORTED_GROUPS:
                    if at_perm + 2 * rows > len(perms):
                        raise PgolfError(f"{path}: PGRP permutation stream ends before {name!r}'s; corrupt")
                    order = np.frombuffer(perms, dtype="<u2", count=rows, offset=at_perm).astype(np.int64)
                    at_perm += 2 * rows
                    if not is_permutation(order):
                        raise PgolfError(f"{path}: the row order of {name!r} is not a permutation; corrupt")
                    restored = np.empty_like(chunk)
                    restored[order] = chunk
                    chunk = restored
            result[name] = torch.from_numpy(np.ascontiguousarray(chunk).reshape(shape))
    if at_perm != len(perms):
        raise PgolfError(f"{path}: PGRP permutation stream has {len(perms) - at_perm:,} bytes left over; corrupt")
    return result, rest["m"]


# ---- dequantization, as the record's dequantize_mixed

def _part(result: dict[str, torch.Tensor], key: str, source: str) -> torch.Tensor:
    if key not in result:
        raise PgolfError(f"{source}: part {key!r} missing; the artifact is corrupt")
    return result[key]


def dequantize_record(obj: dict[str, Any], source: str) -> dict[str, torch.Tensor]:
    """Float32 weights by the script's flat names: codes × per-row scales, plus the low-rank corrections."""
    result, out = obj["w"], {}
    for name, kind in obj["m"].items():
        where = f"{source}: {name!r}"
        if "passthrough" in kind:
            out[name] = _part(result, name, source).float()
            continue
        if kind == "gate_int8_row":
            q, s = _part(result, name + ".gq", source), _part(result, name + ".gs", source)
            out[name] = q.float() * s.float().view(-1, 1)
            continue
        if not kind.startswith("gptq"):
            raise PgolfError(f"{where}: unknown kind {kind!r}")
        q, s = _part(result, name + ".q", source), _part(result, name + ".scale", source)
        if q.ndim != 2 or s.shape != (q.shape[0],):
            raise PgolfError(f"{where}: codes {tuple(q.shape)} and scales {tuple(s.shape)} do not fit; corrupt")
        w = q.float() * s.float().view(-1, 1)
        if "lqer_asym" in kind:
            qa, sa = _part(result, name + ".lqA_a", source), _part(result, name + ".lqAs_a", source)
            qb, sb = _part(result, name + ".lqB_a", source), _part(result, name + ".lqBs_a", source)
            if sb.numel() == 0 or qb.numel() % sb.numel():
                raise PgolfError(f"{where}: LQER group scales do not divide its factor; corrupt")
            group = qb.numel() // sb.numel()
            b = (qb.reshape(-1, group).float() * sb.float().view(-1, 1)).reshape(qb.shape)
            w = w + (qa.float() * float(sa)) @ b
        elif "lqer" in kind:
            qa, sa = _part(result, name + ".lqA", source), _part(result, name + ".lqAs", source)
            qb, sb = _part(result, name + ".lqB", source), _part(result, name + ".lqBs", source)
            w = w + (qa.float() * sa.float().view(-1, 1)) @ (qb.float() * sb.float().view(-1, 1))
        if w.shape != q.shape:
            raise PgolfError(f"{where}: its LQER factors do not multiply to {tuple(q.shape)}; corrupt")
        out[name] = w
    return out


# ---- names and architecture

def to_pgolf_names(flat: dict[str, torch.Tensor], wanted: dict[str, torch.Size], source: str
                   ) -> dict[str, torch.Tensor]:
    """The script's flat names onto pgolf's (`wanted`: pgolf's parameter shapes): the smear gate lives in
    pgolf's `smear` module, and the model-level parallel-lane lambdas (one row per layer) in the blocks that
    run two lanes. Every pgolf parameter must be found with its shape."""
    renamed = dict(flat)
    if "smear_gate.weight" in renamed:
        renamed["smear.smear_w"] = renamed.pop("smear_gate.weight")
    if "smear_lambda" in renamed:
        renamed["smear.smear_lambda"] = renamed.pop("smear_lambda")
    for key in ("parallel_post_lambdas", "parallel_resid_lambdas"):
        table = renamed.pop(key, None)
        for name in wanted:
            m = re.fullmatch(rf"blocks\.(\d+)\.{key}", name)
            if m and table is not None and int(m.group(1)) < table.shape[0]:
                renamed[name] = table[int(m.group(1))]
    missing = [n for n in wanted if n not in renamed]
    wrong = [f"{n} {tuple(renamed[n].shape)} vs {tuple(s)}" for n, s in wanted.items()
             if n in renamed and renamed[n].shape != s]
    if missing or wrong:
        raise PgolfError(f"{source}: does not fit pgolf's model of this architecture: missing {missing[:4]}, "
                         f"shapes {wrong[:4]}; give the run's log with --claims so its hyperparameters are used")
    return {n: renamed[n].contiguous() for n in wanted}


# The script's hyperparameter names (its log's "Hyperparameters:" block) for pgolf's model keys.
HYPERPARAMETERS = {
    "num_layers": "num_layers", "model_dim": "model_dim", "num_heads": "num_heads", "num_kv_heads": "num_kv_heads",
    "mlp_mult": "mlp_mult", "rope_dims": "rope_dims", "rope_base": "rope_base", "ln_scale": "ln_scale",
    "xsa_last_n": "xsa_layers", "skip_gates_enabled": "skip_gates", "parallel_start_layer": "parallel_from",
    "loop_start": "loop_start", "loop_end": "loop_end", "num_loops": "num_loops", "logit_softcap": "logit_softcap",
    "smear_gate_enabled": "smear_gate", "sparse_attn_gate_enabled": "sparse_attn_gate",
    "sparse_attn_gate_scale": "sparse_gate_scale", "tie_embeddings": "tie_embeddings", "vocab_size": "vocab_size",
}


def model_overrides(hyper: dict[str, str], source: str) -> dict[str, Any]:
    """pgolf model keys from a log's hyperparameters (strings as printed: 11, 4.0, True)."""
    out: dict[str, Any] = {}
    for theirs, ours in HYPERPARAMETERS.items():
        if theirs in hyper:
            text = hyper[theirs]
            try:
                out[ours] = text == "True" if text in ("True", "False") else float(text) if "." in text else int(text)
            except ValueError:
                raise PgolfError(f"{source}: hyperparameter {theirs}: {text[:40]!r} is not a number") from None
    return out


def record_model_config(flat: dict[str, torch.Tensor], vocab_size: int, hyper: dict[str, str] | None,
                        source: str) -> tuple[ModelConfig, str]:
    """(pgolf model config, where it came from): the `record` preset's architecture (PR #1855), its sizes
    overridden by the run's logged hyperparameters when given, the vocabulary from the embedding."""
    emb = flat.get("tok_emb.weight")
    if emb is None or emb.ndim != 2:
        raise PgolfError(f"{source}: no tok_emb.weight; not a record-family artifact")
    if int(emb.shape[0]) != vocab_size:
        raise PgolfError(f"{source}: tok_emb has {int(emb.shape[0])} rows but the data's vocabulary is {vocab_size}: "
                         "vocab/tokenizer mismatch; verify against the data the model was trained on")
    values = {**PRESETS["record"]["model"], **model_overrides(hyper or {}, source), "vocab_size": vocab_size}
    origin = "the record preset, sized by the run's logged hyperparameters" if hyper else "the record preset"
    return build_section(ModelConfig, values, f"{source}: model config ({origin})"), origin
