"""The packed artifact (`model.pgolf`): one self-describing blob.

Layout (integers little-endian):

    8 bytes   magic b"PGOLFBL\\0"
    u32       format version
    u32       header length H
    32 bytes  sha256 of the header bytes
    H bytes   JSON header: model config, tensor table (name, dtype, shape, offset, nbytes), quantization
              schema, codec, payload sizes and sha256s, tokenizer and val-shard sha256s, producer versions
    rest      the payload: the raw tensor bytes, concatenated in table order, compressed with `codec`

Version 1 compresses the payload as one stream. Version 2 (`pack.chunk_bytes` > 0) cuts the raw payload
into chunks of that many bytes and compresses each independently, in parallel, so the strongest codecs'
time spreads over the cores (no context crosses a chunk; bench/chunk_bench.py measures both layouts).
Its header lists [raw, compressed] bytes per chunk; each chunk decodes bounded by its own declared size.

This module reads (pgolf.formats.blob_writer writes): it parses JSON and copies bytes into tensors of
whitelisted dtypes; nothing from the file is ever executed or unpickled. Each check is a function of its
own (verify reports each separately; read_blob runs them all) and fails with one PgolfError naming the file.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import torch

from pgolf.errors import PgolfError
from pgolf.formats import codecs
from pgolf.formats.dequant import DTYPES, dtype_from_name
from pgolf.formats.files import sha256_bytes

MAGIC = b"PGOLFBL\x00"
VERSION = 1  # one compressed stream
VERSION_CHUNKED = 2  # independently compressed chunks
PREFIX = struct.Struct("<8sII32s")  # magic, version, header length, header sha256
MAX_HEADER_BYTES = 64 << 20
MAX_RAW_BYTES = 1 << 31  # decoded payload cap: no honest 16 MB artifact expands beyond this


def _fail(source: Any, msg: str) -> PgolfError:
    return PgolfError(f"{source}: {msg}")


def parse_blob(data: bytes, source: Any) -> tuple[dict[str, Any], bytes]:
    """Check magic, version, header hash and header structure; return (header, compressed payload)."""
    if len(data) < PREFIX.size:
        raise _fail(source, f"{len(data)} bytes is shorter than the {PREFIX.size}-byte blob prefix; truncated or not a pgolf blob")
    magic, version, header_len, header_hash = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise _fail(source, f"bad magic {magic!r}; not a pgolf blob (for the challenge's final_model.int8.ptz "
                            "use --format official-int8)")
    if version not in (VERSION, VERSION_CHUNKED):
        raise _fail(source, f"blob format version {version} is not supported by this pgolf (reads {VERSION} and "
                            f"{VERSION_CHUNKED}); use the pgolf version that packed it")
    if header_len > MAX_HEADER_BYTES or PREFIX.size + header_len > len(data):
        raise _fail(source, f"header length {header_len:,} runs past the end of the {len(data):,}-byte file; "
                            "the blob is truncated or corrupt")
    header_bytes = data[PREFIX.size:PREFIX.size + header_len]
    if sha256_bytes(header_bytes) != header_hash.hex():
        raise _fail(source, "header sha256 mismatch; the header was altered or corrupted, re-download or re-pack")
    try:
        header = json.loads(header_bytes.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _fail(source, f"header is not valid JSON ({exc}); the blob is corrupt") from None
    _check_header(header, source)
    if ("chunks" in header["payload"]) != (version == VERSION_CHUNKED):
        need = "needs a chunk table" if version == VERSION_CHUNKED else "must not have a chunk table"
        raise _fail(source, f"format version {version} {need}; the blob is corrupt")
    return header, data[PREFIX.size + header_len:]


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_header(header: Any, source: Any) -> None:
    if not isinstance(header, dict) or header.get("format") != "pgolf-blob":
        raise _fail(source, "header is not a pgolf-blob header; the blob is corrupt")
    if header.get("codec") not in codecs.CODECS:
        raise _fail(source, f"unknown codec {header.get('codec')!r}; made by a newer pgolf or corrupt")
    payload = header.get("payload")
    if not isinstance(payload, dict) or not all(_is_count(payload.get(k)) for k in ("raw_bytes", "compressed_bytes")) \
            or not all(isinstance(payload.get(k), str) for k in ("sha256", "raw_sha256")):
        raise _fail(source, "header lacks payload sizes and hashes; the blob is corrupt")
    if payload["raw_bytes"] > MAX_RAW_BYTES:
        raise _fail(source, f"declared raw payload {payload['raw_bytes']:,} bytes exceeds the {MAX_RAW_BYTES:,} cap; refusing")
    if "chunks" in payload:
        chunks = payload["chunks"]
        if not isinstance(chunks, list) or not chunks or not all(
                isinstance(c, list) and len(c) == 2 and all(_is_count(x) for x in c) for c in chunks):
            raise _fail(source, "bad chunk table in the header; the blob is corrupt")
        if sum(c[0] for c in chunks) != payload["raw_bytes"] or sum(c[1] for c in chunks) != payload["compressed_bytes"]:
            raise _fail(source, "chunk table does not add up to the declared payload sizes; the blob is corrupt")
    table = header.get("tensors")
    if not isinstance(table, list):
        raise _fail(source, "header lacks the tensor table; the blob is corrupt")
    end, names = 0, set()
    for row in table:
        if not isinstance(row, dict) or not isinstance(row.get("name"), str) or row["name"] in names:
            raise _fail(source, f"bad or duplicate tensor table entry {row!r:.200}")
        name = row["name"]
        names.add(name)
        if row.get("dtype") not in DTYPES:
            raise _fail(source, f"tensor {name!r}: dtype {row.get('dtype')!r} is not allowed")
        shape = row.get("shape")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise _fail(source, f"tensor {name!r}: bad shape {shape!r}")
        if not (_is_count(row.get("offset")) and _is_count(row.get("nbytes"))):
            raise _fail(source, f"tensor {name!r}: bad offset/nbytes")
        itemsize = torch.empty((), dtype=DTYPES[row["dtype"]]).element_size()
        if row["nbytes"] != math.prod(shape) * itemsize:
            raise _fail(source, f"tensor {name!r}: nbytes {row['nbytes']} does not match shape {shape} × {itemsize}")
        # Tensors lie back to back in table order, so bounds and overlaps are one comparison.
        if row["offset"] != end:
            raise _fail(source, f"tensor {name!r}: offset {row['offset']} should be {end}; the tensor table is corrupt")
        end += row["nbytes"]
    if end != payload["raw_bytes"]:
        raise _fail(source, f"tensor table covers {end:,} bytes but the payload declares {payload['raw_bytes']:,}")


def check_payload(header: dict[str, Any], payload: bytes, source: Any) -> None:
    """The compressed payload has the declared length and sha256."""
    declared = header["payload"]["compressed_bytes"]
    if len(payload) != declared:
        raise _fail(source, f"payload is {len(payload):,} bytes, header declares {declared:,}; "
                            "the blob is truncated or has trailing data")
    if sha256_bytes(payload) != header["payload"]["sha256"]:
        raise _fail(source, "payload sha256 mismatch; the weights were altered or corrupted, re-download or re-pack")


def decode_payload(header: dict[str, Any], payload: bytes, source: Any) -> dict[str, torch.Tensor]:
    """Decompress (bounded by the declared size) and cut the raw bytes into tensors."""
    meta = header["payload"]
    pieces, at = [], 0
    for i, (raw_len, comp_len) in enumerate(meta.get("chunks") or [[meta["raw_bytes"], len(payload)]]):
        try:  # each chunk bounded by its own declared size
            piece = codecs.decompress(header["codec"], payload[at:at + comp_len], raw_len)
        except PgolfError as exc:
            raise _fail(source, f"payload does not decode{f' (chunk {i})' if 'chunks' in meta else ''}: {exc}") from None
        if "chunks" in meta and len(piece) != raw_len:
            raise _fail(source, f"chunk {i} decodes to {len(piece):,} bytes, its header entry says {raw_len:,}")
        pieces.append(piece)
        at += comp_len
    raw = b"".join(pieces)
    if len(raw) != meta["raw_bytes"] or sha256_bytes(raw) != meta["raw_sha256"]:
        raise _fail(source, f"decoded payload ({len(raw):,} bytes) does not match the header's size/sha256")
    buf = torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)
    tensors = {}
    for row in header["tensors"]:
        dtype = dtype_from_name(row["dtype"], f"{source}: tensor {row['name']!r}")
        chunk = buf[row["offset"]:row["offset"] + row["nbytes"]].clone()
        tensors[row["name"]] = chunk.view(dtype).reshape(row["shape"]) if row["nbytes"] else \
            torch.empty(row["shape"], dtype=dtype)
    return tensors


def read_blob(path: str | Path, limit: int | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, stored tensors) of a pgolf blob, every check applied; `limit` caps the file size."""
    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"{path}: blob not found; run `pgolf pack` first")
    size = path.stat().st_size
    if limit is not None and size > limit:
        raise _fail(path, f"{size:,} bytes exceeds the limit of {limit:,} bytes")
    header, payload = parse_blob(path.read_bytes(), path)
    check_payload(header, payload, path)
    return header, decode_payload(header, payload, path)
