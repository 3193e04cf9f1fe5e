"""The packed artifact (`model.pgolf`): one self-describing blob.

Layout (integers little-endian):

    8 bytes   magic b"PGOLFBL\\0"
    u32       format version
    u32       header length H
    32 bytes  sha256 of the header bytes
    H bytes   JSON header: model config, tensor table (name, dtype, shape, offset, nbytes), quantization
              schema, codec, payload sizes and sha256s, tokenizer and val-shard sha256s, producer versions
    rest      the payload: the raw tensor bytes, concatenated in table order, compressed with `codec`

Version 3 (pack.container: pergroup, the default) zlib-compresses the header and splits the payload into
per-group streams, each laid out and compressed on its own (pgolf.formats.streams). Version 1 compresses
the payload as one stream. Version 2 (`pack.chunk_bytes` > 0) cuts the raw payload
into chunks of that many bytes and compresses each independently, in parallel, so the strongest codecs'
time spreads over the cores (no context crosses a chunk; bench/chunk_bench.py measures both layouts).
Its header lists [raw, compressed] bytes per chunk; each chunk decodes bounded by its own declared size.

This module reads (pgolf.formats.blob_writer writes): it parses JSON and copies bytes into tensors of
whitelisted dtypes; nothing from the file is ever executed or unpickled. A hostile file ends in one
PgolfError naming the file, and costs little: its size is checked before it is read (a multiple of the
artifact limit), the header is parsed within bounds (files.loads_bounded) and every field a reader uses
is checked here, once, for ttt-eval and verify alike (check_header: the schema is even decoded on meta
tensors, so no decoder fails later; model_config holds the model to the schema the same way), the
declared raw payload is capped at MAX_EXPANSION × the limit before anything is allocated, and decoding
streams into one buffer of the declared size, refused the moment output passes it; the tensors are
views of that buffer. Each check is a function of its own (verify reports each separately; read_blob
runs them all).
"""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path
from typing import Any

import torch

from pgolf.config.build import build_section
from pgolf.config.sections import ModelConfig
from pgolf.errors import PgolfError
from pgolf.formats import codecs
from pgolf.formats.dequant import DTYPES, ENCODINGS, dequantize
from pgolf.formats.files import loads_bounded, sha256_bytes
from pgolf.formats.streams import check_streams, decode_streams

MAGIC = b"PGOLFBL\x00"
VERSION = 1  # one compressed stream
VERSION_CHUNKED = 2  # independently compressed chunks
VERSION_STREAMS = 3  # per-group streams, each with its codec (pgolf.formats.streams); the header zlib-compressed
VERSIONS = (VERSION, VERSION_CHUNKED, VERSION_STREAMS)
PERGROUP = "pergroup"  # the header's codec field in format 3: each stream names its own
PREFIX = struct.Struct("<8sII32s")  # magic, version, header length, header sha256

# Reading is bounded by a limit on model + code bytes: pack.limit and verify.limit, or the challenge's own
# (config.sections.CHALLENGE_LIMIT) for ttt-eval, which has none.
MAX_FILE_FACTOR = 4  # a file is read only up to 4× its limit: verify still reports one a little over as a size FAIL
# Raw payload <= 16× the limit: records expand ~2.3× (6-bit codes held in int8), 2-bit codes ~5×; no
# artifact within the limit needs gigabytes, so a header declaring them is refused before decoding.
MAX_EXPANSION = 16
MAX_HEADER_BYTES = 1 << 20  # a real header (tables, schema, provenance) is tens of KB
MAX_DIMS = 8
MAX_NAME_CHARS = 256
CORRUPT = "the blob is corrupt or not written by pgolf (re-download or re-pack it)"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")


def max_file_bytes(limit: int) -> int:
    return MAX_FILE_FACTOR * limit


def max_raw_bytes(limit: int) -> int:
    return MAX_EXPANSION * limit


def fail(source: Any, msg: str) -> PgolfError:
    return PgolfError(f"{source}: {msg}")


def field_error(source: Any, field: str, problem: str) -> PgolfError:
    return PgolfError(f"{source}: header field {field} {problem}; {CORRUPT}")


def _show(value: Any) -> str:
    return f"{value!r:.60}"


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_sha(x: Any) -> bool:
    return isinstance(x, str) and _HEX64.fullmatch(x) is not None


def _is_name(x: Any) -> bool:
    return isinstance(x, str) and 0 < len(x) <= MAX_NAME_CHARS and x.isprintable()


def _is_key(x: Any, table: dict) -> bool:
    """`x in table`, for a value from a file (which may be unhashable: a list, a mapping)."""
    return isinstance(x, str) and x in table


def _is_shape(x: Any) -> bool:
    return isinstance(x, list) and len(x) <= MAX_DIMS and all(_is_count(d) for d in x)


# ---- reading the file

def read_capped(path: str | Path, limit: int) -> bytes:
    """A file's bytes, read only when within MAX_FILE_FACTOR × `limit` (checked before reading)."""
    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"{path}: file not found; run `pgolf pack` first, or check the path")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size  # of the file opened: reading stops there even if it grows
        if size > max_file_bytes(limit):
            raise fail(path, f"{size:,} bytes, more than {MAX_FILE_FACTOR}× the {limit:,}-byte limit; not read (no "
                              "artifact within the limit is this big)")
        return f.read(size)


def parse_blob(data: bytes, source: Any, limit: int) -> tuple[dict[str, Any], memoryview]:
    """Check magic, version, header hash and every header field; return (header, compressed payload)."""
    if len(data) < PREFIX.size:
        raise fail(source, f"{len(data)} bytes is shorter than the {PREFIX.size}-byte blob prefix; truncated or not a pgolf blob")
    magic, version, header_len, header_hash = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise fail(source, f"bad magic {magic!r}; not a pgolf blob (for the challenge's final_model.int8.ptz "
                            "use --format official-int8)")
    if version not in VERSIONS:
        raise fail(source, f"blob format version {version} is not supported by this pgolf (reads "
                            f"{', '.join(map(str, VERSIONS))}); use the pgolf version that packed it")
    if PREFIX.size + header_len > len(data):
        raise fail(source, f"header length {header_len:,} runs past the end of the {len(data):,}-byte file; "
                            "the blob is truncated or corrupt")
    if header_len > MAX_HEADER_BYTES:
        raise fail(source, f"header length {header_len:,} is beyond the {MAX_HEADER_BYTES:,} bytes a pgolf header "
                            f"may have; {CORRUPT}")
    view = memoryview(data)
    header_bytes = view[PREFIX.size:PREFIX.size + header_len]
    if sha256_bytes(header_bytes) != header_hash.hex():
        raise fail(source, "header sha256 mismatch; the header was altered or corrupted, re-download or re-pack")
    if version == VERSION_STREAMS:  # JSON compresses ~10×: tens of KB of tensor table and schema saved
        try:
            header_bytes = codecs.decompress("zlib", bytes(header_bytes), MAX_HEADER_BYTES)
        except PgolfError as exc:
            raise fail(source, f"header does not decompress: {exc}; {CORRUPT}") from None
    header = loads_bounded(header_bytes, f"{source}: header", CORRUPT, MAX_HEADER_BYTES)
    check_header(header, version, source, limit)
    return header, view[PREFIX.size + header_len:]


# ---- the header: every field a reader uses

def check_header(header: Any, version: int, source: Any, limit: int) -> None:
    """Refuse a header unless every field a reader uses has its type, its bounds and agrees with the rest."""
    if not isinstance(header, dict) or header.get("format") != "pgolf-blob":
        raise fail(source, f"header is not a pgolf-blob header (field format); {CORRUPT}")
    known = {PERGROUP: None} if version == VERSION_STREAMS else codecs.CODECS
    if not _is_key(header.get("codec"), known):
        raise fail(source, f"unknown codec {_show(header.get('codec'))} (header field codec) for format version "
                            f"{version}; made by a newer pgolf (upgrade) or corrupt")
    _check_payload_fields(header.get("payload"), version, source, limit)
    _check_table(header.get("tensors"), header["payload"]["raw_bytes"], source, limit)
    if version == VERSION_STREAMS:
        payload = header["payload"]
        check_streams(payload.get("streams"), header["tensors"], payload["raw_bytes"], payload["compressed_bytes"],
                      lambda field, problem: field_error(source, field, problem))
    _check_schema(header.get("schema"), header["tensors"], source)
    build_model_config(header, source)
    _check_identity(header, source)


def _check_payload_fields(payload: Any, version: int, source: Any, limit: int) -> None:
    if not isinstance(payload, dict):
        raise field_error(source, "payload", "is missing or not a mapping (header lacks payload sizes and hashes)")
    for key in ("raw_bytes", "compressed_bytes"):
        if not _is_count(payload.get(key)):
            raise field_error(source, f"payload.{key}", f"is {_show(payload.get(key))}, not a byte count")
    for key in ("sha256", "raw_sha256"):
        if not _is_sha(payload.get(key)):
            raise field_error(source, f"payload.{key}", f"is {_show(payload.get(key))}, not a sha256 (64 lowercase hex digits)")
    cap = max_raw_bytes(limit)
    if payload["raw_bytes"] > cap:
        raise fail(source, f"declared raw payload {payload['raw_bytes']:,} bytes exceeds the {cap:,}-byte cap "
                            f"({MAX_EXPANSION}× the {limit:,}-byte limit); refusing before decoding (no artifact within "
                            "the limit expands this far)")
    if ("streams" in payload) != (version == VERSION_STREAMS):
        need = "needs a stream table" if version == VERSION_STREAMS else "must not have a stream table"
        raise fail(source, f"format version {version} {need} (header field payload.streams); {CORRUPT}")
    if ("chunks" in payload) != (version == VERSION_CHUNKED):
        need = "needs a chunk table" if version == VERSION_CHUNKED else "must not have a chunk table"
        raise fail(source, f"format version {version} {need} (header field payload.chunks); {CORRUPT}")
    if "chunks" in payload:
        chunks = payload["chunks"]
        if not isinstance(chunks, list) or not chunks or not all(
                isinstance(c, list) and len(c) == 2 and all(_is_count(x) and x > 0 for x in c) for c in chunks):
            raise field_error(source, "payload.chunks", "is a bad chunk table (a list of [raw, compressed] byte counts)")
        if sum(c[0] for c in chunks) != payload["raw_bytes"] or sum(c[1] for c in chunks) != payload["compressed_bytes"]:
            raise field_error(source, "payload.chunks", "is a chunk table that does not add up to the declared payload sizes")


def _check_table(table: Any, raw_bytes: int, source: Any, limit: int) -> None:
    if not isinstance(table, list):
        raise field_error(source, "tensors", "is missing or not a list (header lacks the tensor table)")
    end, names, cap = 0, set(), max_raw_bytes(limit)
    for i, row in enumerate(table):
        if not isinstance(row, dict):
            raise field_error(source, f"tensors[{i}]", "is not a mapping")
        name = row.get("name")
        if not _is_name(name) or name in names:
            raise field_error(source, f"tensors[{i}].name", f"is {_show(name)}: a bad or duplicate tensor name (1 to "
                                                       f"{MAX_NAME_CHARS} printable characters, each once)")
        names.add(name)
        if not _is_key(row.get("dtype"), DTYPES):
            raise fail(source, f"tensor {name!r}: dtype {_show(row.get('dtype'))} is not allowed (header field "
                                f"tensors[{i}].dtype; allowed: {', '.join(DTYPES)})")
        shape = row.get("shape")
        if not _is_shape(shape):
            raise field_error(source, f"tensors[{i}].shape", f"is {_show(shape)}: a bad shape for tensor {name!r} (a list "
                                                        f"of at most {MAX_DIMS} sizes)")
        if not (_is_count(row.get("offset")) and _is_count(row.get("nbytes"))):
            raise field_error(source, f"tensors[{i}]", f"has a bad offset/nbytes for tensor {name!r}")
        itemsize = DTYPES[row["dtype"]].itemsize
        if row["nbytes"] != math.prod(shape) * itemsize:
            raise fail(source, f"tensor {name!r}: nbytes {row['nbytes']} does not match shape {shape} × {itemsize}; "
                                f"{CORRUPT}")
        if any(d > cap for d in shape):  # only an empty tensor gets here; torch could not even describe it
            raise field_error(source, f"tensors[{i}].shape", f"has a dimension beyond {cap:,} in tensor {name!r}")
        # Tensors lie back to back in table order, so bounds and overlaps are one comparison.
        if row["offset"] != end:
            raise fail(source, f"tensor {name!r}: offset {row['offset']} should be {end}; the tensor table is corrupt")
        end += row["nbytes"]
    if end != raw_bytes:
        raise fail(source, f"tensor table covers {end:,} bytes but the payload declares {raw_bytes:,}; {CORRUPT}")


def _check_schema(schema: Any, table: list[dict[str, Any]], source: Any) -> None:
    if not isinstance(schema, dict) or not schema:
        raise field_error(source, "schema", "is missing or empty (a mapping of tensor name to its encoding, as `pgolf "
                                       "quantize` writes)")
    stored = {row["name"]: row for row in table}
    for name, entry in schema.items():
        where = f"schema[{name[:80]!r}]"
        if not _is_name(name):
            raise field_error(source, "schema", f"has the key {_show(name)}, not a tensor name")
        if not isinstance(entry, dict):
            raise field_error(source, where, f"is {_show(entry)}, not a mapping")
        encoding = entry.get("encoding")
        if not _is_key(encoding, ENCODINGS):
            raise field_error(source, f"{where}.encoding", f"is {_show(encoding)}, an encoding this pgolf does not know "
                                                      f"(known: {', '.join(ENCODINGS)}; upgrade pgolf if it is newer)")
        parts = entry.get("parts")
        if not isinstance(parts, dict):
            raise field_error(source, f"{where}.parts", f"is {_show(parts)}, not a mapping of part roles to tensor names")
        for role in ENCODINGS[encoding][0]:
            if not _is_key(parts.get(role), stored):
                raise field_error(source, f"{where}.parts", f"lacks the {role!r} tensor {encoding} needs, or names one the "
                                                       f"tensor table does not list ({_show(parts.get(role))})")
        if not _is_shape(entry.get("shape")):
            raise field_error(source, f"{where}.shape", f"is {_show(entry.get('shape'))}, not a shape")
        if not _is_key(entry.get("dtype"), DTYPES):
            raise field_error(source, f"{where}.dtype", f"is {_show(entry.get('dtype'))}, not an allowed dtype")
        lqer = entry.get("lqer", {})
        if not isinstance(lqer, dict) or not _is_count(lqer.get("group", 0)):
            raise field_error(source, f"{where}.lqer", f"is {_show(lqer)}, not a mapping with a count `group`")
    # The decoders check how parts fit together (dtypes, shapes); run them on meta tensors, which hold no
    # data, so a schema that would fail mid-decode is refused before anything is decompressed.
    meta = {name: torch.empty(row["shape"], dtype=DTYPES[row["dtype"]], device="meta") for name, row in stored.items()}
    try:
        dequantize(meta, schema, f"{source}: header field schema")
    except PgolfError:
        raise
    except Exception as exc:  # noqa: BLE001 — any decoder failure on a header is the header's fault
        raise field_error(source, "schema", f"does not decode ({type(exc).__name__}: {str(exc)[:200]})") from None


def build_model_config(header: dict[str, Any], source: Any) -> ModelConfig:
    values = header.get("model_config")
    if not isinstance(values, dict):
        raise field_error(source, "model_config", f"is {_show(values)}, not a mapping of model keys")
    try:
        return build_section(ModelConfig, values, f"{source}: header field model_config")
    except PgolfError:
        raise
    except Exception as exc:  # noqa: BLE001 — e.g. OverflowError from a cross-key rule on absurd values
        raise field_error(source, "model_config", f"does not validate ({type(exc).__name__}: {str(exc)[:200]})") from None


def _check_identity(header: dict[str, Any], source: Any) -> None:
    if not _is_sha(header.get("tokenizer_sha256")):
        raise field_error(source, "tokenizer_sha256", f"is {_show(header.get('tokenizer_sha256'))}, not a sha256 "
                                                 "(64 lowercase hex digits)")
    val = header.get("val_shards")
    if not isinstance(val, dict):
        raise field_error(source, "val_shards", f"is {_show(val)}, not a mapping of shard file names to sha256s")
    for name, sha in val.items():
        if not _FILE_NAME.fullmatch(name):
            raise field_error(source, "val_shards", f"has the key {_show(name)}, not a plain file name")
        if not _is_sha(sha):
            raise field_error(source, f"val_shards[{name!r}]", f"is {_show(sha)}, not a sha256 (64 lowercase hex digits)")
    code = header.get("code", {})
    if not isinstance(code, dict) or not _is_count(code.get("bytes", 0)) or not isinstance(code.get("codec", ""), str) \
            or not (isinstance(code.get("files", []), list) and all(isinstance(f, str) for f in code.get("files", []))):
        raise field_error(source, "code", f"is {_show(code)}, not a mapping of files (names), codec (a name) and bytes (a count)")


# ---- the payload

def check_payload(header: dict[str, Any], payload: bytes | memoryview, source: Any) -> None:
    """The compressed payload has the declared length and sha256."""
    declared = header["payload"]["compressed_bytes"]
    if len(payload) != declared:
        raise fail(source, f"payload is {len(payload):,} bytes, header declares {declared:,}; "
                            "the blob is truncated or has trailing data")
    if sha256_bytes(payload) != header["payload"]["sha256"]:
        raise fail(source, "payload sha256 mismatch; the weights were altered or corrupted, re-download or re-pack")


def _decode_chunks(header: dict[str, Any], payload: memoryview, out: memoryview, source: Any) -> None:
    """Formats 1 and 2: one stream, or independent chunks, each into its declared slice of `out`."""
    meta = header["payload"]
    at_in = at_out = 0
    for i, (raw_len, comp_len) in enumerate(meta.get("chunks") or [[meta["raw_bytes"], len(payload)]]):
        try:
            codecs.decompress_into(header["codec"], payload[at_in:at_in + comp_len], out[at_out:at_out + raw_len])
        except PgolfError as exc:
            raise fail(source, f"payload does not decode{f' (chunk {i})' if 'chunks' in meta else ''}: {exc}") from None
        at_in, at_out = at_in + comp_len, at_out + raw_len


def decode_payload(header: dict[str, Any], payload: bytes | memoryview, source: Any) -> dict[str, torch.Tensor]:
    """Decompress, chunk by chunk, into one buffer of the declared raw size (refused the moment output
    would pass a chunk's declared size), check its sha256, and return the tensors as views of it."""
    meta = header["payload"]
    buf = torch.empty(meta["raw_bytes"], dtype=torch.uint8)  # not zeroed: every byte is written or refused
    out, payload = memoryview(buf.numpy()), memoryview(payload)
    if "streams" in meta:  # format 3: every tensor byte is written by exactly one stream item (checked)
        decode_streams(header, payload, buf.numpy(), source)
    else:
        _decode_chunks(header, payload, out, source)
    if sha256_bytes(out) != meta["raw_sha256"]:
        raise fail(source, f"decoded payload ({meta['raw_bytes']:,} bytes) does not match the header's raw sha256; "
                            f"{CORRUPT}")
    tensors = {}
    for row in header["tensors"]:
        dtype, start, nbytes = DTYPES[row["dtype"]], row["offset"], row["nbytes"]
        if not nbytes:
            tensors[row["name"]] = torch.empty(row["shape"], dtype=dtype)
            continue
        piece = buf[start:start + nbytes]
        if start % dtype.itemsize:  # a view as a wider dtype needs an aligned offset; copy the few that are not
            piece = piece.clone()
        if dtype == torch.bool and bool((piece > 1).any()):
            raise fail(source, f"tensor {row['name']!r}: bool bytes other than 0 and 1; {CORRUPT}")
        tensors[row["name"]] = piece.view(dtype).reshape(row["shape"])
    return tensors


def open_blob(path: str | Path, limit: int) -> tuple[dict[str, Any], memoryview]:
    """(header, compressed payload) of a pgolf blob read within `limit`'s bounds, header and payload hash checked."""
    path = Path(path)
    header, payload = parse_blob(read_capped(path, limit), path, limit)
    check_payload(header, payload, path)
    return header, payload


def read_blob(path: str | Path, limit: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(header, stored tensors) of a pgolf blob, every check applied; `limit` is the artifact limit that
    bounds what is read (MAX_FILE_FACTOR × limit) and decoded (MAX_EXPANSION × limit)."""
    header, payload = open_blob(path, limit)
    return header, decode_payload(header, payload, Path(path))
