"""Byte codecs for the packed blob, each pinned to its strongest setting and named in the blob header.

Decoding is bounded: `decompress` stops at `max_size` output bytes, so a hostile blob cannot expand
into gigabytes (a decompression bomb). The codec is always recorded, never inferred from which module
happens to import (early record scripts chose zstd or zlib by whether `import zstandard` succeeded).
"""

from __future__ import annotations

import lzma
import zlib
from typing import Callable

from pgolf.errors import PgolfError


def _zlib_compress(data: bytes) -> bytes:
    return zlib.compress(data, 9)


def _zlib_decompress(data: bytes, max_size: int) -> bytes:
    d = zlib.decompressobj()
    out = d.decompress(data, max_size + 1)
    if len(out) <= max_size and not d.eof:
        raise PgolfError("zlib data is truncated or corrupt")
    return out


def _zstd_compress(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=22).compress(data)


def _zstd_decompress(data: bytes, max_size: int) -> bytes:
    import zstandard

    # Our frames always declare their content size; check it before allocating anything.
    size = zstandard.frame_content_size(data)
    if size < 0:
        raise PgolfError("zstd frame without a declared content size; not written by pgolf")
    if size > max_size:
        raise PgolfError(f"zstd data declares {size:,} bytes, beyond the {max_size:,} allowed; refusing "
                         "(decompression bomb or corrupt size)")
    return zstandard.ZstdDecompressor().decompress(data)


def _brotli_compress(data: bytes) -> bytes:
    import brotli

    return brotli.compress(data, quality=11, lgwin=24)


def _brotli_decompress(data: bytes, max_size: int) -> bytes:
    import brotli

    d = brotli.Decompressor()
    # The output buffer stops growing once it reaches the limit; more than max_size means "too big".
    out = d.process(data, output_buffer_limit=max_size + 1)
    if len(out) <= max_size and not d.is_finished():
        raise PgolfError("brotli data is truncated or corrupt")
    return out


def _lzma_compress(data: bytes) -> bytes:
    return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


def _lzma_decompress(data: bytes, max_size: int) -> bytes:
    d = lzma.LZMADecompressor()
    out = d.decompress(data, max_size + 1)
    if len(out) <= max_size and not d.eof:
        raise PgolfError("lzma data is truncated or corrupt")
    return out


# name -> (compress, decompress capped at max_size + 1 bytes)
CODECS: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes, int], bytes]]] = {
    "zlib": (_zlib_compress, _zlib_decompress),
    "zstd": (_zstd_compress, _zstd_decompress),
    "brotli": (_brotli_compress, _brotli_decompress),
    "lzma": (_lzma_compress, _lzma_decompress),
}
SETTINGS = {"zlib": "level 9", "zstd": "level 22", "brotli": "quality 11, lgwin 24", "lzma": "preset 9|EXTREME"}


# Size estimates for --budget (pgolf.quant.budget), per tensor and option: the codec itself where it is
# fast; brotli at quality 5 (far faster than 11, at a similar size on quantized codes); zlib for lzma
# and auto. Real builds correct the estimate; it only has to rank the options.
ESTIMATORS = {"zlib": "zlib", "zstd": "zstd", "brotli": "brotli-q5", "lzma": "zlib", "auto": "zlib"}


def estimator(name: str) -> str:
    check_name(name, allow_auto=True)
    return ESTIMATORS[name]


def estimate_size(estimator_name: str, data: bytes) -> int:
    if estimator_name == "brotli-q5":
        import brotli

        return len(brotli.compress(data, quality=5, lgwin=24))
    return len(compress(estimator_name, data))


def check_name(name: str, allow_auto: bool = False) -> None:
    known = list(CODECS) + (["auto"] if allow_auto else [])
    if name not in known:
        raise PgolfError(f"unknown codec {name!r}; choose one of {', '.join(known)}")


def compress(name: str, data: bytes) -> bytes:
    check_name(name)
    return CODECS[name][0](data)


def decompress(name: str, data: bytes, max_size: int) -> bytes:
    """Decompress, refusing output beyond `max_size` bytes and truncated or corrupt input."""
    check_name(name)
    try:
        out = CODECS[name][1](data, max_size)
    except PgolfError:
        raise
    except Exception as exc:  # each library has its own error types
        raise PgolfError(f"{name} data is corrupt ({type(exc).__name__}: {exc})") from None
    if len(out) > max_size:
        raise PgolfError(f"{name} data expands beyond {max_size:,} bytes; refusing (decompression bomb or corrupt size)")
    return out


def compress_all(data: bytes, names: list[str] | None = None) -> dict[str, bytes]:
    """Each codec on `data`, in parallel threads (the codec libraries release the GIL while they work)."""
    from concurrent.futures import ThreadPoolExecutor

    names = names or list(CODECS)
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        results = list(pool.map(lambda n: compress(n, data), names))
    return dict(zip(names, results))


def choose(codec: str, data: bytes) -> tuple[str, bytes, dict[str, int]]:
    """(codec used, compressed bytes, sizes per codec tried): `auto` tries them all and keeps the smallest."""
    check_name(codec, allow_auto=True)
    results = compress_all(data) if codec == "auto" else {codec: compress(codec, data)}
    name = min(results, key=lambda n: len(results[n]))
    return name, results[name], {n: len(b) for n, b in results.items()}
