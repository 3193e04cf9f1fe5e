"""Shard format: round trip and clear rejection of damaged or foreign files."""

from __future__ import annotations

import numpy as np
import pytest

from pgolf.errors import PgolfError
from pgolf.formats.shards import HEADER_BYTES, MAGIC, load_split, load_val, read_header, read_shard, shard_name, write_shard


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1 << 16, size=n, dtype=np.uint16)


def test_round_trip(tmp_path):
    tokens = _tokens(1000)
    path = tmp_path / shard_name("train", 0)
    write_shard(path, tokens)
    assert path.stat().st_size == HEADER_BYTES + 2 * tokens.size
    header = np.fromfile(path, dtype="<i4", count=256)
    assert list(header[:3]) == [MAGIC, 1, 1000] and not header[3:].any()
    assert read_header(path) == 1000
    np.testing.assert_array_equal(read_shard(path), tokens)
    # little-endian uint16 payload, byte for byte
    assert path.read_bytes()[HEADER_BYTES:] == tokens.astype("<u2").tobytes()


def test_empty_shard_and_split_concatenation(tmp_path):
    write_shard(tmp_path / shard_name("val", 0), np.zeros(0, dtype=np.uint16))
    assert read_header(tmp_path / shard_name("val", 0)) == 0
    a, b = _tokens(10, 1), _tokens(7, 2)
    write_shard(tmp_path / shard_name("train", 0), a)
    write_shard(tmp_path / shard_name("train", 1), b)
    np.testing.assert_array_equal(load_split(tmp_path, "train"), np.concatenate([a, b]))


def test_val_loader_excludes_sidecar_and_checks_alignment(tmp_path):
    tokens, counts = _tokens(50, 3), _tokens(50, 4)
    write_shard(tmp_path / shard_name("val", 0), tokens)
    write_shard(tmp_path / shard_name("val_bytes", 0), counts)
    got_tokens, got_counts = load_val(tmp_path)
    np.testing.assert_array_equal(got_tokens, tokens)
    np.testing.assert_array_equal(got_counts, counts)
    write_shard(tmp_path / shard_name("val_bytes", 0), counts[:-1])
    with pytest.raises(PgolfError, match="sidecar"):
        load_val(tmp_path)


def test_write_rejects_ids_outside_uint16(tmp_path):
    with pytest.raises(PgolfError, match="uint16"):
        write_shard(tmp_path / "x.bin", np.array([0, 1 << 16], dtype=np.int64))
    assert not list(tmp_path.iterdir())  # nothing half-written


def _damaged(tmp_path, how: str):
    path = tmp_path / shard_name("train", 0)
    write_shard(path, _tokens(100))
    data = bytearray(path.read_bytes())
    if how == "magic":
        data[0:4] = np.array([12345], dtype="<i4").tobytes()
    elif how == "version":
        data[4:8] = np.array([2], dtype="<i4").tobytes()
    elif how == "truncated":
        data = data[:-3]
    elif how == "header_short":
        data = data[:500]
    elif how == "count":
        data[8:12] = np.array([101], dtype="<i4").tobytes()
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how, message", [
    ("magic", "bad magic"),
    ("version", "unsupported shard version"),
    ("truncated", "truncated"),
    ("header_short", "shorter than the 1024-byte shard header"),
    ("count", "header says 101 tokens"),
])
def test_damaged_shards_are_rejected_naming_the_file(tmp_path, how, message):
    path = _damaged(tmp_path, how)
    for reader in (read_header, read_shard):
        with pytest.raises(PgolfError, match=message) as err:
            reader(path)
        assert str(path) in str(err.value)


def test_missing_shard_is_a_clear_error(tmp_path):
    with pytest.raises(PgolfError, match="not found"):
        read_header(tmp_path / "nope.bin")
    with pytest.raises(PgolfError, match="no fineweb_train_"):
        load_split(tmp_path, "train")
