"""The per-group payload (blob format version 3): tensors grouped by role into streams, each laid out and
compressed on its own.

Why: one compressed stream mixes 6-bit codes, fp16 scales and fp32 control tensors, so no codec's model
fits any of them. The record's container (PR #1855, `COMPRESSOR=pergroup`) grouped the codes by role, laid
each matrix out column-major and saved about 280 KB against one brotli stream. Here:

- codes of the same role (`blocks.*.mlp.fc.weight#codes` of every layer, in layer order) form one stream;
  every other part forms a stream per dtype (scales, LQER factors, float tensors);
- an item's layout is `rows` (as stored), `cols` (a 2-D tensor column-major), `shuffle` (byte planes: all
  first bytes of a multi-byte dtype, then all second bytes, ...) or `sorted_cols` (rows reordered by a
  greedy nearest-neighbour chain under L1, then column-major; the permutation is a `perm` item, u16 per
  row, of the stream `<role>#perm`);
- each stream names its codec (pgolf.formats.codecs), so `auto` keeps the smallest per stream.

The raw payload is unchanged by all this: the tensors back to back in table order, whose sha256 the
header holds, so the reader rebuilds exactly what format 1 would have stored. This module reads; the
writer is pgolf.formats.blob_writer. A stream decodes into a buffer of its declared size (refused the
moment it would pass it), every item's size follows from the tensor table, each tensor is covered by
exactly one item and each permutation is checked to be one before it is applied.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pgolf.errors import PgolfError
from pgolf.formats import codecs
from pgolf.formats.dequant import DTYPES

LAYOUTS = ("rows", "cols", "shuffle", "sorted_cols")
PERM_DTYPE = np.dtype("<u2")  # rows of a sorted matrix: at most 65,535


def is_permutation(order: np.ndarray) -> bool:
    """Whether `order` holds each of 0..len−1 once (a row order read from a file, checked before use)."""
    return np.array_equal(np.sort(order), np.arange(len(order)))


def item_bytes(row: dict[str, Any], layout: str) -> int:
    """Bytes an item takes in its stream: the tensor's, or its permutation's (u16 per row)."""
    return row["shape"][0] * PERM_DTYPE.itemsize if layout == "perm" else row["nbytes"]


def layout_fits(row: dict[str, Any], layout: str) -> bool:
    itemsize = DTYPES[row["dtype"]].itemsize
    if layout in ("cols", "sorted_cols", "perm"):
        return len(row["shape"]) == 2 and itemsize == 1 and (layout == "cols" or 0 < row["shape"][0] <= 65535)
    return layout == "rows" or (layout == "shuffle" and itemsize > 1)


def check_streams(streams: Any, table: list[dict[str, Any]], raw_bytes: int, compressed_bytes: int,
                  field_error) -> None:
    """Every stream well formed, its declared sizes the sums of its items', every tensor in exactly one data
    item, and a permutation item for each `sorted_cols` one (field_error(field, problem) makes the error)."""
    rows = {row["name"]: row for row in table}
    if not isinstance(streams, list) or not streams:
        raise field_error("payload.streams", "is missing or not a list of streams")
    covered: dict[str, str] = {}
    perms, sorted_items, total_raw, total_comp = set(), set(), 0, 0
    for i, s in enumerate(streams):
        where = f"payload.streams[{i}]"
        if not isinstance(s, dict) or not isinstance(s.get("items"), list) or not isinstance(s.get("codec"), str) \
                or s["codec"] not in codecs.CODECS:
            raise field_error(where, "is not a stream (a mapping with a known codec and a list of items)")
        for key in ("raw_bytes", "compressed_bytes"):
            if not (isinstance(s.get(key), int) and not isinstance(s[key], bool) and s[key] > 0):
                raise field_error(f"{where}.{key}", "is not a positive byte count")
        size = 0
        for item in s["items"]:
            if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str) and item[0] in rows
                    and item[1] in LAYOUTS + ("perm",) and layout_fits(rows[item[0]], item[1])):
                raise field_error(f"{where}.items", f"has {str(item)[:80]}, not a [tensor, layout] pair that fits "
                                                    "the tensor table")
            name, layout = item
            if layout == "perm":
                perms.add(name)
            elif name in covered:
                raise field_error(f"{where}.items", f"lists tensor {name!r} a second time")
            else:
                covered[name] = layout
                if layout == "sorted_cols":
                    sorted_items.add(name)
            size += item_bytes(rows[name], layout)
            total_raw += item_bytes(rows[name], layout) if layout != "perm" else 0
        if size != s["raw_bytes"]:
            raise field_error(f"{where}.raw_bytes", f"is {s['raw_bytes']:,}, but its items take {size:,}")
        total_comp += s["compressed_bytes"]
    if set(covered) != {row["name"] for row in table if row["nbytes"]}:
        missing = sorted({row["name"] for row in table if row["nbytes"]} - set(covered))[:3]
        raise field_error("payload.streams", f"do not cover every tensor (missing: {missing})")
    if perms != sorted_items:
        raise field_error("payload.streams", "have permutations that do not match the row-sorted tensors")
    if total_raw != raw_bytes or total_comp != compressed_bytes:
        raise field_error("payload.streams", "do not add up to the declared payload sizes")


def _restore(piece: np.ndarray, row: dict[str, Any], layout: str, perm: np.ndarray | None) -> np.ndarray:
    """The tensor's bytes in table order from its bytes in the stream."""
    if layout == "rows":
        return piece
    if layout == "shuffle":
        itemsize = DTYPES[row["dtype"]].itemsize
        return piece.reshape(itemsize, -1).T.reshape(-1)
    rows, cols = row["shape"]
    matrix = piece.reshape(cols, rows).T
    if layout == "sorted_cols":  # stream row j is the tensor's row perm[j]
        out = np.empty_like(matrix)
        out[perm] = matrix
        matrix = out
    return np.ascontiguousarray(matrix).reshape(-1)


def decode_streams(header: dict[str, Any], payload: memoryview, out: np.ndarray, source: Any) -> None:
    """Decompress every stream and write its tensors' bytes into `out` (the raw payload, in table order)."""
    meta = header["payload"]
    rows = {row["name"]: row for row in header["tensors"]}
    decoded: list[tuple[dict[str, Any], np.ndarray]] = []
    at = 0
    for i, s in enumerate(meta["streams"]):
        buf = np.empty(s["raw_bytes"], dtype=np.uint8)
        try:
            codecs.decompress_into(s["codec"], payload[at:at + s["compressed_bytes"]], memoryview(buf))
        except PgolfError as exc:
            raise PgolfError(f"{source}: payload stream {i} ({s.get('name', '?')}) does not decode: {exc}") from None
        at += s["compressed_bytes"]
        decoded.append((s, buf))
    perms = {}
    for s, buf in decoded:
        offset = 0
        for name, layout in s["items"]:
            size = item_bytes(rows[name], layout)
            if layout == "perm":
                perm = buf[offset:offset + size].view(PERM_DTYPE).astype(np.int64)
                if not is_permutation(perm):
                    raise PgolfError(f"{source}: the row permutation of {name!r} is not a permutation; the blob is "
                                     "corrupt (re-download or re-pack it)")
                perms[name] = perm
            offset += size
    for s, buf in decoded:
        offset = 0
        for name, layout in s["items"]:
            row, size = rows[name], item_bytes(rows[name], layout)
            if layout != "perm":
                start = row["offset"]
                out[start:start + size] = _restore(buf[offset:offset + size], row, layout, perms.get(name))
            offset += size
