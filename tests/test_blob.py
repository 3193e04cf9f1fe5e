"""The packed blob and its codecs: bit-exact round trips, and one clear error for every kind of damage."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest
import torch

from pgolf.config.build import build
from pgolf.config.sections import CHALLENGE_LIMIT, MIN_CHUNK_BYTES, PackConfig, QuantizeConfig
from pgolf.errors import PgolfError
from pgolf.formats import blob, codecs
from pgolf.formats.blob_writer import _tensor_bytes, build_blob
from pgolf.formats.code import measure_code
from pgolf.formats.dequant import dequantize as dequantize_from
from pgolf.quant.recipe import quantize_state_dict


OFFERED = [c for c in codecs.CODECS if c != "lrzip" or shutil.which("lrzip")]  # lrzip: a Debian program


def dequantize(tensors, schema):
    return dequantize_from(tensors, schema, "test")


def write_blob(path, tensors, fields, codec, chunk_bytes=0) -> dict:
    data, header, _ = build_blob(tensors, fields, codec, chunk_bytes, "single", False)
    path.write_bytes(data)
    return header


def stored_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    """What quantize produces (int8 codes, fp16/fp32 scales, fp16/fp32 kept tensors) plus odd dtypes."""
    g = torch.Generator().manual_seed(seed)
    sd = {"tok_emb.weight": (torch.randn(300, 256, generator=g) * 0.02).to(torch.bfloat16),
          "blocks.0.mlp.fc.weight": torch.randn(512, 256, generator=g) * 0.02,
          "blocks.0.attn_scale": torch.rand(256, generator=g),
          "blocks.0.attn.c_q.weight": torch.randn(64, 64, generator=g)}
    tensors, schema, _ = quantize_state_dict(sd, QuantizeConfig(bits=6))
    tensors.update({"odd.int64": torch.arange(-3, 4), "odd.bool": torch.tensor([True, False, True]),
                    "odd.scalar": torch.tensor(2.5), "odd.empty": torch.zeros(0, 4),
                    "odd.bf16": torch.randn(5, generator=g).to(torch.bfloat16)})
    return tensors, schema


def header_fields(schema) -> dict:
    return {"model_config": {"vocab_size": 300}, "schema": schema, "tokenizer_sha256": "ab" * 32,
            "val_shards": {"fineweb_val_000000.bin": "cd" * 32}}


@pytest.mark.parametrize("codec", list(codecs.AUTO) + ["auto"])
def test_blob_roundtrip_bit_exact(tmp_path, codec):
    tensors, schema = stored_tensors()
    path = tmp_path / "model.pgolf"
    written = write_blob(path, tensors, header_fields(schema), codec)
    header, back = blob.read_blob(path, CHALLENGE_LIMIT)
    assert header == json.loads(json.dumps(written))
    assert header["codec"] in codecs.CODECS and (codec == "auto" or header["codec"] == codec)
    assert list(back) == list(tensors)
    for name, t in tensors.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        # Bit-exact: compare raw bytes, which also covers NaN payloads and signed zeros.
        assert _tensor_bytes(back[name]) == _tensor_bytes(t), name
    restored = dequantize(back, header["schema"])
    assert torch.equal(restored["blocks.0.mlp.fc.weight"], dequantize(tensors, schema)["blocks.0.mlp.fc.weight"])
    assert path.read_bytes().startswith(blob.MAGIC)


def test_auto_keeps_the_smallest(tmp_path):
    tensors, schema = stored_tensors(1)
    data, header, sizes = build_blob(tensors, header_fields(schema), "auto", 0, "single", False)
    assert set(sizes) == set(codecs.AUTO)
    assert header["codec"] == min(sizes, key=sizes.get)
    assert header["payload"]["compressed_bytes"] == min(sizes.values())


@pytest.fixture
def good_blob(tmp_path):
    tensors, schema = stored_tensors(2)
    path = tmp_path / "model.pgolf"
    write_blob(path, tensors, header_fields(schema), "zlib")
    return path


def header_span(path) -> tuple[int, int]:
    _, _, header_len, _ = blob.PREFIX.unpack_from(path.read_bytes())
    return blob.PREFIX.size, blob.PREFIX.size + header_len


def flip(path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_flipped_header_byte(good_blob):
    start, end = header_span(good_blob)
    flip(good_blob, (start + end) // 2)
    with pytest.raises(PgolfError, match=f"{good_blob}: header sha256 mismatch"):
        blob.read_blob(good_blob, CHALLENGE_LIMIT)


def test_flipped_payload_byte(good_blob):
    _, end = header_span(good_blob)
    flip(good_blob, end + (good_blob.stat().st_size - end) // 2)
    with pytest.raises(PgolfError, match=f"{good_blob}: payload sha256 mismatch"):
        blob.read_blob(good_blob, CHALLENGE_LIMIT)


def test_forged_header_still_caught(good_blob):
    """A re-hashed, self-consistent header that hides a tensor cannot make the payload decode shorter."""
    def drop_last_tensor(h):
        last = h["tensors"].pop()
        h["payload"]["raw_bytes"] -= last["nbytes"]

    _rewrite_header(good_blob, drop_last_tensor)
    with pytest.raises(PgolfError, match=f"{good_blob}: payload does not decode.*expands beyond"):
        blob.read_blob(good_blob, CHALLENGE_LIMIT)


@pytest.mark.parametrize("keep", [0, 10, blob.PREFIX.size + 5, -1])
def test_truncated_blob(good_blob, keep):
    data = good_blob.read_bytes()
    good_blob.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(PgolfError, match=f"{good_blob}:.*(truncated|shorter)"):
        blob.read_blob(good_blob, CHALLENGE_LIMIT)


def test_trailing_data(good_blob):
    good_blob.write_bytes(good_blob.read_bytes() + b"\0")
    with pytest.raises(PgolfError, match="trailing data"):
        blob.read_blob(good_blob, CHALLENGE_LIMIT)


def test_wrong_magic(good_blob, tmp_path):
    data = good_blob.read_bytes()
    good_blob.write_bytes(b"NOTPGOLF" + data[8:])
    with pytest.raises(PgolfError, match=f"{good_blob}: bad magic"):
        blob.read_blob(good_blob, CHALLENGE_LIMIT)
    other = tmp_path / "random.bin"
    other.write_bytes(os.urandom(4096))
    with pytest.raises(PgolfError, match="bad magic"):
        blob.read_blob(other, CHALLENGE_LIMIT)


def test_unsupported_version(good_blob):
    data = bytearray(good_blob.read_bytes())
    struct.pack_into("<I", data, 8, blob.VERSION_CHUNKED + 1)
    good_blob.write_bytes(bytes(data))
    with pytest.raises(PgolfError, match="version"):
        blob.read_blob(good_blob, CHALLENGE_LIMIT)


def test_oversize_blob(good_blob):
    """The reader bounds what it reads by a multiple of the limit (judging the size is verify's and pack's)."""
    size = good_blob.stat().st_size
    limit = -(-size // blob.MAX_FILE_FACTOR)  # the smallest limit whose read cap still holds the file
    blob.read_blob(good_blob, limit)
    with pytest.raises(PgolfError, match=f"{good_blob}: {size:,} bytes, more than {blob.MAX_FILE_FACTOR}× the "
                                         f"{limit - 1:,}-byte limit; not read"):
        blob.read_blob(good_blob, limit - 1)


def _rewrite_header(path, mutate) -> None:
    data = path.read_bytes()
    start, end = header_span(path)
    header = json.loads(data[start:end])
    mutate(header)
    hb = json.dumps(header).encode()
    path.write_bytes(blob.PREFIX.pack(blob.MAGIC, blob.VERSION, len(hb), bytes.fromhex(blob.sha256_bytes(hb))) + hb + data[end:])


@pytest.mark.parametrize("mutate, message", [
    (lambda h: h["tensors"][0].update(dtype="object"), "not allowed"),
    (lambda h: h["tensors"][1].update(offset=h["tensors"][1]["offset"] + 1), "offset"),
    (lambda h: h["tensors"][0].update(shape=[10 ** 9]), "nbytes"),
    (lambda h: h["payload"].update(raw_bytes=1 << 40), "cap"),
    (lambda h: h.update(codec="pickle"), "unknown codec"),
    (lambda h: h.pop("tensors"), "tensor table"),
])
def test_bad_tensor_table(good_blob, mutate, message):
    _rewrite_header(good_blob, mutate)
    with pytest.raises(PgolfError, match=message):
        blob.read_blob(good_blob, CHALLENGE_LIMIT)


def test_decompression_bomb_refused(good_blob):
    """A payload that expands beyond the declared raw size is refused before it is held in memory."""
    bomb = codecs.compress("zlib", b"\0" * 50_000_000)

    def mutate(h):
        h["payload"].update(compressed_bytes=len(bomb), sha256=blob.sha256_bytes(bomb))

    data = good_blob.read_bytes()
    _, end = header_span(good_blob)
    good_blob.write_bytes(data[:end])
    _rewrite_header(good_blob, mutate)
    good_blob.write_bytes(good_blob.read_bytes() + bomb)
    with pytest.raises(PgolfError, match="expands beyond"):
        blob.read_blob(good_blob, CHALLENGE_LIMIT)


# ---------------------------------------------------------------------------------------------------
# chunked payloads (format version 2)

@pytest.mark.parametrize("codec", OFFERED + ["auto"])
def test_chunked_blob_roundtrip_bit_exact(tmp_path, codec):
    tensors, schema = stored_tensors(3)
    path = tmp_path / "model.pgolf"
    written = write_blob(path, tensors, header_fields(schema), codec, chunk_bytes=MIN_CHUNK_BYTES)
    chunks = written["payload"]["chunks"]
    assert len(chunks) == -(-written["payload"]["raw_bytes"] // MIN_CHUNK_BYTES) >= 3
    assert all(raw == MIN_CHUNK_BYTES for raw, _ in chunks[:-1])
    assert blob.PREFIX.unpack_from(path.read_bytes())[1] == blob.VERSION_CHUNKED
    header, back = blob.read_blob(path, CHALLENGE_LIMIT)
    assert header == json.loads(json.dumps(written)) and list(back) == list(tensors)
    for name, t in tensors.items():
        assert _tensor_bytes(back[name]) == _tensor_bytes(t), name
    # A payload no larger than one chunk stays a version-1 single stream.
    single, header1, _ = build_blob(tensors, header_fields(schema), codec, 1 << 30, "single", False)
    assert blob.PREFIX.unpack_from(single)[1] == blob.VERSION and "chunks" not in header1["payload"]


def test_chunked_auto_keeps_the_smallest_total(tmp_path):
    tensors, schema = stored_tensors(4)
    _, header, sizes = build_blob(tensors, header_fields(schema), "auto", MIN_CHUNK_BYTES, "single", False)
    assert set(sizes) == set(codecs.AUTO) and header["codec"] == min(sizes, key=sizes.get)
    assert header["payload"]["compressed_bytes"] == min(sizes.values())


@pytest.fixture
def chunked_blob(tmp_path):
    tensors, schema = stored_tensors(5)
    path = tmp_path / "chunked.pgolf"
    write_blob(path, tensors, header_fields(schema), "zlib", chunk_bytes=MIN_CHUNK_BYTES)
    return path


def _rewrite(path, mutate, version=None, payload=None) -> None:
    data = path.read_bytes()
    _, old_version, _, _ = blob.PREFIX.unpack_from(data)
    start, end = header_span(path)
    header = json.loads(data[start:end])
    mutate(header)
    hb = json.dumps(header).encode()
    path.write_bytes(blob.PREFIX.pack(blob.MAGIC, version or old_version, len(hb), bytes.fromhex(blob.sha256_bytes(hb)))
                     + hb + (data[end:] if payload is None else payload))


@pytest.mark.parametrize("mutate, version, message", [
    (lambda h: h["payload"]["chunks"][0].__setitem__(0, 1), None, "does not add up"),
    (lambda h: h["payload"].update(chunks="x"), None, "bad chunk table"),
    (lambda h: h["payload"].pop("chunks"), None, "needs a chunk table"),
    (lambda h: None, blob.VERSION, "version 1 must not have a chunk table"),
])
def test_bad_chunk_table(chunked_blob, mutate, version, message):
    _rewrite(chunked_blob, mutate, version)
    with pytest.raises(PgolfError, match=message):
        blob.read_blob(chunked_blob, CHALLENGE_LIMIT)


def test_chunk_that_decodes_to_another_size_is_refused(chunked_blob):
    """Two chunks' sizes swapped in the table: totals still add up, each chunk's own bound catches it."""
    data = chunked_blob.read_bytes()
    _, end = header_span(chunked_blob)
    header = json.loads(data[header_span(chunked_blob)[0]:end])
    a, b = header["payload"]["chunks"][0], header["payload"]["chunks"][-1]
    assert a[0] != b[0]
    pieces, at = [], 0
    for raw, comp in header["payload"]["chunks"]:
        pieces.append(data[end + at:end + at + comp])
        at += comp
    pieces[0], pieces[-1] = pieces[-1], pieces[0]  # the payload's chunks in another order
    payload = b"".join(pieces)

    def mutate(h):
        c = h["payload"]["chunks"]
        c[0], c[-1] = [c[0][0], len(pieces[0])], [c[-1][0], len(pieces[-1])]
        h["payload"]["sha256"] = blob.sha256_bytes(payload)

    _rewrite(chunked_blob, mutate, payload=payload)
    with pytest.raises(PgolfError, match="chunk 0|expands beyond"):
        blob.read_blob(chunked_blob, CHALLENGE_LIMIT)


def test_chunk_bytes_below_the_minimum_is_refused():
    with pytest.raises(PgolfError, match=r"chunk_bytes=4096 must be 0 \(off\) or >= 65536"):
        build(PackConfig, [({"chunk_bytes": 4096}, "params")], "pack")


# ---------------------------------------------------------------------------------------------------
# codecs

@pytest.mark.parametrize("name", OFFERED)
def test_codec_roundtrip_and_max_size(name):
    data = os.urandom(3000) + bytes(range(256)) * 400 + b"\0" * 100_000
    packed = codecs.compress(name, data)
    assert len(packed) < len(data)
    assert codecs.decompress(name, packed, len(data)) == data
    assert codecs.decompress(name, codecs.compress(name, b""), 0) == b""
    with pytest.raises(PgolfError, match="beyond"):
        codecs.decompress(name, packed, len(data) - 1)
    with pytest.raises(PgolfError, match=name):
        codecs.decompress(name, packed[: len(packed) // 2], len(data))
    with pytest.raises(PgolfError, match=name):
        codecs.decompress(name, b"this is not compressed data at all", len(data))


def test_auto_picks_the_smallest_codec():
    data = b"abcabcabd" * 5000
    name, packed, sizes = codecs.choose("auto", data)
    assert len(packed) == min(len(codecs.compress(n, data)) for n in codecs.AUTO) == min(sizes.values())
    assert codecs.decompress(name, packed, len(data)) == data
    with pytest.raises(PgolfError, match="unknown codec"):
        codecs.compress("gzip", data)


def test_code_bytes_are_the_compressed_decode_path():
    code = measure_code("auto")
    assert code["bytes"] == min(code["sizes"].values()) and code["bytes"] < code["raw_bytes"]
    assert "stages/ttt_eval.py" in code["files"] and "stages/formats/dequant.py" in code["files"]
