"""Writing the packed artifact (`model.pgolf`; layout in pgolf.formats.blob): the raw tensor bytes back
to back, compressed as one stream (format version 1) or in independent chunks (version 2), behind a
JSON header that lists every tensor, the payload's sizes and sha256s, and the caller's fields."""

from __future__ import annotations

import json
import sys
from typing import Any

import torch

from pgolf.errors import PgolfError
from pgolf.formats import codecs
from pgolf.formats.blob import MAGIC, MAX_HEADER_BYTES, PREFIX, VERSION, VERSION_CHUNKED
from pgolf.formats.dequant import DTYPES, dtype_name
from pgolf.formats.files import sha256_bytes


def _tensor_bytes(t: torch.Tensor) -> bytes:
    if sys.byteorder != "little":  # the format is little-endian; no such host is in use
        raise PgolfError("pgolf blobs are little-endian; this host is big-endian")
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def encode_payload(tensors: dict[str, torch.Tensor]) -> tuple[bytes, list[dict[str, Any]]]:
    """Raw payload (tensor bytes back to back) and its table."""
    chunks, table, offset = [], [], 0
    for name, t in tensors.items():
        if dtype_name(t.dtype) not in DTYPES:
            raise PgolfError(f"tensor {name!r}: dtype {t.dtype} cannot be packed")
        data = _tensor_bytes(t)
        table.append({"name": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape), "offset": offset,
                      "nbytes": len(data)})
        chunks.append(data)
        offset += len(data)
    return b"".join(chunks), table


def compress_chunks(codec: str, raw: bytes, chunk_bytes: int
                    ) -> tuple[str, bytes, dict[str, int], list[list[int]]]:
    """(codec used, payload, total size per codec tried, [raw, compressed] per chunk), the chunks compressed in
    parallel threads (the codec libraries release the GIL); `auto` keeps the codec with the smallest total."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    pieces = [raw[i:i + chunk_bytes] for i in range(0, len(raw), chunk_bytes)]
    names = list(codecs.CODECS) if codec == "auto" else [codec]
    jobs = [(name, i) for name in names for i in range(len(pieces))]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        out = dict(zip(jobs, pool.map(lambda job: codecs.compress(job[0], pieces[job[1]]), jobs)))
    sizes = {name: sum(len(out[name, i]) for i in range(len(pieces))) for name in names}
    used = min(names, key=lambda n: sizes[n])
    parts = [out[used, i] for i in range(len(pieces))]
    return used, b"".join(parts), sizes, [[len(piece), len(part)] for piece, part in zip(pieces, parts)]


def build_blob(tensors: dict[str, torch.Tensor], header_fields: dict[str, Any], codec: str, chunk_bytes: int
               ) -> tuple[bytes, dict[str, Any], dict[str, int]]:
    """(blob bytes, header, compressed size per codec tried). `codec="auto"` keeps the smallest;
    chunk_bytes > 0 compresses chunks of that size independently (format version 2)."""
    raw, table = encode_payload(tensors)
    chunks = None
    if chunk_bytes and len(raw) > chunk_bytes:
        used, payload, sizes, chunks = compress_chunks(codec, raw, chunk_bytes)
    else:
        used, payload, sizes = codecs.choose(codec, raw)
    header = {
        **header_fields,
        "format": "pgolf-blob",
        "codec": used,
        "codec_settings": codecs.SETTINGS[used],
        "payload": {"raw_bytes": len(raw), "raw_sha256": sha256_bytes(raw),
                    "compressed_bytes": len(payload), "sha256": sha256_bytes(payload),
                    **({"chunks": chunks} if chunks else {})},
        "tensors": table,
    }
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(header_bytes) > MAX_HEADER_BYTES:  # readers refuse it (pgolf.formats.blob); never write what cannot be read
        raise PgolfError(f"the blob header would be {len(header_bytes):,} bytes, beyond the {MAX_HEADER_BYTES:,} readers "
                         f"accept ({len(table)} tensors); pack fewer, larger tensors")
    version = VERSION_CHUNKED if chunks else VERSION
    prefix = PREFIX.pack(MAGIC, version, len(header_bytes), bytes.fromhex(sha256_bytes(header_bytes)))
    return prefix + header_bytes + payload, header, sizes
