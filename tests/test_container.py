"""The per-group container (blob format 3) and the `ans` entropy coder: bit-exact round trips for every
codec and layout, the coder's size against its model's cross-entropy, and corrupt, truncated or lying
inputs refused with one clear error."""

from __future__ import annotations

import json
import shutil
import zlib

import numpy as np
import pytest
import torch

from pgolf.config.sections import QuantizeConfig
from pgolf.errors import PgolfError
from pgolf.formats import ans, codecs
from pgolf.formats.blob import MAGIC, PREFIX, VERSION_STREAMS, check_payload, decode_payload, parse_blob
from pgolf.formats.blob_writer import build_blob, nearest_neighbour_order, plan_streams
from pgolf.formats.files import sha256_bytes
from pgolf.quant.recipe import quantize_state_dict

FIELDS: list[dict] = []  # the module's header fields, set by the autouse fixture below


@pytest.fixture(autouse=True, scope="module")
def _fields(fields):
    FIELDS[:] = [fields]

LIMIT = 10_000_000
CODECS = [c for c in codecs.CODECS if c != "lrzip" or shutil.which("lrzip")]  # lrzip: a Debian program


def laplace_codes(shape, scale, gen):
    return (torch.distributions.Laplace(0.0, scale).sample(shape).round().clamp(-31, 31)).to(torch.int8)


@pytest.fixture(scope="module")
def stored() -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, schema) as quantize stores them: int6 codes of two roles in layers 0, 1 and 10 (layer order
    is numeric) and of the embedding, fp16 scales, int8 LQER factors, fp32 control tensors; plus a bool and
    an empty tensor."""
    gen = torch.Generator().manual_seed(0)
    sd = {"tok_emb.weight": torch.randn(64, 16, generator=gen) * 0.02,
          "blocks.0.attn_scale": torch.rand(16, generator=gen)}
    for layer in (0, 1, 10):
        sd[f"blocks.{layer}.attn.c_q.weight"] = torch.randn(24, 16, generator=gen) * 0.02
        sd[f"blocks.{layer}.mlp.fc.weight"] = torch.randn(40, 16, generator=gen) * 0.02
    tensors, schema, _ = quantize_state_dict(sd, QuantizeConfig(bits=6, keep_float_max_numel=16, lqer_top_k=1))
    tensors.update({"odd.bool": torch.tensor([True, False, True]), "odd.empty": torch.zeros(0, 3)})
    return tensors, schema


@pytest.fixture(scope="module")
def tensors(stored) -> dict[str, torch.Tensor]:
    return stored[0]


@pytest.fixture(scope="module")
def fields(stored) -> dict:
    return {"model_config": {"vocab_size": 64}, "schema": stored[1], "tokenizer_sha256": "ab" * 32,
            "val_shards": {"fineweb_val_000000.bin": "cd" * 32}}


def roundtrip(tensors, codec, container="pergroup", sort_rows="never"):
    blob, header, _ = build_blob(tensors, FIELDS[0], codec, 0, container, sort_rows)
    parsed, payload = parse_blob(blob, "test.pgolf", LIMIT)
    check_payload(parsed, payload, "test.pgolf")
    return blob, parsed, decode_payload(parsed, payload, "test.pgolf")


@pytest.mark.parametrize("codec", CODECS + ["auto"])
@pytest.mark.parametrize("layout", ["single", "pergroup-never", "pergroup-always", "pergroup-auto"])
def test_every_codec_and_layout_round_trips_bit_exact(tensors, codec, layout):
    container, sort_rows = (layout.split("-") + ["never"])[:2]
    blob, header, out = roundtrip(tensors, codec, container, sort_rows)
    assert set(out) == set(tensors)
    for name, t in tensors.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape and torch.equal(out[name], t), name
    if container == "pergroup":
        assert PREFIX.unpack_from(blob)[1] == VERSION_STREAMS and header["codec"] == "pergroup"
        names = [s["name"] for s in header["payload"]["streams"]]
        # codes by role across layers, every other part by dtype; permutations only when rows are sorted
        assert {"blocks.*.attn.c_q.weight#codes", "blocks.*.mlp.fc.weight#codes", "tok_emb.weight#codes",
                "float16", "float32", "int8", "bool"} <= set(names)
        perms = [n for n in names if n.endswith("#perm")]
        # ans codes gain nothing from sorting: it is never tried with ans alone
        assert bool(perms) == (sort_rows == "always" and codec != "ans") or sort_rows == "auto"
        if sort_rows == "always" and codec != "ans":
            assert sorted(perms) == sorted(n + "#perm" for n in names if n.endswith("#codes"))
        assert any(n.endswith("#lqer_a") for s in header["payload"]["streams"] for n, _ in s["items"])
        if codec != "auto":
            assert {s["codec"] for s in header["payload"]["streams"]} == {codec}


def test_streams_hold_layers_in_numeric_order_column_major(tensors):
    _, header, _ = roundtrip(tensors, "zlib")
    fc = next(s for s in header["payload"]["streams"] if s["name"] == "blocks.*.mlp.fc.weight#codes")
    assert fc["items"] == [[f"blocks.{i}.mlp.fc.weight#codes", "cols"] for i in (0, 1, 10)]
    assert fc["raw_bytes"] == 3 * 40 * 16
    scales = next(s for s in header["payload"]["streams"] if s["name"] == "float16")
    assert {layout for _, layout in scales["items"]} == {"shuffle"}


def test_nearest_neighbour_order_chains_closest_rows():
    rows = np.array([[0, 0], [9, 9], [1, 0], [8, 9], [2, 1]], dtype=np.int8)
    assert nearest_neighbour_order(rows).tolist() == [0, 2, 4, 3, 1]


def test_ans_size_is_within_one_percent_of_its_models_cross_entropy():
    gen = torch.Generator().manual_seed(1)
    for scale, n in ((1.0, 200_000), (4.0, 500_000), (12.0, 300_000)):
        data = laplace_codes((n,), scale, gen).numpy().tobytes()
        counts = np.bincount(np.frombuffer(data, dtype=np.uint8), minlength=256)
        p = counts[counts > 0] / n
        cross_entropy = -(counts[counts > 0] * np.log2(p)).sum() / 8  # bytes, under the stored histogram
        table = ans.HEAD.size + 5 * len(p)
        size = len(ans.compress(data))
        assert cross_entropy + table <= size <= 1.01 * cross_entropy + table, (scale, size, cross_entropy)
        assert codecs.decompress("ans", ans.compress(data), n) == data


def test_ans_stores_a_block_of_one_repeated_byte_as_its_table_alone():
    """A tensor whose codes are all one value (a zero-initialised matrix never trained, a constant scale row)
    makes a one-symbol block: no code words, and it decodes, alone or among other blocks."""
    same = bytes([7]) * 10_000
    packed = ans.compress(same)
    assert len(packed) == ans.HEAD.size + 5 and codecs.decompress("ans", packed, len(same)) == same
    mixed = same + bytes(range(200)) * 10
    assert codecs.decompress("ans", ans.compress(mixed, [len(same), 2_000]), len(mixed)) == mixed
    forged = bytearray(packed)
    forged[ans.HEAD.size + 1] = 6  # its table's count now 9,990, not the 10,000 declared
    with pytest.raises(PgolfError, match="ans data is corrupt"):
        codecs.decompress("ans", bytes(forged), len(same))


def test_ans_refuses_truncated_corrupt_and_oversized_data():
    data = bytes(np.random.default_rng(0).integers(0, 9, 50_000, dtype=np.uint8))
    packed = ans.compress(data)
    assert codecs.decompress("ans", ans.compress(b""), 0) == b""
    with pytest.raises(PgolfError, match="beyond the 49,999 still allowed"):
        codecs.decompress("ans", packed, len(data) - 1)
    with pytest.raises(PgolfError, match="ans data"):
        codecs.decompress("ans", packed[:5], len(data))
    for damaged in (packed + b"\0\0\0\1", packed[:-8]):
        with pytest.raises(PgolfError, match="ans data (is truncated|ends inside a block)"):
            codecs.decompress("ans", damaged, len(data))
    flipped = bytearray(packed)
    flipped[-20] ^= 0x10  # a damaged word: decodes to other bytes, without any error from the coder
    with pytest.raises(PgolfError, match="CRC-32"):
        codecs.decompress("ans", bytes(flipped), len(data))
    k = 9
    lying = bytearray(packed)
    lying[ans.HEAD.size + k:ans.HEAD.size + k + 4] = (10**6).to_bytes(4, "little")  # counts no longer sum to n
    with pytest.raises(PgolfError, match="symbol table"):
        codecs.decompress("ans", bytes(lying), len(data))


def rewrite(blob: bytes, edit) -> bytes:
    """The blob with its (format 3) header edited by `edit(header)` and its prefix re-hashed, as a forger would."""
    _, version, length, _ = PREFIX.unpack_from(blob)
    header = json.loads(zlib.decompress(blob[PREFIX.size:PREFIX.size + length]))
    edit(header)
    raw = zlib.compress(json.dumps(header).encode(), 9)
    return PREFIX.pack(MAGIC, version, len(raw), bytes.fromhex(sha256_bytes(raw))) + raw + blob[PREFIX.size + length:]


def test_lying_stream_tables_are_refused_before_decoding(tensors):
    blob, header, _ = roundtrip(tensors, "zlib", sort_rows="always")
    streams = header["payload"]["streams"]
    fc = next(i for i, s in enumerate(streams) if s["name"] == "blocks.*.mlp.fc.weight#codes")

    def raw_lie(h):
        h["payload"]["streams"][fc]["raw_bytes"] += 1

    def dropped(h):
        h["payload"]["streams"][fc]["items"].pop()

    def twice(h):
        items = h["payload"]["streams"][fc]["items"]
        items.append(items[0])

    def no_perm(h):
        h["payload"]["streams"] = [s for s in h["payload"]["streams"] if not s["name"].endswith("#perm")]

    def bad_layout(h):
        h["payload"]["streams"][fc]["items"][0][1] = "transpose"

    def foreign_codec(h):
        h["payload"]["streams"][fc]["codec"] = "gzip"

    for edit, match in ((raw_lie, "raw_bytes.*its items take"), (dropped, "its items take|do not cover"),
                        (twice, "a second time"), (no_perm, "permutations"), (bad_layout, "not a \\[tensor, layout\\]"),
                        (foreign_codec, "known codec")):
        with pytest.raises(PgolfError, match=rf"test.pgolf: header field payload.streams.*{match}"):
            parse_blob(rewrite(blob, edit), "test.pgolf", LIMIT)


def test_a_forged_permutation_is_refused(tensors):
    """A stream whose bytes decode fine but whose permutation repeats a row: caught before it is applied."""
    blob, header, _ = roundtrip(tensors, "zlib", sort_rows="always")
    _, _, length, _ = PREFIX.unpack_from(blob)
    payload = blob[PREFIX.size + length:]
    streams = header["payload"]["streams"]
    k = next(i for i, s in enumerate(streams) if s["name"].endswith("#perm"))
    at = sum(s["compressed_bytes"] for s in streams[:k])
    forged = zlib.compress(bytes(streams[k]["raw_bytes"]), 9)  # every index 0
    new_payload = payload[:at] + forged + payload[at + streams[k]["compressed_bytes"]:]

    def edit(h):
        h["payload"]["streams"][k]["compressed_bytes"] = len(forged)
        h["payload"]["compressed_bytes"] = len(new_payload)
        h["payload"]["sha256"] = sha256_bytes(new_payload)

    forged_blob = rewrite(blob[:PREFIX.size + length], edit) + new_payload
    parsed, p = parse_blob(forged_blob, "test.pgolf", LIMIT)
    check_payload(parsed, p, "test.pgolf")
    with pytest.raises(PgolfError, match="test.pgolf: the row permutation of .* is not a permutation"):
        decode_payload(parsed, p, "test.pgolf")


def test_a_truncated_stream_is_refused(tensors):
    blob, _, _ = roundtrip(tensors, "ans")
    with pytest.raises(PgolfError, match="test.pgolf: payload is .* bytes, header declares"):
        check_payload(*parse_blob(blob[:-3], "test.pgolf", LIMIT), "test.pgolf")


def test_streams_plan_keeps_every_tensor_once(tensors):
    from pgolf.formats.blob_writer import encode_payload, sorted_variant

    _, table = encode_payload(tensors)
    streams = plan_streams(table)
    listed = [name for s in streams for name, _ in s["items"]]
    assert sorted(listed) == sorted(n for n, t in tensors.items() if t.numel())
    assert "odd.empty" not in listed  # no bytes, no item
    rows = {row["name"]: row for row in table}
    for s in streams:  # every code stream has a sorted variant; no other stream has one
        variant = sorted_variant(s, rows)
        assert (variant is not None) == s["name"].endswith("#codes")
        if variant:
            assert [n for n, _ in variant[1]["items"]] == [n for n, _ in s["items"]]


def test_auto_sorting_keeps_whichever_is_smaller():
    """Rows that are noisy copies of a few prototypes, shuffled: sorted, brotli finds the repeats, and `auto`
    pays for the permutation to get them; rows of independent noise are left unsorted."""
    from pgolf.formats.blob_writer import compress_streams, encode_payload

    gen = torch.Generator().manual_seed(4)
    protos = laplace_codes((8, 256), 6.0, gen)
    similar = protos[torch.randint(0, 8, (512,), generator=gen)].clone()
    flip = torch.rand(similar.shape, generator=gen) < 0.02
    similar[flip] = laplace_codes((int(flip.sum()),), 6.0, gen)
    noise = laplace_codes((512, 256), 6.0, gen)
    for codes, want_sorted in ((similar, True), (noise, False)):
        raw, table = encode_payload({"blocks.0.mlp.fc.weight#codes": codes})
        written, payload, _ = compress_streams("auto", "auto", plan_streams(table), raw, table)
        assert any(s["name"].endswith("#perm") for s in written) == want_sorted
        _, plain, _ = compress_streams("auto", "never", plan_streams(table), raw, table)
        assert len(payload) <= len(plain)


def test_ans_gives_tensors_of_different_widths_their_own_histograms():
    """A role's stream can hold a 3-bit layer beside an 8-bit one: a block per item, each under its own
    histogram, comes close to the sum of the items' entropies; one histogram for both does not. Blocks are
    bounded one by one: the second may not pass what the first left of the bound."""
    gen = torch.Generator().manual_seed(2)
    narrow, wide = laplace_codes((300_000,), 0.7, gen), laplace_codes((300_000,), 20.0, gen)
    data = narrow.numpy().tobytes() + wide.numpy().tobytes()

    def entropy(x: bytes) -> float:
        c = np.bincount(np.frombuffer(x, dtype=np.uint8), minlength=256)
        c = c[c > 0]
        return float(-(c * np.log2(c / c.sum())).sum() / 8)

    half = len(data) // 2
    split = ans.compress(data, [half, half])
    whole = ans.compress(data)
    assert len(split) <= 1.01 * (entropy(data[:half]) + entropy(data[half:])) + 1000 < 0.9 * len(whole)
    assert codecs.decompress("ans", split, len(data)) == data
    with pytest.raises(PgolfError, match=f"declares {half:,} more bytes, beyond the {half - 1:,} still allowed"):
        codecs.decompress("ans", split, len(data) - 1)


def test_the_writer_keeps_per_item_ans_blocks_where_smaller():
    """A role's stream with layers at 2 and 8 bits gets a block per tensor; one at a single width keeps one."""
    from pgolf.formats.blob_writer import compress_stream

    gen = torch.Generator().manual_seed(3)
    rows = {f"l{i}": {"name": f"l{i}", "dtype": "int8", "shape": [200, 64], "nbytes": 200 * 64} for i in range(3)}
    stream = {"items": [[name, "cols"] for name in rows]}
    mixed = b"".join(laplace_codes((200, 64), s, gen).numpy().tobytes() for s in (0.5, 40.0, 40.0))
    uniform = b"".join(laplace_codes((200, 64), 3.0, gen).numpy().tobytes() for _ in rows)
    blocks = ans.HEAD.unpack_from(compress_stream("ans", mixed, stream, rows))[1]
    assert blocks == 200 * 64  # the first block holds the first tensor alone
    assert ans.HEAD.unpack_from(compress_stream("ans", uniform, stream, rows))[1] == 3 * 200 * 64
