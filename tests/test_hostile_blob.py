"""Hostile blobs end in one clean PgolfError, fast and with bounded memory, in ttt-eval and verify alike.

The blob under attack is a real one (generated corpus → `pgolf tokenize` → a perturbed GPT → `pgolf
quantize` with LQER → `pgolf pack`, single-stream and chunked). Its header is mutated with the header
sha256 recomputed, so every mutation reaches the parser; payload mutations fix the payload hashes, so
they reach the decoder. Memory is the peak RSS of a process running the real commands (torch's
allocations are invisible to tracemalloc), against its own peak after failing on a tiny bad file.
"""

from __future__ import annotations

import collections
import copy
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import tracemalloc
import zlib
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from pgolf import pack, quantize, ttt_eval, verify
from pgolf.audit import checks
from pgolf.config.sections import (CHALLENGE_LIMIT, MIN_CHUNK_BYTES, EvalConfig, ModelConfig, PackConfig,
                                   QuantizeConfig, VerifyConfig)
from pgolf.errors import PgolfError
from pgolf.formats import blob, blob_model, codecs
from pgolf.formats.dequant import DTYPES, ENCODINGS, dequantize
from pgolf.formats.files import read_json, save_tensors, sha256_bytes
from pgolf.nn.model import GPT
from test_verify import tokenize_into, write_corpus

LIMIT = CHALLENGE_LIMIT
EVAL = EvalConfig(seq_len=64, val_tokens=512, batch_seqs=8, device="cpu")
GIB2 = 1 << 31
MB = 1 << 20


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    data = tokenize_into(tmp, "data", write_corpus(tmp / "a.jsonl", seed=3))
    cfg = ModelConfig(vocab_size=300, num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)
    torch.manual_seed(0)
    state = {k: v.detach().clone() + 0.05 * torch.randn_like(v) for k, v in GPT(cfg).state_dict().items()}
    ckpt = tmp / "ckpt.safetensors"
    save_tensors(ckpt, state, "checkpoint", {"model_config": asdict(cfg), "params": {},
                                             "tokenizer_sha256": read_json(data / "manifest.json")["tokenizer_sha256"]})
    quantized = tmp / "quantized.safetensors"
    # Small matrices quantized (not kept float), two of them with an LQER correction: every encoding occurs.
    quantize.run(ckpt, quantized, QuantizeConfig(bits=6, keep_float_max_numel=1024, lqer_top_k=2, lqer_rank=2),
                 PackConfig(codec="zlib"), None, tmp / "quantize.json", None)
    blobs = {}
    for name, chunk in (("single", 0), ("chunked", MIN_CHUNK_BYTES)):
        blobs[name] = tmp / f"{name}.pgolf"
        pack.run(quantized, data, blobs[name], PackConfig(codec="zlib", container="single", chunk_bytes=chunk),
                 tmp / f"{name}.json")
    return {"tmp": tmp, "data": data, "cfg": cfg, "blobs": blobs}


# ---------------------------------------------------------------------------------------------------
# building blobs by hand

def split(path: Path) -> tuple[int, dict, bytes]:
    data = path.read_bytes()
    _, version, header_len, _ = blob.PREFIX.unpack_from(data)
    start = blob.PREFIX.size
    return version, json.loads(data[start:start + header_len]), data[start + header_len:]


def assemble(version: int, header: dict | str, payload: bytes) -> bytes:
    """A blob whose header hash is right, whatever the header says (a dict, or JSON text as it is)."""
    hb = (header if isinstance(header, str) else json.dumps(header, sort_keys=True, separators=(",", ":"))).encode()
    return blob.PREFIX.pack(blob.MAGIC, version, len(hb), bytes.fromhex(sha256_bytes(hb))) + hb + payload


def set_payload(header: dict, payload: bytes) -> None:
    header["payload"].update(compressed_bytes=len(payload), sha256=sha256_bytes(payload))


def zlib_zeros(n: int, step: int = MB) -> bytes:
    """A genuine zlib stream of `n` zero bytes (n a multiple of `step`) in milliseconds: after a full flush
    the compressor starts afresh, so every step compresses to the same bytes; the adler-32 of n zeros is
    1 + (n mod 65521)·2¹⁶."""
    c = zlib.compressobj(9)
    first = c.compress(bytes(step)) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(step)) + c.flush(zlib.Z_FULL_FLUSH)
    assert first == first[:2] + block and n % step == 0
    return first[:2] + block * (n // step) + c.flush()[:-4] + (((n % 65521) << 16) | 1).to_bytes(4, "big")


def zstd_zeros(n: int) -> bytes:
    import zstandard

    c = zstandard.ZstdCompressor(level=1).compressobj(size=n)
    return b"".join([c.compress(bytes(64 * MB)) for _ in range(n // (64 * MB))] + [c.flush()])


def honest_2gib(world, codec: str) -> bytes:
    """A blob whose tensor table really lists 2 GiB (one uint8 tensor) and whose payload really decodes to
    2 GiB with the declared sha256s: only its size is wrong for a 16 MB artifact."""
    _, base, _ = split(world["blobs"]["single"])
    payload = zlib_zeros(GIB2) if codec == "zlib" else zstd_zeros(GIB2)
    header = {**base, "codec": codec,
              "payload": {"raw_bytes": GIB2, "raw_sha256": SHA256_OF_2GIB_ZEROS},
              "tensors": [{"name": "w", "dtype": "uint8", "shape": [GIB2], "offset": 0, "nbytes": GIB2}],
              "schema": {"w": {"encoding": "raw", "parts": {"value": "w"}, "shape": [GIB2], "dtype": "uint8"}}}
    set_payload(header, payload)
    return assemble(blob.VERSION, header, payload)


def bomb(world, model: ModelConfig, expands_to: int) -> tuple[bytes, int]:
    """(blob, declared raw bytes): a header that fits `model` exactly (float32 tensors, the world's data
    identity), so ttt-eval gets as far as decoding, over a zlib payload of `expands_to` zero bytes."""
    _, base, _ = split(world["blobs"]["single"])
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in GPT(model).state_dict().items()}
    table, schema, at = [], {}, 0
    for name, shape in shapes.items():
        table.append({"name": name, "dtype": "float32", "shape": shape, "offset": at, "nbytes": 4 * math.prod(shape)})
        schema[name] = {"encoding": "float", "parts": {"value": name}, "shape": shape, "dtype": "float32"}
        at += table[-1]["nbytes"]
    payload = zlib_zeros(expands_to)
    header = {**base, "model_config": asdict(model), "schema": schema, "tensors": table,
              "payload": {"raw_bytes": at, "raw_sha256": "0" * 64}}
    set_payload(header, payload)
    return assemble(blob.VERSION, header, payload), at


# ---------------------------------------------------------------------------------------------------
# the three readers: read_blob (+ model config, dequantize), ttt-eval, verify's checks

def blob_path_outcome(path: Path) -> str | None:
    """None, or the PgolfError of reading the blob, building its model config and dequantizing it."""
    try:
        header, tensors = blob.read_blob(path, LIMIT)
        blob_model.model_config(header, path)
        dequantize(tensors, header["schema"], str(path))
    except PgolfError as exc:
        return str(exc)
    return None


def ttt_eval_outcome(world, path: Path) -> str | None:
    try:
        ttt_eval.run(path, world["data"], EVAL, world["tmp"] / "fuzz_metrics.json")
    except PgolfError as exc:
        return str(exc)
    return None


def verify_outcome(world, path: Path) -> tuple[str, str] | None:
    """The first of verify's header / payload hash / decode checks that FAILs (name, detail), or None. The
    registered check functions themselves, so an exception that is not a PgolfError fails the test."""
    ctx = checks.Context(path, world["data"], blob.read_capped(path, LIMIT), checks.PGOLF, {}, world["data"] / "m.json",
                         VerifyConfig(), EVAL, None)
    for spec in checks.CHECKS:
        if checks.PGOLF in spec.formats and spec.name in ("header", "payload hash", "decode"):
            try:
                spec.run(ctx)
            except PgolfError as exc:
                return spec.name, str(exc)
    return None


def refusal(world, path: Path, row: str = "header") -> str:
    """The one message read_blob, ttt-eval and verify (as a FAIL of its `row` check) all give for `path`."""
    msg = blob_path_outcome(path)
    assert msg is not None
    assert ttt_eval_outcome(world, path) == msg
    assert verify_outcome(world, path) == (row, msg)
    return msg


def write(world, name: str, data: bytes) -> Path:
    path = world["tmp"] / name
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------------
# each named case

def with_header_text(world, name: str, edit) -> Path:
    version, header, payload = split(world["blobs"]["single"])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"))
    return write(world, name, assemble(version, edit(text), payload))


def test_deep_json_header(world):
    path = with_header_text(world, "deep.pgolf", lambda t: t[:-1] + ',"x":' + "[" * 200_000 + "]" * 200_000 + "}")
    msg = refusal(world, path)
    assert msg.startswith(f"{path}: header: JSON nested 200,001 levels deep, more than the 32 allowed; the blob is corrupt")


def test_ten_thousand_digit_integer(world):
    path = with_header_text(world, "bigint.pgolf", lambda t: t[:-1] + ',"x":' + "9" * 10_000 + "}")
    msg = refusal(world, path)
    assert msg.startswith(f"{path}: header: a 10,000-character number 99999999999999999999…, longer than the 32 allowed")


def mutated(world, name: str, mutate, which: str = "single") -> Path:
    version, header, payload = split(world["blobs"][which])
    mutate(header)
    return write(world, name, assemble(version, header, payload))


def test_missing_schema(world):
    path = mutated(world, "noschema.pgolf", lambda h: h.pop("schema"))
    assert refusal(world, path).startswith(f"{path}: header field schema is missing or empty")


def test_unknown_model_config_key(world):
    path = mutated(world, "unknown_key.pgolf", lambda h: h["model_config"].update(bogus=1))
    assert refusal(world, path).startswith(f"{path}: header field model_config: unknown key bogus; known: activation,")


def test_retired_model_config_key_loads_only_when_off(world):
    """A blob written while model.fused_mlp existed (removed: it measured slower) still loads with it off; on, it
    names a model pgolf cannot build, and is refused like any unknown key."""
    path = mutated(world, "retired_off.pgolf", lambda h: h["model_config"].update(fused_mlp=False))
    assert blob_path_outcome(path) is None
    path = mutated(world, "retired_on.pgolf", lambda h: h["model_config"].update(fused_mlp=True))
    assert refusal(world, path).startswith(f"{path}: header field model_config: unknown key fused_mlp; known:")


def test_model_config_that_does_not_fit_the_schema(world):
    """A config whose model does not have the schema's tensors (wider, or absurdly deep) is refused before
    the payload is decoded or any model is allocated."""
    path = mutated(world, "wide.pgolf", lambda h: h["model_config"].update(model_dim=8192, num_heads=64))
    msg = refusal(world, path, row="decode")
    assert "the schema's tensors do not fit header field model_config" in msg and "wrong shape" in msg
    path = mutated(world, "deep_model.pgolf", lambda h: h["model_config"].update(num_layers=10 ** 31))
    assert f"runs {10 ** 31:,} layers (loops included) but the schema stores only" in refusal(world, path, row="decode")


def test_bomb_refused_while_streaming(world):
    """A payload that decodes past its declared size stops there: single stream and one chunk alike."""
    version, header, _ = split(world["blobs"]["single"])
    payload = zlib_zeros(1 << 30)  # 1 GiB of zeros in ~1 MB; the header declares the real blob's size
    set_payload(header, payload)
    path = write(world, "bomb.pgolf", assemble(version, header, payload))
    msg = refusal(world, path, row="decode")
    assert msg == f"{path}: payload does not decode: zlib data expands beyond {header['payload']['raw_bytes']:,} bytes; " \
                  "refusing (decompression bomb or corrupt size)"

    version, header, payload = split(world["blobs"]["chunked"])
    chunks = header["payload"]["chunks"]
    first = zlib_zeros(64 * MB)
    payload = first + payload[chunks[0][1]:]
    chunks[0] = [chunks[0][0], len(first)]
    set_payload(header, payload)
    path = write(world, "bomb_chunk.pgolf", assemble(version, header, payload))
    assert blob_path_outcome(path) == f"{path}: payload does not decode (chunk 0): zlib data expands beyond " \
                                      f"{chunks[0][0]:,} bytes; refusing (decompression bomb or corrupt size)"


def test_too_big_file_refused_before_reading(world):
    """A 1.9 GB file (sparse: no disk used) is refused by its size, without reading it."""
    path = world["tmp"] / "huge.pgolf"
    with open(path, "wb") as f:
        f.write(world["blobs"]["single"].read_bytes())
        f.truncate(1_900_000_000)
    want = f"{path}: 1,900,000,000 bytes, more than 4× the 16,000,000-byte limit; not read"
    tracemalloc.start()
    try:
        with pytest.raises(PgolfError, match="not read") as exc:
            blob.read_blob(path, LIMIT)
        assert tracemalloc.get_traced_memory()[1] < MB  # the old reader held all 1.9 GB
    finally:
        tracemalloc.stop()
    assert str(exc.value).startswith(want)
    assert ttt_eval_outcome(world, path).startswith(want)
    with pytest.raises(PgolfError) as exc:
        verify.run(path, world["data"], VerifyConfig(), EVAL, {}, None, None, "auto", world["tmp"] / "v.json")
    assert str(exc.value).startswith(want)


@pytest.mark.parametrize("name", ["zlib", "zstd", "brotli", "lzma"])  # ans: tests/test_container.py
def test_streaming_decode_is_bounded(name):
    """Each codec decodes into the caller's buffer a step at a time: a bomb is refused the moment its output
    would pass the buffer, holding a few steps at most; short and trailing input are refused too."""
    import brotli
    import lzma
    import zstandard

    zeros = bytes(64 * MB)
    fast = {"zlib": lambda d: zlib.compress(d, 1), "brotli": lambda d: brotli.compress(d, quality=1),
            "lzma": lambda d: lzma.compress(d, preset=0), "zstd": lambda d: zstandard.ZstdCompressor(level=1).compress(d)}
    packed = fast[name](zeros)
    out = bytearray(MB)
    tracemalloc.start()
    try:
        with pytest.raises(PgolfError, match=f"{name} data (expands beyond 1,048,576 bytes|declares 67,108,864 bytes, "
                                             "beyond the 1,048,576 allowed)"):
            codecs.decompress_into(name, packed, memoryview(out))
        assert tracemalloc.get_traced_memory()[1] < 4 * codecs.STEP  # not the 64 MiB it would expand to
    finally:
        tracemalloc.stop()
    small = codecs.compress(name, zeros[:MB])
    codecs.decompress_into(name, small, memoryview(out))
    with pytest.raises(PgolfError, match=f"{name} data decodes to 1,048,576 bytes, 1,048,577 declared"):
        codecs.decompress_into(name, small, memoryview(bytearray(MB + 1)))
    with pytest.raises(PgolfError, match=name):
        codecs.decompress_into(name, small + b"junk", memoryview(out))
    with pytest.raises(PgolfError, match=name):
        codecs.decompress_into(name, small[:-3], memoryview(out))
    if name == "zstd":  # pgolf's frames declare their size; one that does not is refused, not trusted
        with pytest.raises(PgolfError, match="without a declared content size"):
            codecs.decompress_into(name, zstandard.ZstdCompressor(write_content_size=False).compress(zeros[:MB]),
                                   memoryview(out))


def test_safetensors_metadata_is_parsed_within_bounds(tmp_path):
    """pgolf metadata in a safetensors file goes through the same bounded JSON parser as a blob header."""
    from safetensors.torch import save_file

    from pgolf.formats.files import read_meta

    for name, meta, message in [("deep", "[" * 100_000 + "]" * 100_000, "JSON nested 100,000 levels deep"),
                                ("bigint", '{"kind": "checkpoint", "x": ' + "7" * 10_000 + "}", "a 10,000-character number"),
                                ("version", '{"kind": "checkpoint", "format_version": "one"}', "not a number")]:
        path = tmp_path / f"{name}.safetensors"
        save_file({"w": torch.zeros(2)}, str(path), metadata={"pgolf": meta})
        with pytest.raises(PgolfError, match=f"{path}: .*{message}.*re-run the stage that writes the checkpoint"):
            read_meta(path, "checkpoint")


# ---------------------------------------------------------------------------------------------------
# memory: peak RSS of the real commands

# Runs `pgolf ARGS` for each ARGS in turn, in one process, writing a JSON line per run: exit status, stderr
# and the process's peak RSS so far. Cheap cases go first: an increase of the peak is what a case cost.
WORKER = r"""
import contextlib, io, json, resource, sys
from pgolf.cli import app
with open(sys.argv[2], "w") as out:
    for args in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                app(args=args, prog_name="pgolf")
                code = 0
            except SystemExit as exc:
                code = exc.code
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.write(json.dumps({"code": code, "err": err.getvalue(), "peak": peak}) + "\n")
"""
# A child's peak RSS starts at its parent's (fork and vfork share the parent's pages until exec), and pytest
# is large: the worker is started by a small launcher so that its peak is its own.
LAUNCHER = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
SHA256_OF_2GIB_ZEROS = "a7c744c13cc101ed66c29f672f92455547889cc586ce6d44fe76ae824958ea51"  # hashlib, once


def start_commands(runs: list[list], out: Path) -> subprocess.Popen:
    args = json.dumps([[str(a) for a in run] for run in runs])
    return subprocess.Popen([sys.executable, "-c", LAUNCHER, sys.executable, "-c", WORKER, args, str(out)],
                            stdout=subprocess.DEVNULL)


def results(p: subprocess.Popen, out: Path) -> list[dict]:
    assert p.wait(timeout=300) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_peak_memory_of_refusals(world):
    """Refusing costs at most one buffer of the declared size, never gigabytes: 2 GiB honest declarations are
    refused before anything is allocated (ttt-eval and verify), a bomb with its declared size, while streaming."""
    tmp, data = world["tmp"], world["data"]
    model = ModelConfig(vocab_size=300, num_layers=4, model_dim=1024, num_heads=8, num_kv_heads=4)
    bomb_blob, declared = bomb(world, model, expands_to=256 * MB)
    version, header, payload = split(world["blobs"]["single"])
    header["model_config"]["model_dim"] = 128  # refused by the model check, after its imports, before decoding
    files = {"tiny": b"not a blob", "zstd": honest_2gib(world, "zstd"), "zlib": honest_2gib(world, "zlib"),
             "bomb": bomb_blob, "misfit": assemble(version, header, payload)}
    for name, content in files.items():
        (tmp / f"{name}.pgolf").write_bytes(content)
    assert len(files["zstd"]) < 100_000 and len(files["zlib"]) < 2_200_000
    assert 100 * MB < declared <= blob.max_raw_bytes(LIMIT)  # within the cap: the bomb is caught while decoding

    def ttt(name):
        return ["ttt-eval", tmp / f"{name}.pgolf", "--data", data, "--params", tmp / "none.yaml", "--metrics",
                tmp / f"m_{name}.json"]

    def ver(name):
        return ["verify", tmp / f"{name}.pgolf", "--data", data, "--params", tmp / "none.yaml", "--report",
                tmp / f"r_{name}.json", "--set", "device=cpu"]

    t0 = time.perf_counter()
    # Two workers side by side (verify's size check compresses the code, which would hide ttt-eval's peaks).
    p_ttt = start_commands([ttt("tiny"), ttt("zstd"), ttt("zlib"), ttt("misfit"), ttt("bomb")], tmp / "ttt.jsonl")
    p_ver = start_commands([ver("tiny"), ver("zlib")], tmp / "verify.jsonl")
    tiny, zstd, zlib_, misfit, bomb_ = results(p_ttt, tmp / "ttt.jsonl")
    verify_tiny, verify_zlib = results(p_ver, tmp / "verify.jsonl")
    print(f"peak RSS (MiB): ttt-eval baseline {tiny['peak'] / MB:.0f}, 2 GiB zstd +{(zstd['peak'] - tiny['peak']) / MB:.0f}, "
          f"2 GiB zlib +{(zlib_['peak'] - tiny['peak']) / MB:.0f}, misfit +{(misfit['peak'] - tiny['peak']) / MB:.0f}, "
          f"bomb declaring {declared / MB:.0f} +{(bomb_['peak'] - tiny['peak']) / MB:.0f}; verify baseline "
          f"{verify_tiny['peak'] / MB:.0f}, 2 GiB zlib +{(verify_zlib['peak'] - verify_tiny['peak']) / MB:.0f}; "
          f"{time.perf_counter() - t0:.1f} s")

    cap = f"exceeds the {blob.max_raw_bytes(LIMIT):,}-byte cap ({blob.MAX_EXPANSION}× the {LIMIT:,}-byte limit); " \
          "refusing before decoding"
    assert tiny["code"] == 2 and "shorter than the 48-byte blob prefix" in tiny["err"], tiny
    for case in (zstd, zlib_):
        assert case["code"] == 2 and "declared raw payload 2,147,483,648 bytes" in case["err"] and cap in case["err"], case
    assert zlib_["peak"] - tiny["peak"] < 64 * MB  # nothing allocated (the old reader reached ~6.5 GB)
    assert verify_zlib["code"] == 1 and "FAILED (header" in verify_zlib["err"], verify_zlib
    report = Path(re.search(r"report in (\S+)", verify_zlib["err"]).group(1))
    header_row = next(c for c in read_json(report)["checks"] if c["name"] == "header")
    assert header_row["status"] == "FAIL" and cap in header_row["detail"]
    assert verify_zlib["peak"] - verify_tiny["peak"] < 64 * MB
    assert misfit["code"] == 2 and "do not fit header field model_config" in misfit["err"], misfit
    assert bomb_["code"] == 2 and "expands beyond" in bomb_["err"], bomb_
    # One buffer of the declared size and one decoding step, beyond what the model check costs (its imports)
    assert bomb_["peak"] - misfit["peak"] < 1.05 * declared + 32 * MB
    assert bomb_["peak"] - tiny["peak"] < min(10 * declared, 1 << 30)


# ---------------------------------------------------------------------------------------------------
# the fuzz: two hundred seeded mutations of a real blob

HUGE_INT, DEEP = "@@huge-int@@", "@@deep@@"  # stand-ins, replaced in the JSON text
POOL = [None, True, False, 0, 1, -1, 3, 2 ** 31, 2 ** 63, 10 ** 31, -(10 ** 31), 0.5, -1e308, 1e-300, "", "x", "zlib",
        "float32", "int8", "int_per_row", "codes", "blocks.0.attn.c_q.weight", "a/b", "../x", "é" * 300, "\u0000",
        [], [0], [1, 2], [[1, 2]], ["x"], {}, {"a": 1}, {"raw_bytes": 1}, HUGE_INT, DEEP]


def nodes(obj, path=()) -> list[tuple]:
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    out = []
    for key, value in items:
        out.append(path + (key,))
        out.extend(nodes(value, path + (key,)))
    return out


def get(obj, path):
    for key in path:
        obj = obj[key]
    return obj


def pick(rng: random.Random, header: dict, want=lambda v: True) -> tuple | None:
    """A random node: a top-level field first (each equally likely), then a node inside it."""
    for _ in range(20):
        top = rng.choice(sorted(header))
        paths = [p for p in [(top,)] + nodes(header[top], (top,)) if want(get(header, p))]
        if paths:
            return rng.choice(paths)
    return None


def mutate_header(rng: random.Random, header: dict) -> str:
    """Change the header in place; returns what was done (a header-text edit is returned as 'text:…')."""
    kind = rng.choice(["replace", "replace", "delete", "int", "retype", "swap", "add", "rename", "encoding", "dtype",
                       "duplicate key"])
    if kind == "duplicate key":
        return "text:duplicate"
    if kind == "rename":
        rows, schema = header["tensors"], header["schema"]
        target = rng.choice(["table", "schema key", "part"])
        new = rng.choice([rows[rng.randrange(len(rows))]["name"], "", "x" * 300, "tab\tname", "blocks.0.attn.c_q.weight"])
        if target == "table":
            rng.choice(rows)["name"] = new
        elif target == "schema key":
            schema[new] = schema.pop(rng.choice(sorted(schema)))
        else:
            parts = schema[rng.choice(sorted(schema))]["parts"]
            parts[rng.choice(sorted(parts))] = new
        return f"rename {target} -> {new[:20]!r}"
    if kind == "encoding":
        entry = header["schema"][rng.choice(sorted(header["schema"]))]
        entry["encoding"] = rng.choice(list(ENCODINGS) + ["int_per_col", "pickle"])
        return f"encoding -> {entry['encoding']}"
    if kind == "dtype":
        entry = rng.choice(header["tensors"] + list(header["schema"].values()))
        entry["dtype"] = rng.choice(list(DTYPES) + ["object", "float8"])
        return f"dtype -> {entry['dtype']}"
    path = pick(rng, header, (lambda v: isinstance(v, int) and not isinstance(v, bool)) if kind == "int" else
                (lambda v: isinstance(v, dict)) if kind == "add" else (lambda v: True))
    if path is None:
        return "nothing"
    parent, key, value = get(header, path[:-1]), path[-1], get(header, path)
    if kind == "replace":
        parent[key] = rng.choice(POOL)
    elif kind == "delete":
        del parent[key]
    elif kind == "int":
        parent[key] = rng.choice([value + 1, value - 1, 2 * value, value // 2, -value, value + 2 ** 40, 0])
    elif kind == "retype":
        parent[key] = rng.choice([str(value), [value], {"v": value}])
    elif kind == "swap":
        other = pick(rng, header, lambda v: type(v) is type(value))
        if other is not None and other[:len(path)] != path and path[:len(other)] != other:
            get(header, other[:-1])[other[-1]], parent[key] = value, get(header, other)
    elif kind == "add":
        value[rng.choice(["bogus", "raw_bytes", "encoding", "shape", "x" * 300])] = rng.choice(POOL)
    return f"{kind} {'.'.join(map(str, path))[:80]}"


def mutate_payload(rng: random.Random, version: int, header: dict, payload: bytes) -> tuple[int, bytes, str]:
    """Damage the payload; the header's payload hashes and sizes follow, so the damage reaches the decoder."""
    kind = rng.choice(["flip", "truncate", "append", "raw", "raw", "resize"])
    meta = header["payload"]
    if kind == "flip":
        data = bytearray(payload)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        payload = bytes(data)
    elif kind in ("truncate", "append"):
        k = rng.randint(1, 64)
        payload = payload[:-k] if kind == "truncate" else payload + os.urandom(k)
        if "chunks" in meta:
            meta["chunks"][-1][1] += -k if kind == "truncate" else k
    else:  # re-encode other raw bytes: damaged tensor values (raw) or a payload of another size (resize)
        if "chunks" in meta:
            at, pieces = 0, []
            for raw_len, comp_len in meta.pop("chunks"):
                pieces.append(codecs.decompress(header["codec"], payload[at:at + comp_len], raw_len))
                at += comp_len
            raw, version = b"".join(pieces), blob.VERSION
        else:
            raw = codecs.decompress(header["codec"], payload, meta["raw_bytes"])
        data = bytearray(raw)
        if kind == "raw":
            start = rng.randrange(len(data))
            data[start:start + rng.randint(1, 16)] = rng.choice([b"\xff", b"\x00", b"\x7f\x80", os.urandom(1)]) * 16
            data = data[:len(raw)]
            meta["raw_sha256"] = sha256_bytes(bytes(data))
        else:
            data = data[:-rng.randint(1, 99)] if rng.random() < 0.5 else data + os.urandom(rng.randint(1, 99))
        payload = codecs.compress(header["codec"], bytes(data))
    set_payload(header, payload)
    return version, payload, f"payload {kind}"


def build_text(header: dict, edit: str) -> str:
    text = json.dumps(header, sort_keys=True, separators=(",", ":"))
    text = text.replace(json.dumps(HUGE_INT), "9" * 10_000).replace(json.dumps(DEEP), "[" * 5000 + "]" * 5000)
    if edit == "text:duplicate":
        text = '{"codec":"zlib",' + text[1:]
    return text


def test_fuzzed_blobs_end_in_pgolf_error_or_success(world):
    """Every mutated blob is read (read_blob + model config + dequantize), opened by ttt-eval and checked by
    verify: each ends in success or one PgolfError, never another exception, and the readers agree."""
    rng = random.Random(20260)
    originals = {name: split(path) for name, path in world["blobs"].items()}
    counts, kinds = {"refused": 0, "read": 0, "scored": 0}, collections.Counter()
    t0 = time.perf_counter()
    for case in range(200):
        which = rng.choice(sorted(originals))
        version, header, payload = copy.deepcopy(originals[which])
        done = []
        if rng.random() < 0.3:  # first, while the header still describes the payload
            version, payload, what = mutate_payload(rng, version, header, payload)
            done.append(what)
        for _ in range(rng.choice([0, 1, 1, 1, 2, 3]) if done else rng.choice([1, 1, 2, 3])):
            done.append(mutate_header(rng, header))
        text = build_text(header, next((d for d in done if d.startswith("text:")), ""))
        path = write(world, "fuzz.pgolf", assemble(version, text, payload))
        what = f"case {case} ({which}: {'; '.join(done)})"
        try:
            read_msg = blob_path_outcome(path)
            verify_fail = verify_outcome(world, path)
            # ttt-eval on every refused blob; on a few read ones too (those it scores, which takes a while)
            ran = verify_fail is not None or counts["scored"] < 5
            ttt_msg = ttt_eval_outcome(world, path) if ran else None
        except Exception as exc:  # noqa: BLE001 — the point: anything but a PgolfError is a bug
            pytest.fail(f"{what}: {type(exc).__name__}: {exc}")
        assert "header sha256 mismatch" not in str(read_msg), what  # every mutation reached the parser
        assert (read_msg is None) == (verify_fail is None), (what, read_msg, verify_fail)
        if verify_fail is not None:
            counts["refused"] += 1
            assert ttt_msg == verify_fail[1], (what, ttt_msg, verify_fail)  # the same clean error
            kinds[re.sub(r"[0-9,]+|'[^']*'", "#", ttt_msg.split(": ", 1)[1])[:60]] += 1
        else:
            counts["read"] += 1
            if ran:  # scored, or refused for its data (a tokenizer or vocabulary the data does not have)
                counts["scored"] += ttt_msg is None
                assert ttt_msg is None or "mismatch" in ttt_msg, (what, ttt_msg)
    print(counts, f"{time.perf_counter() - t0:.1f} s", *sorted(kinds.items(), key=lambda kv: -kv[1]), sep="\n")
    assert counts["refused"] > 100 and counts["read"] > 10, counts
