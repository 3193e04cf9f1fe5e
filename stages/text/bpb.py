"""Bits per byte: byte accounting (tokenizer LUT and canonical sidecar) and window plans.

BPB = Σ CE_t / (ln 2 · Σ bytes_t) over every scored target t (the challenge's train_gpt.py): natural-log
cross-entropy over the full softmax, sums in float64. Each target position 1..N-1 of the validation
stream is scored at most once; `plan_windows` decides which, and checks it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from pgolf.errors import PgolfError


class ByteLUTs(NamedTuple):
    base_bytes: np.ndarray  # int16[V]
    has_leading_space: np.ndarray  # bool[V]
    is_boundary: np.ndarray  # bool[V]


def build_luts(sp, vocab_size: int) -> ByteLUTs:
    """The reference's byte tables (train_gpt.py's build_sentencepiece_luts) over max(sp vocab, vocab_size)
    ids (a model may have more ids than its tokenizer).

    base_bytes: 0 for control/unknown/unused ids, 1 for byte-fallback pieces, else the UTF-8 length of
    the piece with one leading '▁' removed. is_boundary: control, unknown and unused ids (BOS included).
    """
    sp_vocab = int(sp.vocab_size())
    size = max(sp_vocab, int(vocab_size))
    base = np.zeros(size, dtype=np.int16)
    lead = np.zeros(size, dtype=bool)
    boundary = np.ones(size, dtype=bool)  # ids past the tokenizer's vocabulary are unused
    for i in range(sp_vocab):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            continue
        boundary[i] = False
        if sp.is_byte(i):
            base[i] = 1
            continue
        piece = sp.id_to_piece(i)
        if piece.startswith("▁"):
            lead[i] = True
            piece = piece[1:]
        base[i] = len(piece.encode("utf-8"))
    return ByteLUTs(base, lead, boundary)


def lut_byte_counts(prev_ids: np.ndarray, target_ids: np.ndarray, luts: ByteLUTs) -> np.ndarray:
    """bytes(t | p) = base_bytes[t] + [has_leading_space[t] and not is_boundary[p]], as int64."""
    prev_ids = np.asarray(prev_ids, dtype=np.int64)
    target_ids = np.asarray(target_ids, dtype=np.int64)
    space = luts.has_leading_space[target_ids] & ~luts.is_boundary[prev_ids]
    return luts.base_bytes[target_ids].astype(np.int64) + space


def stream_lut_bytes(tokens: np.ndarray, luts: ByteLUTs) -> np.ndarray:
    """LUT bytes of every target position of a token stream; entry 0 (no previous token) is 0.

    int32 (a piece is at most a few dozen bytes) keeps a 60M-token validation stream at 240 MB; sum
    with dtype=np.int64.
    """
    tokens = np.asarray(tokens)
    out = np.zeros(tokens.size, dtype=np.int32)
    if tokens.size > 1:
        out[1:] = lut_byte_counts(tokens[:-1], tokens[1:], luts)
    return out


class Window(NamedTuple):
    start: int  # inputs are tokens[start:end], targets tokens[start+1:end+1]
    end: int
    first_scored: int  # targets at offsets >= this are scored (global positions start+1+first_scored .. end)


def plan_windows(n_tokens: int, seq_len: int, stride: int, max_targets: int = 0) -> list[Window]:
    """Windows that score target positions 1..T exactly once, in order.

    stride 0: the reference — non-overlapping seq_len windows over the stream truncated to
    T = (N-1)//seq_len·seq_len targets (a stream shorter than one window is scored as one short window).
    stride S: the first window scores all its targets; each later window ends S targets further (the
    last one at the stream's end) and scores only targets not scored yet, with as much context as
    seq_len allows. max_targets > 0 keeps only the first max_targets targets (stride 0: whole windows).
    """
    if seq_len < 1 or stride < 0 or stride > seq_len:
        raise PgolfError(f"bad eval windows: seq_len {seq_len}, stride {stride}; need seq_len >= 1 and "
                         "0 <= stride <= seq_len")
    total = n_tokens - 1
    if max_targets > 0:
        total = min(total, max_targets)
    if total < 1:
        raise PgolfError(f"nothing to score: {n_tokens} validation tokens (need at least 2)")
    windows: list[Window] = []
    if stride == 0:
        if total >= seq_len:
            total = total // seq_len * seq_len  # the reference drops the tail that fills no whole window
        windows.extend(Window(s, min(s + seq_len, total), 0) for s in range(0, total, seq_len))
    else:
        scored = min(seq_len, total)
        windows.append(Window(0, scored, 0))
        while scored < total:
            end = min(scored + stride, total)
            start = max(0, end - seq_len)
            windows.append(Window(start, end, scored - start))
            scored = end
    _check_plan(windows, seq_len, total)
    return windows


def record_batches(n_tokens: int, seq_len: int, batch_seqs: int, ranks: int) -> list[int]:
    """Where each batch the record scripts' eval_val scores starts (PR #1855; the "diagnostic" lines of its
    log): the stream cut to whole seq_len windows; each of `ranks` ranks takes its share of them and scores
    whole batches of `batch_seqs` windows (batch_seqs·seq_len tokens), dropping the rest."""
    if seq_len < 1 or batch_seqs < 1 or ranks < 1:
        raise PgolfError(f"bad record windows: seq_len {seq_len}, batch_seqs {batch_seqs}, ranks {ranks}")
    n_windows = (n_tokens - 1) // seq_len
    starts = []
    for rank in range(ranks):
        first, last = n_windows * rank // ranks, n_windows * (rank + 1) // ranks
        last = first + (last - first) // batch_seqs * batch_seqs
        starts.extend(w * seq_len for w in range(first, last, batch_seqs))
    return starts


def plan_record_segments(n_tokens: int, bos_positions: np.ndarray, seq_len: int, batch_seqs: int, ranks: int
                         ) -> list[Window]:
    """The record scripts' eval_val as windows, to re-score a logged number exactly: each of its batches
    (record_batches) is one packed sequence whose attention is cut at every BOS and every seq_len tokens from
    a document start, so each segment is scored alone, from its own first token. Every target at most once,
    not every target."""
    bos_positions = np.asarray(bos_positions)
    windows: list[Window] = []
    for a in record_batches(n_tokens, seq_len, batch_seqs, ranks):
        b = a + batch_seqs * seq_len
        inside = bos_positions[(bos_positions > a) & (bos_positions < b)]
        starts = [a] + inside.tolist() + [b]
        for s, e in zip(starts[:-1], starts[1:]):  # a document, in pieces of at most seq_len
            windows.extend(Window(p, min(p + seq_len, e), 0) for p in range(s, e, seq_len))
    if not windows:
        raise PgolfError(f"nothing to score: {n_tokens:,} validation tokens fill no batch of {batch_seqs} "
                         f"windows of {seq_len} on each of {ranks} ranks")
    for prev, w in zip(windows, windows[1:]):  # in order, disjoint, each within one window's length
        if not (prev.end <= w.start and 0 < w.end - w.start <= seq_len):
            raise AssertionError(f"record window plan is broken at {w}")
    return windows


def scored_targets(windows: list[Window]) -> int:
    """How many targets the windows score."""
    return sum(w.end - w.start - w.first_scored for w in windows)


def _check_plan(windows: list[Window], seq_len: int, total: int) -> None:
    """Each target scored once: consecutive windows' scored ranges must tile 1..total, no gap or overlap."""
    next_target = 1
    for w in windows:
        first = w.start + 1 + w.first_scored
        if not (0 <= w.start < w.end and w.end - w.start <= seq_len and 0 <= w.first_scored < w.end - w.start) \
                or first != next_target:
            raise AssertionError(f"window plan is broken at {w} (expected first scored target {next_target})")
        next_target = w.end + 1
    if next_target != total + 1:
        raise AssertionError(f"window plan scores targets 1..{next_target - 1}, expected 1..{total}")


def bits_per_byte(nats_sum: float, n_bytes: int) -> float:
    if n_bytes <= 0:
        raise PgolfError("the scored validation targets hold no bytes; BPB is undefined (validation text empty?)")
    return nats_sum / (math.log(2) * n_bytes)
