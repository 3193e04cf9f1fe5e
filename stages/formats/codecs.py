"""Byte codecs for the packed blob, each pinned to its strongest setting and named in the blob header.

Decoding streams: each codec yields its output a step (about STEP bytes) at a time, so decoding holds
a few steps beyond what the caller keeps. `decompress_into` writes the steps into the caller's buffer of
the declared size and refuses the moment output would pass it (a decompression bomb, or a header that
lies about the size); `decompress` collects them up to a cap. Truncated input, trailing bytes after the
stream and corrupt data are refused too, with one PgolfError. The codec is always recorded, never
inferred from which module happens to import (early record scripts chose zstd or zlib by whether
`import zstandard` succeeded).
"""

from __future__ import annotations

import lzma
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path
from typing import Callable, Iterator

from pgolf.errors import PgolfError
from pgolf.formats import ans

STEP = 1 << 20  # output bytes per decoding step


def _truncated(name: str) -> PgolfError:
    return PgolfError(f"{name} data is truncated or corrupt (the stream ends before its end marker)")


def _trailing(name: str) -> PgolfError:
    return PgolfError(f"{name} data has bytes after the end of its stream; corrupt")


def _zlib_compress(data: bytes) -> bytes:
    return zlib.compress(data, 9)


def _zlib_stream(data: bytes, max_size: int) -> Iterator[bytes]:
    d, view, at = zlib.decompressobj(), memoryview(data), 0
    # Input goes in a step at a time: zlib copies what a call leaves unconsumed, so whole-input calls
    # would copy the input over again at every output step.
    while at < len(view) and not d.eof:
        tail, at = view[at:at + STEP], at + STEP
        while tail and not d.eof:
            piece = d.decompress(tail, STEP)
            tail = d.unconsumed_tail
            if piece:
                yield piece
    while not d.eof:  # input spent: drain what the decoder still holds
        piece = d.decompress(b"", STEP)
        if not piece:
            raise _truncated("zlib")
        yield piece
    if d.unused_data or at < len(view):
        raise _trailing("zlib")


def _zstd_compress(data: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdCompressor(level=22).compress(data)


def _zstd_stream(data: bytes, max_size: int) -> Iterator[bytes]:
    import zstandard

    # Our frames always declare their content size, and libzstd refuses to decode past it: checking it
    # first refuses a bomb before any work, and bounds the decoder's output.
    size = zstandard.frame_content_size(data)
    if size < 0:
        raise PgolfError("zstd frame without a declared content size; not written by pgolf")
    if size > max_size:
        raise PgolfError(f"zstd data declares {size:,} bytes, beyond the {max_size:,} allowed; refusing "
                         "(decompression bomb or corrupt size)")
    reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
    produced = 0
    while piece := reader.read(STEP):
        produced += len(piece)
        if produced > size:  # the reader goes on into a following frame
            raise _trailing("zstd")
        yield piece
    if produced != size:  # the reader stops quietly at truncated input: the count tells
        raise PgolfError(f"zstd data decodes to {produced:,} bytes but its frame declares {size:,}; truncated or corrupt")


def _brotli_compress(data: bytes) -> bytes:
    import brotli

    return brotli.compress(data, quality=11, lgwin=24)


def _brotli_stream(data: bytes, max_size: int) -> Iterator[bytes]:
    import brotli

    d = brotli.Decompressor()
    # The output buffer stops growing near the limit; later calls with no input yield the rest.
    piece = d.process(data, output_buffer_limit=STEP)
    while True:
        if piece:
            yield piece
        if d.is_finished():
            break
        if not piece:
            raise _truncated("brotli")
        piece = d.process(b"", output_buffer_limit=STEP)


def _lzma_compress(data: bytes) -> bytes:
    return lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)


def _lzma_stream(data: bytes, max_size: int) -> Iterator[bytes]:
    d, view, at = lzma.LZMADecompressor(), memoryview(data), 0
    while at < len(view) and not d.eof:  # a step of input at a time, as for zlib
        piece, at = d.decompress(view[at:at + STEP], STEP), at + STEP
        while True:
            if piece:
                yield piece
            if d.eof or d.needs_input:
                break
            piece = d.decompress(b"", STEP)
            if not piece and not d.eof and not d.needs_input:  # no progress: never loop on a stuck decoder
                raise _truncated("lzma")
    if not d.eof:
        raise _truncated("lzma")
    if d.unused_data or at < len(view):
        raise _trailing("lzma")


# lrzip (ZPAQ context mixing; the record's per-group codec, PR #1855) is a Debian program, not a Python
# package: offered when its binary is on PATH, never chosen by `auto`, and named in the error when a blob
# that needs it meets a machine without it.
LRZIP_MAGIC = b"LRZI"


def lrzip_binary() -> str:
    found = shutil.which("lrzip")
    if found is None:
        raise PgolfError("this blob (or --codec lrzip) needs the `lrzip` program, which is not on PATH; install it "
                         "(Debian/Ubuntu: apt-get install lrzip) or re-pack with another codec")
    return found


def _lrzip_compress(data: bytes) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "s").write_bytes(data)
        subprocess.run([lrzip_binary(), "-z", "-L", "9", "-q", "-f", str(Path(tmp, "s"))], check=True,
                       capture_output=True)
        return Path(tmp, "s.lrz").read_bytes()


def _lrzip_stream(data: bytes, max_size: int) -> Iterator[bytes]:
    # lrzip's header states the expanded size (bytes 6..14): checked before the program runs.
    if len(data) < 14 or data[:4] != LRZIP_MAGIC:
        raise PgolfError("lrzip data is truncated or corrupt (no LRZI header)")
    size = struct.unpack_from("<Q", data, 6)[0]
    if size > max_size:
        raise PgolfError(f"lrzip data declares {size:,} bytes, beyond the {max_size:,} allowed; refusing")
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "s.lrz").write_bytes(data)
        done = subprocess.run([lrzip_binary(), "-d", "-q", "-f", str(Path(tmp, "s.lrz"))], capture_output=True)
        out = Path(tmp, "s")
        if done.returncode or not out.is_file() or out.stat().st_size != size:
            raise PgolfError("lrzip data is truncated or corrupt (lrzip -d failed or gave another size)")
        yield out.read_bytes()


# name -> (compress, stream: (data, max_size) -> output pieces of about STEP bytes; max_size lets a codec
# that knows its output size refuse before decoding)
CODECS: dict[str, tuple[Callable[[bytes], bytes], Callable[[bytes, int], Iterator[bytes]]]] = {
    "zlib": (_zlib_compress, _zlib_stream),
    "zstd": (_zstd_compress, _zstd_stream),
    "brotli": (_brotli_compress, _brotli_stream),
    "lzma": (_lzma_compress, _lzma_stream),
    "ans": (ans.compress, ans.stream),
    "lrzip": (_lrzip_compress, _lrzip_stream),
}
AUTO = ("zlib", "zstd", "brotli", "lzma", "ans")  # what `auto` tries: every codec that needs no outside program
SETTINGS = {"zlib": "level 9", "zstd": "level 22", "brotli": "quality 11, lgwin 24", "lzma": "preset 9|EXTREME",
            "ans": "order-0 range coding, exact histogram (constriction)", "lrzip": "-z -L 9 (ZPAQ)"}


# Size estimates for --budget (pgolf.quant.budget), per tensor and option: the codec itself where it is
# fast; brotli at quality 5 (far faster than 11, at a similar size on quantized codes); zlib for lzma
# and auto. Real builds correct the estimate; it only has to rank the options.
ESTIMATORS = {"zlib": "zlib", "zstd": "zstd", "brotli": "brotli-q5", "lzma": "zlib", "ans": "ans", "lrzip": "ans",
              "auto": "ans"}


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


def _pieces(name: str, data: bytes, max_size: int) -> Iterator[bytes]:
    check_name(name)
    try:
        yield from CODECS[name][1](data, max_size)
    except PgolfError:
        raise
    except Exception as exc:  # each library has its own error types
        raise PgolfError(f"{name} data is corrupt ({type(exc).__name__}: {exc})") from None


def _bomb(name: str, max_size: int) -> PgolfError:
    return PgolfError(f"{name} data expands beyond {max_size:,} bytes; refusing (decompression bomb or corrupt size)")


def decompress(name: str, data: bytes, max_size: int) -> bytes:
    """Decompress, refusing output beyond `max_size` bytes (as soon as it passes) and truncated or corrupt input."""
    pieces, total = [], 0
    for piece in _pieces(name, data, max_size):
        total += len(piece)
        if total > max_size:
            raise _bomb(name, max_size)
        pieces.append(piece)
    return b"".join(pieces)


def decompress_into(name: str, data: bytes, out: memoryview) -> None:
    """Decompress into `out` (writable bytes), which the output must fill exactly: refused the moment it
    would pass len(out), and when it ends short. Nothing beyond one step is held besides `out`."""
    size, at = len(out), 0
    for piece in _pieces(name, data, size):
        end = at + len(piece)
        if end > size:
            raise _bomb(name, size)
        out[at:end] = piece
        at = end
    if at != size:
        raise PgolfError(f"{name} data decodes to {at:,} bytes, {size:,} declared; truncated or corrupt")


def compress_all(data: bytes, names: list[str] | None = None) -> dict[str, bytes]:
    """Each codec on `data`, in parallel threads (the codec libraries release the GIL while they work)."""
    from concurrent.futures import ThreadPoolExecutor

    names = names or list(AUTO)
    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        results = list(pool.map(lambda n: compress(n, data), names))
    return dict(zip(names, results))


def choose(codec: str, data: bytes, offered: tuple[str, ...] = AUTO) -> tuple[str, bytes, dict[str, int]]:
    """(codec used, compressed bytes, sizes per codec tried): `auto` tries those `offered` and keeps the smallest."""
    check_name(codec, allow_auto=True)
    results = compress_all(data, list(offered)) if codec == "auto" else {codec: compress(codec, data)}
    name = min(results, key=lambda n: len(results[n]))
    return name, results[name], {n: len(b) for n, b in results.items()}
