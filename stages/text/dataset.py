"""A tokenized data set: documents (or existing challenge shards) → shards, byte sidecar, tokenizer, manifest.

Documents mode: validation = the documents at input positions 0..val_docs-1, training = the rest.
The tokenizer is trained on training documents only (or reused); every document is written as
[BOS] + tokens(doc), no EOS. The validation byte sidecar charges each raw UTF-8 byte of a validation
document to one of its tokens (BOS costs 0), so it sums to the raw byte count exactly.

CaseOps (`caseops: true`, pgolf.text.caseops): the tokenizer is trained on and encodes case-transformed
text; the sidecar still counts bytes of the *original* documents (operators cost 0). For such data
the LUT bytes are not the original bytes, so the sidecar is the only valid BPB denominator, and
evaluation refuses CaseOps data without one (pgolf.text.evaluate.EvalData).

Ingest mode: a single input directory of fineweb_*.bin shards plus a tokenizer is validated and
described by a manifest, without re-tokenizing.

Everything is built in a temp directory next to `out` and renamed into place at the end.
"""

from __future__ import annotations

import collections
import contextlib
import multiprocessing as mp
import os
import shutil
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from itertools import islice
from pathlib import Path
from typing import Iterator

import numpy as np

from pgolf.config.sections import TokenizeConfig
from pgolf.errors import PgolfError
from pgolf.formats.files import sha256_file, staging_dir, write_bytes, write_json
from pgolf.formats.shards import ShardWriter, read_header, read_shard, shard_paths
from pgolf.report.progress import Bar
from pgolf.text import caseops
from pgolf.text.bpb import build_luts, stream_lut_bytes
from pgolf.text.corpus import document_files, iter_documents
from pgolf.text.tokenizer import (encode_chunk, init_worker, load_tokenizer, load_tokenizer_bytes, train_tokenizer,
                                  trainer_settings, trainer_text)

MANIFEST_KIND = "pgolf-tokenized"
MANIFEST_VERSION = 1
TOKENIZER_NAME = "tokenizer.model"
DOCS_PER_TASK = 64


def is_shard_directory(inputs: list[Path]) -> bool:
    """One input directory holding challenge shards: ingest it rather than tokenize documents."""
    return len(inputs) == 1 and inputs[0].is_dir() and bool(shard_paths(inputs[0], "train") + shard_paths(inputs[0], "val"))


# --- documents mode ----------------------------------------------------------------------------

def tokenize_documents(inputs: list[Path], out: Path, cfg: TokenizeConfig, tokenizer: Path | None) -> dict:
    if cfg.val_docs < 1:
        raise PgolfError(f"val_docs is {cfg.val_docs}; at least one validation document is needed")
    if cfg.shard_tokens < 1:
        raise PgolfError(f"shard_tokens is {cfg.shard_tokens}; must be positive")
    document_files(inputs)  # fail on a missing path or foreign file before any long work
    if tokenizer is not None:
        sp = load_tokenizer(tokenizer)  # names the file in its errors
        caseops.check_tokenizer(sp, cfg.caseops, str(tokenizer))
        model = Path(tokenizer).read_bytes()
        source = {"trained": False, "path": str(tokenizer)}
        if sp.vocab_size() != cfg.vocab_size:
            print(f"tokenize: reusing {tokenizer} with {sp.vocab_size()} pieces (vocab_size {cfg.vocab_size} ignored)")
    else:
        train_docs = islice(_training_docs(inputs, cfg.val_docs), cfg.tokenizer_train_docs)
        model = train_tokenizer(train_docs, cfg.vocab_size, cfg.max_sentence_length, _transform(cfg))
        sp = load_tokenizer_bytes(model, "trained tokenizer")
        source = {"trained": True, "train_docs": cfg.tokenizer_train_docs,
                  "settings": {**trainer_settings(_transform(cfg)), "vocab_size": cfg.vocab_size,
                               "max_sentence_length": cfg.max_sentence_length}}
    bos = sp.bos_id()
    if bos < 0:
        raise PgolfError(f"{tokenizer}: the tokenizer has no BOS piece; documents are separated by BOS (id 1)")

    with staging_dir(out) as tmp:
        write_bytes(tmp / TOKENIZER_NAME, model)
        counts = _encode_all(inputs, tmp, cfg, model, bos)
        val_tokens = _concat([read_shard(tmp / n) for n in counts["val"]["files"]])
        sidecar = _concat([read_shard(tmp / n) for n in counts["val"]["sidecar_files"]])
        counts["val"]["lut_bytes"] = int(stream_lut_bytes(val_tokens, build_luts(sp, sp.vocab_size())).sum(dtype=np.int64))
        # With CaseOps too: the sidecar counts the original (untransformed) documents' bytes.
        if int(sidecar.astype(np.int64).sum()) != counts["val"]["raw_bytes"] or sidecar.size != val_tokens.size:
            raise AssertionError("byte sidecar does not sum to the raw bytes of the validation documents")
        counts["val"]["sidecar_bytes"] = counts["val"]["raw_bytes"]
        manifest = _manifest(tmp, "documents", cfg, cfg.caseops, sp, bos, TOKENIZER_NAME, counts,
                             {"inputs": [str(p) for p in inputs], "tokenizer": source})
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _transform(cfg: TokenizeConfig):
    """The text transform applied before SentencePiece (None: the raw text)."""
    return caseops.TRANSFORM if cfg.caseops else None


def _training_docs(inputs: list[Path], val_docs: int) -> Iterator[str]:
    """Training documents only (input positions >= val_docs): the tokenizer never sees validation text."""
    return islice(iter_documents(inputs), val_docs, None)


def _workers(cfg: TokenizeConfig) -> int:
    return cfg.workers if cfg.workers > 0 else (os.cpu_count() or 1)


def _chunks(inputs: list[Path], val_docs: int) -> Iterator[tuple[int, list[tuple[bool, str]]]]:
    """(index of the chunk's first document, [(is_val, text), ...]) in input order."""
    chunk: list[tuple[bool, str]] = []
    for i, text in enumerate(iter_documents(inputs)):
        chunk.append((i < val_docs, text))
        if len(chunk) == DOCS_PER_TASK:
            yield i + 1 - len(chunk), chunk
            chunk = []
    if chunk:
        yield i + 1 - len(chunk), chunk


def _encode_all(inputs: list[Path], tmp: Path, cfg: TokenizeConfig, model: bytes, bos: int) -> dict:
    """Encode every document in parallel (order kept) and write the shards; return per-split counts."""
    train = ShardWriter(tmp, "train", cfg.shard_tokens)
    val = ShardWriter(tmp, "val", cfg.shard_tokens, with_sidecar=True)
    stats = {"train": {"docs": 0, "skipped_docs": 0}, "val": {"docs": 0, "skipped_docs": 0, "raw_bytes": 0}}
    seen = 0
    with _encoder_pool(cfg, model) as pool, Bar("tokenize: encoding", None, "docs") as bar:
        for chunk, encoded in _ordered_map(pool, _chunks(inputs, cfg.val_docs), 4 * _workers(cfg)):
            for (is_val, text), (ids, byte_counts) in zip(chunk, encoded):
                seen += 1
                split = "val" if is_val else "train"
                if not trainer_text(text) or ids.size == 0:
                    stats[split]["skipped_docs"] += 1  # nothing to predict: blank, or dropped by the normalizer
                    continue
                stats[split]["docs"] += 1
                doc = np.concatenate([np.array([bos], dtype=np.uint16), ids])
                if is_val:
                    stats["val"]["raw_bytes"] += len(text.encode("utf-8"))
                    val.add(doc, np.concatenate([np.zeros(1, dtype=np.uint16), byte_counts]))  # BOS costs 0
                else:
                    train.add(doc)
            bar.update(seen, f"{train.total + val.total:,} tokens")
    if seen <= cfg.val_docs:
        raise PgolfError(f"the inputs hold {seen} documents, all of them validation (val_docs = {cfg.val_docs}); "
                         "lower val_docs so training documents remain")
    if stats["val"]["docs"] == 0 or stats["train"]["docs"] == 0:
        raise PgolfError("after skipping blank documents a split is empty; check the inputs or val_docs")
    train.close()
    val.close()
    stats["train"].update(tokens=train.total, files=train.files)
    stats["val"].update(tokens=val.total, files=val.files, sidecar_files=val.sidecar_files)
    return stats


@contextlib.contextmanager
def _encoder_pool(cfg: TokenizeConfig, model: bytes) -> Iterator[ProcessPoolExecutor]:
    """The encoding workers. fork: they need only sentencepiece and numpy, and start at once (spawn would re-import
    torch). A ProcessPoolExecutor, not a multiprocessing.Pool: a Pool that exits on an error with chunks in flight
    can hang for ever in Pool.terminate, its task thread blocked on a full pipe to workers it has killed (a loop
    of an error raised while encoding hung at its 27th run, and again at its 43rd). On an error the executor
    drops the chunks not started."""
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    with ProcessPoolExecutor(_workers(cfg), mp_context=ctx, initializer=init_worker,
                             initargs=(model, _transform(cfg))) as pool:
        try:
            yield pool
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _ordered_map(pool: ProcessPoolExecutor, chunks: Iterator[tuple[int, list]], max_pending: int):
    """pool.map with bounded read-ahead, so a huge corpus is streamed rather than queued into memory."""
    pending: collections.deque = collections.deque()
    for first, chunk in chunks:
        pending.append((chunk, pool.submit(encode_chunk, first, chunk)))
        if len(pending) >= max_pending:
            chunk0, result = pending.popleft()
            yield chunk0, result.result()
    while pending:
        chunk0, result = pending.popleft()
        yield chunk0, result.result()


def _concat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.asarray(a) for a in arrays]) if arrays else np.zeros(0, dtype=np.uint16)


# --- ingest mode -------------------------------------------------------------------------------

def ingest(src: Path, out: Path, tokenizer: Path | None, use_caseops: bool = False) -> dict:
    """Validate existing challenge shards and their tokenizer; describe them with a manifest."""
    tok_path = _find_tokenizer(src, tokenizer)
    sp = load_tokenizer(tok_path)
    caseops.check_tokenizer(sp, use_caseops, str(tok_path))
    vocab = sp.vocab_size()
    bos = sp.bos_id()
    files = {split: shard_paths(src, split) for split in ("train", "val", "val_bytes")}
    for split in ("train", "val"):
        if not files[split]:
            raise PgolfError(f"{src}: no fineweb_{split}_*.bin shards; ingest needs both train and val shards")
    sizes: dict[str, list[int]] = {}
    counts: dict[str, dict] = {}
    for split in ("train", "val"):
        sizes[split] = [read_header(p) for p in files[split]]
        docs = 0
        for p in files[split]:
            tokens = read_shard(p)
            if tokens.size and int(tokens.max()) >= vocab:
                raise PgolfError(f"{p}: token id {int(tokens.max())} is outside the tokenizer's {vocab} ids; "
                                 f"these shards were not made with {tok_path}")
            docs += int(np.count_nonzero(tokens == bos))
        counts[split] = {"docs": docs, "skipped_docs": None, "tokens": sum(sizes[split]),
                         "files": [p.name for p in files[split]]}
    val_tokens = _concat([read_shard(p) for p in files["val"]])
    counts["val"]["lut_bytes"] = int(stream_lut_bytes(val_tokens, build_luts(sp, sp.vocab_size())).sum(dtype=np.int64))
    counts["val"]["raw_bytes"] = None  # the text is not at hand; the sidecar is the canonical count
    counts["val"]["sidecar_bytes"] = None
    counts["val"]["sidecar_files"] = []
    if files["val_bytes"]:
        side_sizes = [read_header(p) for p in files["val_bytes"]]
        if side_sizes != sizes["val"]:
            raise PgolfError(f"{src}: byte sidecar shards hold {side_sizes} entries but the val shards {sizes['val']} "
                             "tokens; they must be aligned 1:1 (re-export the sidecar)")
        counts["val"]["sidecar_bytes"] = int(sum(read_shard(p).astype(np.int64).sum() for p in files["val_bytes"]))
        counts["val"]["sidecar_files"] = [p.name for p in files["val_bytes"]]
    elif use_caseops:
        raise PgolfError(f"{src}: CaseOps shards without a byte sidecar (fineweb_val_bytes_*.bin): their BPB cannot "
                         "be measured (the tokenizer's pieces are not the original bytes); add the sidecar shards")

    extra = {"source": str(src), "tokenizer_source": str(tok_path)}
    all_shards = files["train"] + files["val"] + files["val_bytes"]
    if out.resolve() == src.resolve():
        tok_name = tok_path.name if tok_path.parent.resolve() == src.resolve() else TOKENIZER_NAME
        if tok_name == TOKENIZER_NAME and tok_path.parent.resolve() != src.resolve():
            write_bytes(src / TOKENIZER_NAME, tok_path.read_bytes())
        manifest = _manifest(src, "ingest", None, use_caseops, sp, bos, tok_name, counts, extra)
        write_json(src / "manifest.json", manifest)
        return manifest
    with staging_dir(out) as tmp:
        for p in all_shards:
            _link_or_copy(p, tmp / p.name)
        _link_or_copy(tok_path, tmp / TOKENIZER_NAME)
        manifest = _manifest(tmp, "ingest", None, use_caseops, sp, bos, TOKENIZER_NAME, counts, extra)
        write_json(tmp / "manifest.json", manifest)
    return manifest


def _find_tokenizer(src: Path, tokenizer: Path | None) -> Path:
    if tokenizer is not None:
        return Path(tokenizer)
    models = sorted(src.glob("*.model"))
    if len(models) != 1:
        found = ", ".join(p.name for p in models) or "none"
        raise PgolfError(f"{src}: ingesting shards needs their tokenizer: found {found} *.model files; "
                         "pass --tokenizer X.model")
    return models[0]


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # challenge shards are large; a hard link costs nothing
    except OSError:
        shutil.copy2(src, dst)


# --- shared ------------------------------------------------------------------------------------

def _manifest(root: Path, mode: str, cfg: TokenizeConfig | None, use_caseops: bool, sp, bos: int,
              tok_name: str, counts: dict, extra: dict) -> dict:
    names = [tok_name] + counts["train"]["files"] + counts["val"]["files"] + counts["val"]["sidecar_files"]
    hashes = {name: sha256_file(root / name) for name in names}
    return {
        "kind": MANIFEST_KIND,
        "format_version": MANIFEST_VERSION,
        "mode": mode,
        "settings": {**(asdict(cfg) if cfg is not None else {}), **extra},
        # Transformed (CaseOps) data is scored with the byte sidecar only (pgolf.text.evaluate checks these)
        "caseops": bool(use_caseops),
        "text_transform": caseops.TRANSFORM_NAME if use_caseops else None,
        "vocab_size": int(sp.vocab_size()),
        "bos_id": int(bos),
        "tokenizer": tok_name,
        "tokenizer_sha256": hashes[tok_name],
        "splits": counts,
        "files": hashes,
    }
