"""`ans`: an entropy coder for quantized weights (range coding, `constriction`, Bamler 2022).

General-purpose compressors model bytes as text-like strings; a stream of quantized codes is close to
independent draws from one small-alphabet distribution that is known when packing. So each stream is
coded under its own order-0 model, the exact byte histogram stored in front of it, and comes within a
few bytes of its empirical entropy (bench/README.md, "Fitting 16 MB"). Byte-shuffled floats are coded
the same way; `pack`'s `auto` keeps whichever codec is smaller per stream.

A stream is one or more blocks, each coded under its own histogram (the container gives each tensor its
own block where that is smaller). A block's layout (little-endian): u8 version, u64 symbol count n, u16 distinct symbols k, u32 word count w, u32
CRC-32 of the decoded bytes, k × u8 symbols (increasing), k × u32 counts (summing to n), then the range
coder's w u32 words. The decoder rebuilds the model from the stored counts, so both sides hand the coder
identical probabilities. Nothing is decoded before n is checked against what the caller's bound still
allows and the block's length against w; a range decoder reads whatever words it is given, so the CRC
catches damage to them.
"""

from __future__ import annotations

import struct
import zlib
from typing import Iterator

import numpy as np

from pgolf.errors import PgolfError

VERSION = 1
HEAD = struct.Struct("<BQHII")


def _model(counts: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(counts / counts.sum(), perfect=False)


def _block(data: bytes) -> bytes:
    import constriction

    symbols = np.frombuffer(data, dtype=np.uint8)
    counts = np.bincount(symbols, minlength=256)
    present = np.flatnonzero(counts)
    words = np.zeros(0, dtype="<u4")
    if len(present) > 1:  # one symbol alone needs no code: the table says it all
        index = np.zeros(256, dtype=np.int32)
        index[present] = np.arange(len(present), dtype=np.int32)
        encoder = constriction.stream.queue.RangeEncoder()
        encoder.encode(index[symbols], _model(counts[present].astype(np.float64)))
        words = encoder.get_compressed().astype("<u4")
    return HEAD.pack(VERSION, len(symbols), len(present), len(words), zlib.crc32(data)) + \
        present.astype(np.uint8).tobytes() + counts[present].astype("<u4").tobytes() + words.tobytes()


def compress(data: bytes, segments: list[int] | None = None) -> bytes:
    """One block under one histogram, or (segments: byte counts summing to len(data)) a block per segment,
    each under its own: a stream holding tensors of different widths needs a model per tensor."""
    if not segments:
        return _block(data)
    assert sum(segments) == len(data), "segments must cover the data"
    starts = np.cumsum([0] + list(segments))
    return b"".join(_block(data[a:b]) for a, b in zip(starts[:-1], starts[1:]) if b > a)


def stream(data: bytes, max_size: int) -> Iterator[bytes]:
    """The blocks' bytes in order; each block's size is checked against what the bound still allows."""
    at, left = 0, max_size
    while True:
        n, block = _block_at(data, at, left)
        yield from _decode(data, at, n)
        at, left = at + block, left - n
        if at == len(data):
            return


def _block_at(data: bytes, at: int, left: int) -> tuple[int, int]:
    """(symbols, bytes) of the block starting at `at`, its header checked against `left` allowed bytes."""
    if len(data) - at < HEAD.size:
        raise PgolfError("ans data is truncated (shorter than a block header)")
    version, n, k, n_words, _ = HEAD.unpack_from(data, at)
    if version != VERSION:
        raise PgolfError(f"ans data has version {version}; this pgolf reads {VERSION}")
    if n > left:
        raise PgolfError(f"ans data declares {n:,} more bytes, beyond the {left:,} still allowed; refusing "
                         "(decompression bomb or corrupt size)")
    size = HEAD.size + 5 * k + 4 * n_words
    if at + size > len(data):
        raise PgolfError(f"ans data ends inside a block ({len(data) - at:,} bytes left, its header declares "
                         f"{size:,}); truncated")
    return n, size


def _decode(data: bytes, at: int, n: int) -> Iterator[bytes]:
    import constriction

    _, _, k, n_words, crc = HEAD.unpack_from(data, at)
    symbols = np.frombuffer(data, dtype=np.uint8, count=k, offset=at + HEAD.size)
    counts = np.frombuffer(data, dtype="<u4", count=k, offset=at + HEAD.size + k).astype(np.float64)
    if (n and not 0 < k <= 256) or np.any(np.diff(symbols.astype(np.int16)) <= 0) or np.any(counts == 0) \
            or counts.sum() != n:
        raise PgolfError("ans data is corrupt (its symbol table is not increasing symbols with counts summing to "
                         "the declared size)")
    if not n:
        return
    if k == 1:  # a block of one repeated byte (e.g. an all-zero tensor) carries no code words
        if n_words:
            raise PgolfError("ans data is corrupt (a block of one symbol with code words)")
        out = symbols.tobytes() * n
    else:
        words = np.frombuffer(data, dtype="<u4", count=n_words, offset=at + HEAD.size + 5 * k).astype(np.uint32)
        out = symbols[constriction.stream.queue.RangeDecoder(words).decode(_model(counts), n)].tobytes()
    if zlib.crc32(out) != crc:
        raise PgolfError("ans data is corrupt (the decoded bytes fail its CRC-32)")
    for start in range(0, n, 1 << 20):
        yield out[start:start + (1 << 20)]
