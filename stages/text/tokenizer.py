"""SentencePiece BPE with the challenge's settings, and encoding that charges every raw byte to a token.

The byte sidecar (canonical BPB denominator) needs, for each token, the UTF-8 bytes of the original
document it accounts for. SentencePiece's proto output gives each piece a span [begin, end) of byte
offsets into the original text; the charging rule built on those spans is in `charge_bytes`.

An optional lossless `TextTransform` (pgolf.text.caseops.TRANSFORM) rewrites each document before
SentencePiece trains on or encodes it; tokens are then still charged bytes of the *original* text.
This module takes the transform as a value and never imports it: it is on the decode path whose code
bytes a blob is measured with (pgolf.formats.code), and scoring needs only the sidecar, not the transform.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

import numpy as np
import sentencepiece as spm

from pgolf.errors import PgolfError

MAX_UINT16 = (1 << 16) - 1

# The challenge's trainer settings (its data/download_hf_docs_and_tokenize.py); everything else stays at SentencePiece's
# defaults, as the reference left it (remove_extra_whitespaces, max_sentencepiece_length=16, ...).
CHALLENGE_TRAINER_SETTINGS = {
    "model_type": "bpe",
    "character_coverage": 0.999,
    "byte_fallback": True,
    "split_digits": True,
    "normalization_rule_name": "nmt_nfkc",
    "add_dummy_prefix": False,
    "pad_id": 0,
    "bos_id": 1,
    "eos_id": 2,
    "unk_id": 3,
    "hard_vocab_limit": False,
}


class TextTransform(NamedTuple):
    """A lossless rewrite of documents before SentencePiece (module-level functions: picklable)."""

    name: str  # recorded in the manifest
    encode: Callable[[str], str]
    # (transformed text, piece span ends as byte offsets into it) -> original UTF-8 bytes per piece,
    # summing to the original text's length (the same charging rule as `charge_bytes`)
    byte_counts: Callable[[str, list[int]], np.ndarray]
    reserved: tuple[str, ...]  # symbols the tokenizer must keep as single pieces (user_defined_symbols)


def trainer_settings(transform: TextTransform | None = None) -> dict:
    """The challenge's trainer settings, plus the transform's reserved symbols (ids 4, 5, ...).

    user_defined_symbols are matched before BPE and never merged, so each is always exactly one piece.
    """
    if transform is None or not transform.reserved:
        return dict(CHALLENGE_TRAINER_SETTINGS)
    return {**CHALLENGE_TRAINER_SETTINGS, "user_defined_symbols": list(transform.reserved)}


def trainer_text(text: str) -> str:
    """The text the tokenizer trainer sees: NUL -> space, stripped (as the reference)."""
    return text.replace("\x00", " ").strip()


def train_tokenizer(docs: Iterable[str], vocab_size: int, max_sentence_length: int,
                    transform: TextTransform | None, num_threads: int | None = None) -> bytes:
    """Train SP-BPE on `docs` (empty ones skipped; rewritten by `transform` if given) -> serialized model."""
    reserved = 4 + (len(transform.reserved) if transform is not None else 0)
    if vocab_size < reserved + 256:
        raise PgolfError(f"vocab_size {vocab_size} is too small: byte fallback alone needs {reserved} special + 256 "
                         f"byte pieces; use at least {reserved + 256} (challenge: 1024)")
    if vocab_size > 1 << 16:
        raise PgolfError(f"vocab_size {vocab_size} does not fit the uint16 shard format; use at most 65,536")

    seen = [0]

    def sentences() -> Iterator[str]:
        for doc in docs:
            text = trainer_text(transform.encode(doc) if transform is not None else doc)
            if text:
                seen[0] += 1
                yield text

    writer = io.BytesIO()
    extra = {"num_threads": num_threads} if num_threads else {}
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=sentences(), model_writer=writer, vocab_size=vocab_size,
            max_sentence_length=max_sentence_length, minloglevel=2, **trainer_settings(transform), **extra)
    except RuntimeError as exc:
        if seen[0] == 0:
            raise PgolfError("no non-blank training documents to train the tokenizer on; add documents or "
                             "lower val_docs (validation documents never train the tokenizer)") from None
        raise PgolfError(f"SentencePiece training failed: {exc}. With few or short training documents lower "
                         "vocab_size; with long documents raise max_sentence_length") from None
    return writer.getvalue()


def load_tokenizer_bytes(model: bytes, source: str = "tokenizer") -> spm.SentencePieceProcessor:
    """A processor from a serialized model; PgolfError for anything that is not a usable SP model."""
    sp = spm.SentencePieceProcessor()
    try:
        sp.LoadFromSerializedProto(model)
    except (RuntimeError, OSError, TypeError) as exc:
        raise PgolfError(f"{source}: not a SentencePiece model ({exc}); pass the .model file written by "
                         "SentencePiece (e.g. data/tokenized/tokenizer.model)") from None
    if sp.vocab_size() <= 0:
        raise PgolfError(f"{source}: SentencePiece model with an empty vocabulary")
    if sp.vocab_size() > 1 << 16:
        raise PgolfError(f"{source}: vocabulary of {sp.vocab_size()} pieces does not fit the uint16 shard format "
                         "(at most 65,536)")
    return sp


def load_tokenizer(path: str | Path) -> spm.SentencePieceProcessor:
    path = Path(path)
    if not path.is_file():
        raise PgolfError(f"{path}: tokenizer model not found; run `pgolf tokenize` or pass --tokenizer X.model")
    return load_tokenizer_bytes(path.read_bytes(), str(path))


def user_defined_pieces(sp: spm.SentencePieceProcessor) -> set[str]:
    """The pieces the model was trained with as user_defined_symbols (always single pieces)."""
    from sentencepiece import sentencepiece_model_pb2 as model_pb2  # ships with sentencepiece (needs protobuf)

    proto = model_pb2.ModelProto()
    proto.ParseFromString(sp.serialized_model_proto())
    return {p.piece for p in proto.pieces if p.type == model_pb2.ModelProto.SentencePiece.USER_DEFINED}


def charge_bytes(ends: list[int], n_bytes: int) -> np.ndarray:
    """Bytes charged to each piece, from the pieces' span ends (byte offsets into the original text).

    Rule: piece i is charged the bytes from the end of piece i-1's span (0 for the first piece) to the
    end of its own span, and the last piece also takes everything after its span. So bytes the
    normalizer dropped *before* a piece (leading whitespace, dropped control or zero-width runs) go to
    the piece that follows them, trailing whitespace goes to the last piece, and byte-fallback pieces
    with empty spans cost 0 while the piece holding the character's span pays for all its bytes. Each
    byte is charged exactly once: the counts sum to `n_bytes`.
    """
    if not ends:
        return np.zeros(0, dtype=np.int64)
    bounds = np.asarray(ends, dtype=np.int64)
    bounds[-1] = n_bytes
    counts = np.diff(bounds, prepend=0)
    if counts.min() < 0 or ends[-1] > n_bytes:
        raise PgolfError("SentencePiece returned non-monotonic piece spans; cannot charge bytes to tokens "
                         "(unsupported sentencepiece version?)")
    return counts


def encode_with_bytes(sp: spm.SentencePieceProcessor, text: str,
                      transform: TextTransform | None = None) -> tuple[list[int], np.ndarray]:
    """Token ids of `text` and, per token, the raw UTF-8 bytes of `text` it is charged (sum = all bytes).

    With `transform`, the ids are those of the transformed text and the counts are still bytes of the
    original `text` (the transform's inserted symbols cost 0), summing to len(text.encode()).
    """
    if transform is None:
        proto = sp.encode(text, out_type="proto")  # needs protobuf; spans index the original UTF-8 text
        counts = charge_bytes([p.end for p in proto.pieces], len(text.encode("utf-8")))
    else:
        transformed = transform.encode(text)
        proto = sp.encode(transformed, out_type="proto")  # spans index the transformed text's UTF-8
        try:
            counts = transform.byte_counts(transformed, [p.end for p in proto.pieces])
        except ValueError as exc:
            raise PgolfError(f"cannot charge original bytes to tokens: {exc} (unsupported sentencepiece "
                             "version?)") from None
    ids = [p.id for p in proto.pieces]
    if counts.size and counts.max() > MAX_UINT16:
        i = int(counts.argmax())
        raise PgolfError(f"one token ({sp.id_to_piece(ids[i])!r}) would be charged {int(counts[i])} bytes, more "
                         "than the uint16 sidecar holds (65,535); the document has an enormous whitespace or "
                         "control-character run, clean it")
    return ids, counts


# --- worker side of the parallel encoder (used by pgolf.tokenize through a process pool) -----------

_worker_sp: spm.SentencePieceProcessor | None = None
_worker_transform: TextTransform | None = None


def init_worker(model: bytes, transform: TextTransform | None = None) -> None:
    global _worker_sp, _worker_transform
    _worker_sp = load_tokenizer_bytes(model)
    _worker_transform = transform


def encode_chunk(first_index: int, chunk: list[tuple[bool, str]]) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """Encode (is_val, text) documents: ids as uint16, plus byte counts for validation documents."""
    assert _worker_sp is not None, "init_worker was not called"
    sp = _worker_sp
    out: list[tuple[np.ndarray, np.ndarray | None]] = []
    for k, (is_val, text) in enumerate(chunk):
        if is_val:
            try:
                ids, counts = encode_with_bytes(sp, text, _worker_transform)
            except PgolfError as exc:
                raise PgolfError(f"validation document {first_index + k} (0-based, input order): {exc}") from None
            out.append((np.asarray(ids, dtype=np.uint16), counts.astype(np.uint16)))
        else:
            if _worker_transform is not None:
                text = _worker_transform.encode(text)
            out.append((np.asarray(sp.encode(text), dtype=np.uint16), None))
    return out
