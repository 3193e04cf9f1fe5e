"""BPB accounting: the tokenizer LUT, the window plans, and scoring on hand-computable models."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from pgolf.errors import PgolfError
from pgolf.text import ledger
from pgolf.text.bpb import build_luts, lut_byte_counts, plan_windows, stream_lut_bytes
from pgolf.formats.shards import load_val
from pgolf.text.tokenizer import encode_with_bytes, load_tokenizer


def score(logits_fn, tokens, sidecar, luts, seq_len, stride, val_tokens=0, batch_seqs=32, progress=False):
    """ledger.score on the CPU, the evaluation defaults filled in."""
    return ledger.score(logits_fn, tokens, sidecar, luts, seq_len=seq_len, stride=stride, val_tokens=val_tokens,
                     batch_seqs=batch_seqs, device="cpu", progress=progress)


@pytest.fixture(scope="module")
def sp(tokenized_dir):
    return load_tokenizer(tokenized_dir / "tokenizer.model")


def _reference_bytes(sp, prev: int, target: int) -> int:
    """The reference formula (train_gpt.py's build_sentencepiece_luts), written out piece by piece."""
    def boundary(i):
        return i >= sp.vocab_size() or sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)
    if boundary(target):
        return 0
    if sp.is_byte(target):
        return 1
    piece = sp.id_to_piece(target)
    space = piece.startswith("▁")
    return len(piece.removeprefix("▁").encode("utf-8")) + int(space and not boundary(prev))


def test_lut_tables_on_real_pieces(sp):
    luts = build_luts(sp, vocab_size=sp.vocab_size() + 8)  # the model may have more ids than the tokenizer
    assert luts.base_bytes.dtype == np.int16 and luts.base_bytes.size == sp.vocab_size() + 8
    for special in (0, 1, 2, 3):  # pad, bos, eos (control) and unk
        assert luts.base_bytes[special] == 0 and luts.is_boundary[special] and not luts.has_leading_space[special]
    byte_a = sp.piece_to_id("<0x41>")
    assert sp.is_byte(byte_a) and luts.base_bytes[byte_a] == 1 and not luts.is_boundary[byte_a]
    the = sp.piece_to_id("▁the")
    assert the != sp.unk_id() and luts.base_bytes[the] == 3 and luts.has_leading_space[the]
    space = sp.piece_to_id("▁")
    assert luts.base_bytes[space] == 0 and luts.has_leading_space[space]
    multibyte = next(i for i in range(sp.vocab_size()) if not sp.is_byte(i) and "é" in sp.id_to_piece(i))
    assert luts.base_bytes[multibyte] == len(sp.id_to_piece(multibyte).removeprefix("▁").encode())
    assert (luts.base_bytes[sp.vocab_size():] == 0).all() and luts.is_boundary[sp.vocab_size():].all()


def test_lut_formula_matches_the_reference_on_every_pair_kind(sp):
    luts = build_luts(sp, sp.vocab_size())
    bos, the, word = sp.bos_id(), sp.piece_to_id("▁the"), sp.piece_to_id("king")
    byte = sp.piece_to_id("<0xE6>")
    prev = np.array([bos, word, byte, 3, word, the, word])
    target = np.array([the, the, the, the, bos, byte, word])
    got = lut_byte_counts(prev, target, luts)
    # leading space: +1 only after a non-boundary token; BOS as a target costs 0
    assert got.tolist() == [3, 4, 4, 3, 0, 1, len("king")]
    rng = np.random.default_rng(0)
    prev, target = rng.integers(0, sp.vocab_size(), 3000), rng.integers(0, sp.vocab_size(), 3000)
    expected = [_reference_bytes(sp, int(p), int(t)) for p, t in zip(prev, target)]
    assert lut_byte_counts(prev, target, luts).tolist() == expected


def test_lut_agrees_with_raw_bytes_on_normalized_single_spaced_text(sp):
    # For text the normalizer leaves unchanged (NFKC, single spaces, no edge whitespace) the LUT and the
    # byte sidecar must both count exactly the UTF-8 bytes.
    text = "the king and 東京 queen spoke 12345 words of café — sweet love😀 in Zürich"
    ids, counts = encode_with_bytes(sp, text)
    stream = np.array([sp.bos_id()] + ids)
    assert int(stream_lut_bytes(stream, build_luts(sp, sp.vocab_size())).sum()) == len(text.encode()) == int(counts.sum())


def _scored_targets(windows) -> list[int]:
    return [p for w in windows for p in range(w.start + 1 + w.first_scored, w.end + 1)]


@pytest.mark.parametrize("n_tokens, seq_len",
                         list(itertools.product([2, 3, 17, 64, 65, 100, 257, 1000], [1, 4, 16, 64])))
def test_window_plans_score_every_target_once(n_tokens, seq_len):
    for stride in sorted({0, 1, seq_len // 2 or 1, seq_len - 1 or 1, seq_len, 3}):
        if stride > seq_len:
            continue
        for max_targets in (0, 50):
            windows = plan_windows(n_tokens, seq_len, stride, max_targets)
            total = n_tokens - 1 if not max_targets else min(n_tokens - 1, max_targets)
            if stride == 0 and total >= seq_len:
                total = total // seq_len * seq_len  # the reference's truncation, whole windows only
            assert _scored_targets(windows) == list(range(1, total + 1)), (n_tokens, seq_len, stride, max_targets)
            assert all(w.end - w.start <= seq_len and w.end <= n_tokens - 1 for w in windows)
            if stride == 0:
                assert all(w.first_scored == 0 for w in windows)
            elif total >= seq_len:
                # sliding: full-length windows; after the first, every scored token has >= L - S context
                assert all(w.end - w.start == seq_len for w in windows)
                assert all(w.first_scored >= seq_len - stride for w in windows[1:])


def test_window_plan_matches_the_reference_layout():
    assert plan_windows(10, 4, 0) == [(0, 4, 0), (4, 8, 0)]  # 9 targets -> 8 scored, tail dropped
    # stride 2: starts 0, 2, 4 score their last 2 targets; the tail window ends at the stream's end
    assert plan_windows(10, 4, 2) == [(0, 4, 0), (2, 6, 2), (4, 8, 2), (5, 9, 3)]


def test_bad_window_settings_are_errors():
    with pytest.raises(PgolfError):
        plan_windows(100, 16, 17)
    with pytest.raises(PgolfError, match="nothing to score"):
        plan_windows(1, 16, 0)


def _luts_for(vocab: int):
    """LUTs of a made-up vocabulary: id 1 is BOS (0 bytes), others cost id % 5 + 1 bytes, odd ids start with ▁."""
    from pgolf.text.bpb import ByteLUTs

    ids = np.arange(vocab)
    boundary = ids == 1
    base = np.where(boundary, 0, ids % 5 + 1).astype(np.int16)
    return ByteLUTs(base, (ids % 2 == 1) & ~boundary, boundary)


def test_uniform_model_scores_ln_v_per_token():
    vocab, rng = 64, np.random.default_rng(1)
    tokens = rng.integers(0, vocab, 1000).astype(np.uint16)
    tokens[::37] = 1
    sidecar = rng.integers(0, 6, tokens.size).astype(np.uint16)
    luts = _luts_for(vocab)
    uniform = lambda x: torch.zeros(*x.shape, vocab)  # noqa: E731
    for stride in (0, 16):
        r = score(uniform, tokens, sidecar, luts, seq_len=64, stride=stride, batch_seqs=5, progress=False)
        n = 999 // 64 * 64 if stride == 0 else 999
        assert r["tokens_scored"] == n
        assert r["val_loss"] == pytest.approx(math.log(vocab), rel=1e-6)
        lut_bytes = sum(int(luts.base_bytes[t]) + int(luts.has_leading_space[t] and not luts.is_boundary[p])
                        for p, t in zip(tokens[:n], tokens[1:n + 1]))
        side_bytes = int(sidecar[1:n + 1].astype(np.int64).sum())
        assert (r["lut_bytes"], r["sidecar_bytes"]) == (lut_bytes, side_bytes)
        assert r["val_bpb_lut"] == pytest.approx(n * math.log2(vocab) / lut_bytes, rel=1e-6)
        assert r["val_bpb_sidecar"] == pytest.approx(n * math.log2(vocab) / side_bytes, rel=1e-6)
        assert r["val_bpb"] == r["val_bpb_sidecar"]
    no_sidecar = score(uniform, tokens, None, luts, 64, 0, progress=False)
    assert no_sidecar["val_bpb_sidecar"] is None and no_sidecar["val_bpb"] == no_sidecar["val_bpb_lut"]


def test_sliding_and_non_overlapping_agree_for_a_context_free_model():
    # logits depend only on the current input token (a bigram table), so every target's loss is the
    # same in any window that contains it: all plans over the same targets must give the same sums,
    # equal to the loss computed directly over the stream.
    vocab, seq_len, rng = 50, 32, np.random.default_rng(2)
    table = torch.randn(vocab, vocab, dtype=torch.float32) * 3
    tokens = rng.integers(0, vocab, 32 * 20 + 1).astype(np.uint16)
    bigram = lambda x: table[x]  # noqa: E731
    luts = _luts_for(vocab)
    direct = torch.nn.functional.cross_entropy(table[torch.from_numpy(tokens[:-1].astype(np.int64))],
                                               torch.from_numpy(tokens[1:].astype(np.int64)), reduction="sum")
    results = [score(bigram, tokens, None, luts, seq_len, stride, batch_seqs=b, progress=False)
               for stride in (0, 1, 7, 16, 32) for b in (1, 6)]
    for r in results:
        assert r["tokens_scored"] == tokens.size - 1
        assert r["val_loss"] * r["tokens_scored"] == pytest.approx(float(direct), rel=1e-6)
        assert r["lut_bytes"] == results[0]["lut_bytes"]
        assert r["val_bpb"] == pytest.approx(results[0]["val_bpb"], rel=1e-9)


def test_context_matters_for_a_context_using_model():
    # Sanity check that the test above could fail: with a model that counts its context, sliding
    # windows (more context per scored token) give a different loss than non-overlapping ones.
    vocab = 8
    tokens = np.arange(4 * 16 + 1, dtype=np.uint16) % vocab

    def context_model(x):  # confidence in the right next token grows with the position in the window
        logits = torch.zeros(*x.shape, vocab)
        pos = torch.arange(x.shape[1], dtype=torch.float32).expand(x.shape)
        logits.scatter_(2, ((x + 1) % vocab).unsqueeze(-1), pos.unsqueeze(-1))
        return logits

    luts = _luts_for(vocab)
    flat = score(context_model, tokens, None, luts, 16, 0, progress=False)
    sliding = score(context_model, tokens, None, luts, 16, 4, progress=False)
    assert flat["tokens_scored"] == sliding["tokens_scored"] and sliding["val_loss"] < flat["val_loss"]


def test_val_tokens_limits_scoring_to_whole_windows():
    vocab, tokens = 16, (np.arange(1001) % 16).astype(np.uint16)
    r = score(lambda x: torch.zeros(*x.shape, vocab), tokens, None, _luts_for(vocab), 64, 0,
              val_tokens=300, progress=False)
    assert r["tokens_scored"] == 256 and r["windows"] == 4


def test_scoring_the_tokenized_validation_set(tokenized_dir, sp):
    tokens, sidecar = load_val(tokenized_dir)
    vocab = sp.vocab_size()
    r = score(lambda x: torch.zeros(*x.shape, vocab), tokens, sidecar, build_luts(sp, sp.vocab_size()), 128, 32, progress=False)
    assert r["tokens_scored"] == tokens.size - 1
    assert r["sidecar_bytes"] == int(sidecar[1:].astype(np.int64).sum())  # only the first BOS is no target
    assert r["val_bpb"] == pytest.approx(r["tokens_scored"] * math.log2(vocab) / r["sidecar_bytes"], rel=1e-6)


def test_tokens_outside_the_lut_are_rejected():
    luts = _luts_for(10)
    with pytest.raises(PgolfError, match="outside"):
        score(lambda x: torch.zeros(*x.shape, 20), np.array([1, 2, 15, 3], dtype=np.uint16), None, luts, 2, 0,
              progress=False)


def test_record_segments_follow_the_record_scripts_eval_val():
    """Worked by hand: 33 tokens (four windows of 8), documents starting at 0, 3 and 20."""
    from pgolf.text.bpb import plan_record_segments

    bos = np.array([0, 3, 20])
    spans = lambda ws: [(w.start, w.end) for w in ws]  # noqa: E731
    assert all(w.first_scored == 0 for w in plan_record_segments(33, bos, 8, 1, 2))
    # one window per batch, two ranks of two windows: cut at the BOSes only
    assert spans(plan_record_segments(33, bos, 8, 1, 2)) == [(0, 3), (3, 8), (8, 16), (16, 20), (20, 24), (24, 32)]
    # batches of two windows: a document runs across the window edge, cut every 8 tokens from its start
    assert spans(plan_record_segments(33, bos, 8, 2, 1)) == [(0, 3), (3, 11), (11, 16), (16, 20), (20, 28), (28, 32)]
    # batches of three: the fourth window fills no batch and is dropped
    assert spans(plan_record_segments(33, bos, 8, 3, 1)) == [(0, 3), (3, 11), (11, 19), (19, 20), (20, 24)]
    with pytest.raises(PgolfError, match="fill no batch"):
        plan_record_segments(33, bos, 8, 5, 1)
