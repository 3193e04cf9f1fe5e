"""Writing the packed artifact (`model.pgolf`; layout in pgolf.formats.blob): the raw tensor bytes back
to back, compressed as per-group streams (format version 3, pgolf.formats.streams), as one stream
(version 1) or in independent chunks (version 2), behind a JSON header that lists every tensor, the
payload's sizes and sha256s, and the caller's fields."""

from __future__ import annotations

import json
import os
import re
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from pgolf.errors import PgolfError
from pgolf.formats import ans, codecs
from pgolf.formats.blob import MAGIC, MAX_HEADER_BYTES, PERGROUP, PREFIX, VERSION, VERSION_CHUNKED, VERSION_STREAMS
from pgolf.formats.dequant import DTYPES, dtype_name
from pgolf.formats.files import sha256_bytes
from pgolf.formats.streams import PERM_DTYPE, item_bytes, layout_fits


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


# ---- format 3: per-group streams

_LAYER = re.compile(r"\.(\d+)\.")


def stream_key(row: dict[str, Any]) -> str:
    """Codes of one role share a stream across layers (blocks.*.mlp.fc.weight#codes); other parts one per dtype."""
    if row["name"].endswith("#codes") and len(row["shape"]) == 2 and row["dtype"] == "int8":
        return _LAYER.sub(".*.", row["name"], count=1)
    return row["dtype"]


def _layer(name: str) -> tuple[int, str]:
    found = _LAYER.search(name)
    return (int(found.group(1)) if found else -1, name)


def nearest_neighbour_order(matrix: np.ndarray) -> np.ndarray:
    """Rows in greedy nearest-neighbour chain order under L1, from row 0 (PR #1855's similarity sort): similar
    rows side by side, so that column-major bytes repeat for context coders. O(rows² · cols)."""
    x = torch.from_numpy(matrix.astype(np.float32))
    n = x.shape[0]
    order = np.empty(n, dtype=np.int64)
    used = torch.zeros(n, dtype=torch.bool)
    cur = 0
    for j in range(n):
        order[j] = cur
        used[cur] = True
        if j < n - 1:
            cur = int((x - x[cur]).abs().sum(1).masked_fill_(used, float("inf")).argmin())
    return order


def plan_streams(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Streams (name, items as [tensor, layout]) for the tensor table: codes by role in layer order, laid out
    column-major; every other part by dtype, multi-byte ones shuffled into byte planes."""
    groups: dict[str, list[list[str]]] = {}
    for row in sorted((r for r in table if r["nbytes"]), key=lambda r: (stream_key(r), _layer(r["name"]))):
        key = stream_key(row)
        layout = "cols" if key != row["dtype"] else "shuffle" if layout_fits(row, "shuffle") else "rows"
        groups.setdefault(key, []).append([row["name"], layout])
    return [{"name": key, "items": items} for key, items in groups.items()]


def sorted_variant(stream: dict[str, Any], rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]] | None:
    """A code stream with every matrix's rows similarity-sorted, and the stream of their permutations
    (None where a matrix cannot be sorted, or for a stream that holds no codes)."""
    items = stream["items"]
    if not items or any(layout != "cols" or not layout_fits(rows[name], "sorted_cols") for name, layout in items):
        return None
    return [{"name": stream["name"], "items": [[name, "sorted_cols"] for name, _ in items]},
            {"name": stream["name"] + "#perm", "items": [[name, "perm"] for name, _ in items]}]


def _matrix(raw: bytes, row: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.int8, count=row["nbytes"], offset=row["offset"]).reshape(row["shape"])


_ORDERS: dict[str, np.ndarray] = {}  # sha256 of a matrix's bytes -> its row order: --budget rebuilds the same ones


def row_order(matrix: np.ndarray) -> np.ndarray:
    key = sha256_bytes(matrix.tobytes()) + str(matrix.shape)
    if key not in _ORDERS:
        _ORDERS[key] = nearest_neighbour_order(matrix)
    return _ORDERS[key]


def stream_bytes(stream: dict[str, Any], raw: bytes, rows: dict[str, dict[str, Any]]) -> bytes:
    """A stream's raw bytes: its items' bytes, laid out."""
    whole = np.frombuffer(raw, dtype=np.uint8)
    parts = []
    for name, layout in stream["items"]:
        row = rows[name]
        data = whole[row["offset"]:row["offset"] + row["nbytes"]]
        if layout == "shuffle":
            data = data.reshape(-1, DTYPES[row["dtype"]].itemsize).T
        elif layout == "perm":
            data = row_order(_matrix(raw, row)).astype(PERM_DTYPE)
        elif layout in ("cols", "sorted_cols"):
            matrix = _matrix(raw, row)
            data = (matrix[row_order(matrix)] if layout == "sorted_cols" else matrix).T
        parts.append(np.ascontiguousarray(data).tobytes())
    return b"".join(parts)


def compress_stream(codec: str, data: bytes, stream: dict[str, Any], rows: dict[str, dict[str, Any]]) -> bytes:
    """A stream compressed by `codec`; `ans` also tries a histogram per item (tensors of different widths
    share a role's stream) and keeps the smaller (the reader takes either)."""
    whole = codecs.compress(codec, data)
    if codec != "ans" or len(stream["items"]) < 2:
        return whole
    per_item = ans.compress(data, [item_bytes(rows[name], layout) for name, layout in stream["items"]])
    return min(whole, per_item, key=len)


# Row sorting helps coders that see context; under `auto` sorted streams try brotli, the strongest of them
# here, so that sorting costs one more codec run per stream rather than four.
SORTED_CODECS = ("zlib", "zstd", "brotli", "lzma", "lrzip")


def compress_streams(codec: str, sort_rows: str, streams: list[dict[str, Any]], raw: bytes,
                     table: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bytes, dict[str, int]]:
    """The streams as written (each with its codec and sizes), the payload, and the total size each codec
    would have given unsorted. Per stream, `auto` keeps the smallest codec; sort_rows `auto` also tries the
    stream row-sorted (its permutations a stream of their own, counted with it) and keeps whichever is
    smaller, `always` sorts every code stream, `never` none. In parallel threads (the codec libraries
    release the GIL)."""
    names = list(codecs.AUTO) if codec == "auto" else [codec]
    sorted_names = ["brotli"] if codec == "auto" else [c for c in names if c in SORTED_CODECS]
    rows = {row["name"]: row for row in table}
    # Each option: the streams it writes and the codecs each may use.
    options: list[list[tuple[dict[str, Any], list[str]]]] = []
    for s in streams:
        variant = sorted_variant(s, rows) if sort_rows != "never" and sorted_names else None
        sorted_option = [(variant[0], sorted_names), (variant[1], names)] if variant else None
        choices = [[(s, names)]] if sort_rows != "always" or not variant else []
        options.append(choices + ([sorted_option] if sorted_option else []))
    jobs = [(stream, name) for opts in options for opt in opts for stream, allowed in opt for name in allowed]
    with ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1)) as pool:
        unique = list({id(st): st for st, _ in jobs}.values())
        datas = dict(zip(map(id, unique), pool.map(lambda st: stream_bytes(st, raw, rows), unique)))
        out = dict(zip([(id(st), n) for st, n in jobs],
                       pool.map(lambda job: compress_stream(job[1], datas[id(job[0])], job[0], rows), jobs)))
    written, payload = [], []
    for opts in options:
        best = min(([(st, min(allowed, key=lambda n: len(out[id(st), n]))) for st, allowed in opt] for opt in opts),
                   key=lambda picked: sum(len(out[id(st), n]) for st, n in picked))
        for st, used in best:
            written.append({**st, "codec": used, "raw_bytes": len(datas[id(st)]),
                            "compressed_bytes": len(out[id(st), used])})
            payload.append(out[id(st), used])
    sizes = {n: sum(len(out[id(st), n]) for st in streams if (id(st), n) in out) for n in names}
    return written, b"".join(payload), sizes


def compress_chunks(codec: str, raw: bytes, chunk_bytes: int
                    ) -> tuple[str, bytes, dict[str, int], list[list[int]]]:
    """(codec used, payload, total size per codec tried, [raw, compressed] per chunk), the chunks compressed in
    parallel threads (the codec libraries release the GIL); `auto` keeps the codec with the smallest total."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    pieces = [raw[i:i + chunk_bytes] for i in range(0, len(raw), chunk_bytes)]
    names = list(codecs.AUTO) if codec == "auto" else [codec]
    jobs = [(name, i) for name in names for i in range(len(pieces))]
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), os.cpu_count() or 1))) as pool:
        out = dict(zip(jobs, pool.map(lambda job: codecs.compress(job[0], pieces[job[1]]), jobs)))
    sizes = {name: sum(len(out[name, i]) for i in range(len(pieces))) for name in names}
    used = min(names, key=lambda n: sizes[n])
    parts = [out[used, i] for i in range(len(pieces))]
    return used, b"".join(parts), sizes, [[len(piece), len(part)] for piece, part in zip(pieces, parts)]


def build_blob(tensors: dict[str, torch.Tensor], header_fields: dict[str, Any], codec: str, chunk_bytes: int,
               container: str, sort_rows: str) -> tuple[bytes, dict[str, Any], dict[str, int]]:
    """(blob bytes, header, compressed size per codec tried). `codec="auto"` keeps the smallest;
    container "pergroup" writes per-group streams (format version 3; sort_rows: never, always or auto,
    similarity-sorted code matrices); else chunk_bytes > 0 compresses chunks of that size independently (format version 2)."""
    raw, table = encode_payload(tensors)
    chunks = streams = None
    if container == PERGROUP:
        used = PERGROUP
        streams, payload, sizes = compress_streams(codec, sort_rows, plan_streams(table), raw, table)
    elif chunk_bytes and len(raw) > chunk_bytes:
        used, payload, sizes, chunks = compress_chunks(codec, raw, chunk_bytes)
    else:
        used, payload, sizes = codecs.choose(codec, raw)
    header = {
        **header_fields,
        "format": "pgolf-blob",
        "codec": used,
        "codec_settings": "per stream" if streams else codecs.SETTINGS[used],
        "payload": {"raw_bytes": len(raw), "raw_sha256": sha256_bytes(raw),
                    "compressed_bytes": len(payload), "sha256": sha256_bytes(payload),
                    **({"chunks": chunks} if chunks else {}), **({"streams": streams} if streams else {})},
        "tensors": table,
    }
    header_bytes = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    if len(header_bytes) > MAX_HEADER_BYTES:  # readers refuse it (pgolf.formats.blob); never write what cannot be read
        raise PgolfError(f"the blob header would be {len(header_bytes):,} bytes, beyond the {MAX_HEADER_BYTES:,} readers "
                         f"accept ({len(table)} tensors); pack fewer, larger tensors")
    version = VERSION_STREAMS if streams else VERSION_CHUNKED if chunks else VERSION
    if streams:
        header_bytes = zlib.compress(header_bytes, 9)
    prefix = PREFIX.pack(MAGIC, version, len(header_bytes), bytes.fromhex(sha256_bytes(header_bytes)))
    return prefix + header_bytes + payload, header, sizes
