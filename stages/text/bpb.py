"""Bits per byte: byte accounting (tokenizer LUT and canonical sidecar), window plans, and scoring.

BPB = Σ CE_t / (ln 2 · Σ bytes_t) over every scored target t (the challenge's train_gpt.py): natural-log
cross-entropy over the full softmax, sums in float64. Each target position 1..N-1 of the validation
stream is scored at most once; `plan_windows` decides which, and checks it.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

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


def score(logits_fn: Callable[[torch.Tensor], torch.Tensor], tokens: np.ndarray, sidecar: np.ndarray | None,
          luts: ByteLUTs, *, seq_len: int, stride: int, val_tokens: int, batch_seqs: int, device: str | torch.device,
          progress: bool) -> dict:
    """Score `tokens` with `logits_fn(x[B,T]) -> logits[B,T,V]` over the planned windows.

    Returns val_loss (nats/token), tokens_scored, LUT and sidecar byte sums, val_bpb_lut, val_bpb_sidecar
    (None without a sidecar) and val_bpb (the sidecar's when present: the canonical one; else the LUT's).
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    tokens = np.asarray(tokens)
    if sidecar is not None and np.shape(sidecar) != tokens.shape:
        raise PgolfError(f"byte sidecar has {np.size(sidecar)} entries for {tokens.size} tokens; "
                         "re-run `pgolf tokenize`")
    if tokens.size and int(tokens.max()) >= luts.base_bytes.size:
        raise PgolfError(f"validation token id {int(tokens.max())} is outside the tokenizer's "
                         f"{luts.base_bytes.size} ids; the data and tokenizer do not match")
    windows = plan_windows(tokens.size, seq_len, stride, val_tokens)
    lut_bytes = stream_lut_bytes(tokens, luts)

    loss_sum, n_scored, lut_sum, side_sum = 0.0, 0, 0, 0
    batches = _batches(windows, batch_seqs)
    with Progress(TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("windows"),
                  TimeRemainingColumn(), disable=not progress, transient=True) as bar:
        task = bar.add_task("score", total=len(windows))
        with torch.inference_mode():
            for batch in batches:
                x = _rows(tokens, batch, 0).to(device)
                y = _rows(tokens, batch, 1).to(device)
                logits = logits_fn(x)
                if logits.shape[:2] != x.shape:
                    raise PgolfError(f"model returned logits of shape {tuple(logits.shape)} for inputs "
                                     f"{tuple(x.shape)}")
                nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
                mask = torch.zeros_like(y, dtype=torch.bool)
                for row, w in enumerate(batch):
                    mask[row, w.first_scored:] = True
                loss_sum += float(nll.double()[mask].sum())
                for w in batch:
                    scored = slice(w.start + 1 + w.first_scored, w.end + 1)  # global target positions
                    n_scored += scored.stop - scored.start
                    lut_sum += int(lut_bytes[scored].sum(dtype=np.int64))
                    if sidecar is not None:
                        side_sum += int(sidecar[scored].sum(dtype=np.int64))
                bar.advance(task, len(batch))

    if not math.isfinite(loss_sum):
        raise PgolfError("the model produced non-finite loss on the validation set; the weights are broken")
    result = {
        "val_loss": loss_sum / n_scored,
        "tokens_scored": n_scored,
        "windows": len(windows),
        "seq_len": seq_len,
        "stride": stride,
        "lut_bytes": lut_sum,
        "sidecar_bytes": side_sum if sidecar is not None else None,
        "val_bpb_lut": bits_per_byte(loss_sum, lut_sum),
        "val_bpb_sidecar": bits_per_byte(loss_sum, side_sum) if sidecar is not None else None,
    }
    result["val_bpb"] = result["val_bpb_sidecar"] if sidecar is not None else result["val_bpb_lut"]
    return result


def bits_per_byte(nats_sum: float, n_bytes: int) -> float:
    if n_bytes <= 0:
        raise PgolfError("the scored validation targets hold no bytes; BPB is undefined (validation text empty?)")
    return nats_sum / (math.log(2) * n_bytes)


def _rows(tokens: np.ndarray, batch: list[Window], shift: int) -> torch.Tensor:
    """The batch's inputs (shift 0) or targets (shift 1) as a LongTensor [B, T]."""
    return torch.from_numpy(np.stack([tokens[w.start + shift:w.end + shift] for w in batch]).astype(np.int64))


def _batches(windows: list[Window], batch_seqs: int) -> list[list[Window]]:
    """Consecutive windows of equal length, at most batch_seqs per batch."""
    batches: list[list[Window]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_seqs and (last[0].end - last[0].start) == (w.end - w.start):
            last.append(w)
        else:
            batches.append([w])
    return batches
