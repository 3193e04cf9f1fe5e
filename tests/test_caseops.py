"""CaseOps: the lossless case transform, its tokenizer, and the original-byte sidecar that scores it."""

from __future__ import annotations

import random
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import VAL_DOCS, make_docs, tokenize_config, write_jsonl
from typer.testing import CliRunner

from pgolf.text import caseops, ledger
from pgolf import tokenize
from pgolf.errors import PgolfError
from pgolf.formats.files import read_json
from pgolf.text.caseops import ALLCAPS, CAPNEXT, ESC, OPERATORS, TITLE
from pgolf.cli import app
from pgolf.formats.shards import load_val, shard_paths
from pgolf.text.tokenizer import encode_with_bytes, load_tokenizer, train_tokenizer, trainer_text
from pgolf.text.evaluate import EvalData

# Normalization-invariant (single spaces, no edge whitespace, NFKC-stable): SentencePiece's decode
# gives back exactly the transformed text, so the round trip through the tokenizer is byte-exact.
CLEAN_DOC = ("The NASA Launch of the iPhone by OpenAI in Zürich cost 3.14 USD; a MacBook and X were there. "
             f"I said OK to McDonald and eBay, with {TITLE} and {ESC}{CAPNEXT} as literal characters.")


@pytest.mark.parametrize("text, encoded", [
    ("hello", "hello"),
    ("Hello", TITLE + "hello"),
    ("A", TITLE + "a"),
    ("a", "a"),
    ("NASA", ALLCAPS + "nasa"),
    ("iPhone", "i" + CAPNEXT + "phone"),
    ("OpenAI", TITLE + "open" + CAPNEXT + "a" + CAPNEXT + "i"),
    ("McDonald", TITLE + "mc" + CAPNEXT + "donald"),
    ("aBC", "a" + CAPNEXT + "b" + CAPNEXT + "c"),
    ("The NASA Launch", f"{TITLE}the {ALLCAPS}nasa {TITLE}launch"),
    ("GPT-4o x86 ÉTÉ", f"{ALLCAPS}gpt-4o x86 É{TITLE}tÉ"),  # runs are ASCII letters only; É passes through
    ("Zürich", TITLE + "z" + "ürich"),
    (f"a{TITLE}B", f"a{ESC}{TITLE}{TITLE}b"),  # a literal operator is escaped
    (ESC + ESC, ESC + ESC + ESC + ESC),
    ("", ""),
])
def test_hand_examples(text, encoded):
    assert caseops.encode(text) == encoded
    assert caseops.decode(encoded) == text
    assert int(caseops.byte_costs(encoded).sum()) == len(text.encode("utf-8"))


def test_random_strings_round_trip_and_cost_their_original_bytes():
    rng = random.Random(1234)
    alphabet = (list("abcxyzABCXYZ") * 4 + list("0123456789 \n\t.,'-") + list(OPERATORS) * 2
                + ["\ue000", "\ue005", "é", "É", "ß", "ﬁ", "東", "😀", "\u200b", "\x00"])
    for _ in range(3000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        t = caseops.encode(s)
        assert caseops.decode(t) == s
        assert not re.search("[A-Z]", t)  # every ASCII uppercase letter became an operator + lowercase
        assert int(caseops.byte_costs(t).sum()) == len(s.encode("utf-8"))
        # one piece per character: each costs its original bytes, operators 0
        ends = np.cumsum([len(c.encode("utf-8")) for c in t])
        counts = caseops.original_byte_counts(t, ends)
        assert int(counts.sum()) == len(s.encode("utf-8"))
        escaped = False
        for c, n in zip(t, counts):
            if escaped:
                assert n == len(c.encode("utf-8"))
                escaped = False
            elif c in OPERATORS:
                assert n == 0
                escaped = c == ESC
            else:
                assert n == len(c.encode("utf-8"))


@pytest.mark.parametrize("bad", [TITLE, TITLE + " a", ALLCAPS + "1", "a" + CAPNEXT, "ab" + ESC])
def test_decode_rejects_operators_with_nothing_to_act_on(bad):
    with pytest.raises(ValueError):
        caseops.decode(bad)


def test_original_byte_counts_charges_uncovered_bytes_to_neighbours():
    t = caseops.encode("  Hi  ")  # "  " TITLE "hi  "
    # pieces: [TITLE] [hi] (edge whitespace outside every span, as the normalizer drops it)
    ends = [2 + 3, 2 + 3 + 2]
    assert caseops.original_byte_counts(t, ends).tolist() == [2, 4]  # leading to the first, trailing to the last
    assert caseops.original_byte_counts(t, []).size == 0


def _mixed_case_docs(n: int = 200, seed: int = 3) -> list[str]:
    """The shared generated corpus with words re-cased (Title, UPPER, mIxEd) and a few literal operators."""
    rng = random.Random(seed)

    def recase(m: re.Match) -> str:
        w, r = m.group(), rng.random()
        if r < 0.25:
            return w.capitalize()
        if r < 0.35:
            return w.upper()
        if r < 0.42:
            return "".join(c.upper() if rng.random() < 0.5 else c for c in w)
        return w

    docs = [re.sub("[A-Za-z]+", recase, d) for d in make_docs(n, seed)]
    docs[0] = CLEAN_DOC
    docs[1] = "  \n" + docs[1] + f" {TITLE}{ESC} literal operators, Then NASA \n\n"
    docs[VAL_DOCS + 1] += f" {ALLCAPS}{CAPNEXT} in training too"
    return docs


@pytest.fixture(scope="module")
def caseops_dir(tmp_path_factory) -> dict:
    """The mixed-case corpus tokenized through the CLI with --caseops (vocab 512, 20 val docs)."""
    root = tmp_path_factory.mktemp("caseops")
    docs = _mixed_case_docs()
    corpus = write_jsonl(root / "corpus.jsonl", docs)
    out = root / "data"
    cfg = tokenize_config()
    result = CliRunner().invoke(app, [
        "tokenize", str(corpus), "--out", str(out), "--caseops", "--metrics", str(root / "m.json"),
        "--params", str(root / "none.yaml"), "--vocab-size", str(cfg.vocab_size), "--val-docs", str(cfg.val_docs),
        "--set", f"shard_tokens={cfg.shard_tokens}", "--set", f"workers={cfg.workers}"])
    assert result.exit_code == 0, result.output
    return {"root": root, "docs": docs, "out": out, "corpus": corpus,
            "sp": load_tokenizer(out / "tokenizer.model"), "manifest": read_json(out / "manifest.json")}


def _doc_segments(tokens: np.ndarray, bos: int) -> list[slice]:
    starts = list(np.flatnonzero(tokens == bos)) + [tokens.size]
    return [slice(a, b) for a, b in zip(starts, starts[1:])]


def test_manifest_records_caseops(caseops_dir):
    m = caseops_dir["manifest"]
    assert m["caseops"] is True and m["text_transform"] == "caseops_v1" and m["settings"]["caseops"] is True
    assert m["settings"]["tokenizer"]["settings"]["user_defined_symbols"] == list(OPERATORS)
    assert read_json(caseops_dir["root"] / "m_report.json")["caseops"] is True


def test_operators_are_reserved_single_pieces(caseops_dir):
    sp = caseops_dir["sp"]
    assert caseops.is_caseops_tokenizer(sp)
    assert [sp.piece_to_id(op) for op in OPERATORS] == [4, 5, 6, 7]  # right after the 4 special ids
    others = [sp.id_to_piece(i) for i in range(8, sp.vocab_size())]
    assert not any(op in p for p in others for op in OPERATORS)  # never merged into a longer piece
    for doc in caseops_dir["docs"][:VAL_DOCS]:
        t = caseops.encode(doc)
        ids = sp.encode(t)
        assert sum(ids.count(sp.piece_to_id(op)) for op in OPERATORS) == sum(t.count(op) for op in OPERATORS)


def test_tokens_are_the_transformed_text_and_decode_to_the_original(caseops_dir):
    sp, docs = caseops_dir["sp"], caseops_dir["docs"]
    tokens, _ = load_val(caseops_dir["out"])
    segments = _doc_segments(tokens, sp.bos_id())
    written = [d for d in docs[:VAL_DOCS] if trainer_text(d) and sp.encode(caseops.encode(d))]
    assert len(segments) == len(written)
    for seg, doc in zip(segments, written):
        assert tokens[seg][1:].tolist() == sp.encode(caseops.encode(doc))
    ids = tokens[segments[0]][1:].tolist()  # CLEAN_DOC, the first validation document
    assert caseops.decode(sp.decode(ids)).encode("utf-8") == CLEAN_DOC.encode("utf-8")


def test_sidecar_sums_to_the_original_utf8_bytes_per_document(caseops_dir):
    sp, docs, out = caseops_dir["sp"], caseops_dir["docs"], caseops_dir["out"]
    tokens, sidecar = load_val(out)
    assert sidecar is not None and sidecar.shape == tokens.shape
    written = [d for d in docs[:VAL_DOCS] if trainer_text(d) and sp.encode(caseops.encode(d))]
    segments = _doc_segments(tokens, sp.bos_id())
    op_ids = {sp.piece_to_id(op) for op in OPERATORS}
    for seg, doc in zip(segments, written):
        side, toks = sidecar[seg].astype(np.int64), tokens[seg]
        assert side[0] == 0  # BOS
        assert int(side.sum()) == len(doc.encode("utf-8"))  # raw bytes, not the (longer) transformed text's
        # inside a document an operator token costs 0, and an escaped (literal) operator its 3 bytes
        escaped = False
        for tok, cost in zip(toks[2:].tolist(), side[2:].tolist()):
            if escaped:
                assert cost == len(sp.id_to_piece(tok).encode("utf-8")), doc
                escaped = False
            elif tok in op_ids:
                assert cost == 0, doc
                escaped = tok == sp.piece_to_id(ESC)
    raw = sum(len(d.encode("utf-8")) for d in written)
    split = caseops_dir["manifest"]["splits"]["val"]
    assert int(sidecar.sum(dtype=np.int64)) == raw == split["raw_bytes"] == split["sidecar_bytes"]
    transformed = sum(len(caseops.encode(d).encode("utf-8")) for d in written)
    assert transformed > raw  # the transform did insert operators, and they were not charged


def test_encode_with_bytes_in_caseops_mode_counts_original_bytes(caseops_dir):
    sp = caseops_dir["sp"]
    for text in [CLEAN_DOC, "  \n\nThe  END\t", f"{ESC}{ESC}X", "ﬁne Ligatures ÉTÉ", "x"]:
        ids, counts = encode_with_bytes(sp, text, caseops.TRANSFORM)
        assert ids == sp.encode(caseops.encode(text))
        assert counts.min() >= 0 and int(counts.sum()) == len(text.encode("utf-8"))


def test_eval_scores_caseops_data_with_the_sidecar_and_refuses_it_without(caseops_dir, tmp_path):
    data = EvalData.load(caseops_dir["out"])
    assert data.sidecar is not None
    vocab = int(data.manifest["vocab_size"])
    result = ledger.score(lambda x: torch.zeros(*x.shape, vocab), data.tokens, data.sidecar, data.luts,
                       seq_len=128, stride=0, val_tokens=0, batch_seqs=32, device="cpu", progress=False)
    assert result["val_bpb"] == result["val_bpb_sidecar"] != result["val_bpb_lut"]

    bare = tmp_path / "bare"
    shutil.copytree(caseops_dir["out"], bare)
    for p in shard_paths(bare, "val_bytes"):
        p.unlink()
    with pytest.raises(PgolfError, match="CaseOps data without the byte sidecar"):
        EvalData.load(bare)
    manifest = bare / "manifest.json"  # plain data may go without: the LUT then gives the bytes
    manifest.write_text(manifest.read_text().replace('"caseops": true', '"caseops": false')
                        .replace('"text_transform": "caseops_v1"', '"text_transform": null'))
    assert EvalData.load(bare).sidecar is None


def test_tokenizer_and_caseops_setting_must_match(caseops_dir, tmp_path):
    corpus, case_tok = caseops_dir["corpus"], caseops_dir["out"] / "tokenizer.model"
    with pytest.raises(PgolfError, match=r"tokenizer.model: is a CaseOps tokenizer .*pass --caseops"):
        tokenize.run([corpus], tmp_path / "a", tokenize_config(), case_tok, tmp_path / "m.json")
    plain = tmp_path / "plain.model"
    plain.write_bytes(train_tokenizer(caseops_dir["docs"][VAL_DOCS:], 512, 4192, None))
    with pytest.raises(PgolfError, match=r"plain.model: not a CaseOps tokenizer .*--no-caseops"):
        tokenize.run([corpus], tmp_path / "b", tokenize_config(caseops=True), plain, tmp_path / "m.json")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

    # reusing the CaseOps tokenizer with --caseops reproduces the shards bit for bit
    tokenize.run([corpus], tmp_path / "c", tokenize_config(caseops=True), case_tok, tmp_path / "m.json")
    assert read_json(tmp_path / "c" / "manifest.json")["files"] == caseops_dir["manifest"]["files"]


def test_ingest_of_caseops_shards(caseops_dir, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for p in caseops_dir["out"].glob("fineweb_*.bin"):
        shutil.copy(p, src / p.name)
    shutil.copy(caseops_dir["out"] / "tokenizer.model", src / "caseops.model")
    with pytest.raises(PgolfError, match="pass --caseops"):
        tokenize.run([src], tmp_path / "a", tokenize_config(), None, tmp_path / "m.json")
    tokenize.run([src], tmp_path / "b", tokenize_config(caseops=True), None, tmp_path / "m.json")
    ingested = read_json(tmp_path / "b" / "manifest.json")
    assert ingested["caseops"] is True
    assert ingested["splits"]["val"]["sidecar_bytes"] == caseops_dir["manifest"]["splits"]["val"]["raw_bytes"]
    for p in shard_paths(src, "val_bytes"):
        p.unlink()
    with pytest.raises(PgolfError, match="without a byte sidecar"):
        tokenize.run([src], tmp_path / "c", tokenize_config(caseops=True), None, tmp_path / "m.json")
