"""The one scoring path: every validation target's loss is recorded exactly once, under the full softmax,
with its canonical bytes, before any update that saw it.

Why a ledger: test-time training interleaves scoring with updates, and the challenge's reviewers have
rejected whole families of submissions whose adaptation saw tokens before they were scored (issues #677,
#1017 and #1082 of the challenge's repository). Here a mode cannot get that wrong:
- the targets never leave the ledger: a mode hands it windows and a logits function, the ledger builds
  the inputs, computes the cross-entropy over the full vocabulary itself and adds it to the sums;
- a target is recorded at most once (a second attempt is an error), and the BPB sums come from nothing else;
- training tokens are handed out only where every target they contain has already been recorded;
- with an n-gram mixer (ttt_eval.ngram_mix) the loss is that of its mixture of the full softmax with an
  n-gram model, taken target by target in the scoring order, each target learnt only after it is scored.
Positions are those of the validation stream: target p is token p, predicted from tokens before p.

Under torchrun every rank holds a ledger of the whole stream and scores its share of the windows; what
the others scored becomes known at `publish` (a union of the records), and `result` sums the ranks'
sums after checking that no target was scored on two ranks and that together they scored every one.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F

from pgolf.errors import PgolfError
from pgolf.nn.distributed import Dist
from pgolf.report.progress import Bar
from pgolf.text.bpb import ByteLUTs, Window, bits_per_byte, plan_windows, scored_targets, stream_lut_bytes


class ComplianceError(AssertionError):
    """A mode tried to score a target twice, or to train on a target not yet scored: a bug, never a result."""


class Ledger:
    """BPB sums over the validation stream, and which targets have been scored."""

    def __init__(self, tokens: np.ndarray, sidecar: np.ndarray | None, luts: ByteLUTs, device: torch.device | str,
                 keep_losses: bool = False, ranks: Dist | None = None, mixer=None):
        """keep_losses: also keep every target's loss (float64, 8 bytes a token) and the number of the score()
        call that recorded it (its place in the scoring order), for tests and audits. ranks: the torchrun
        group this ledger is one rank's part of (None: one process). mixer: a pgolf.ttt.ngram_mix.NgramMixer
        whose mixture of the model's softmax with an n-gram model of the targets scored so far is what is
        scored (one process only: its counts follow the scoring order)."""
        self._tokens = np.asarray(tokens)  # modes see them only through score() and training_tokens()
        self.n_tokens = self._tokens.size
        if sidecar is not None and np.shape(sidecar) != self._tokens.shape:
            raise PgolfError(f"byte sidecar has {np.size(sidecar)} entries for {self.n_tokens} tokens; "
                             "re-run `pgolf tokenize`")
        if self.n_tokens and int(self._tokens.max()) >= luts.base_bytes.size:
            raise PgolfError(f"validation token id {int(self._tokens.max())} is outside the tokenizer's "
                             f"{luts.base_bytes.size} ids; the data and tokenizer do not match")
        self.sidecar, self.device = sidecar, device
        self.lut_bytes = stream_lut_bytes(self._tokens, luts)
        self.recorded = np.zeros(self.n_tokens, dtype=bool)  # index p: target p (0 is never a target)
        self.ranks = ranks if ranks is not None and ranks.enabled else None
        if mixer is not None and self.ranks:
            raise PgolfError("ngram_mix runs in one process: its n-gram counts follow the one scoring order, and a "
                             "rank would count only its share (run ttt-eval without torchrun)")
        self.mixer = mixer
        # what this rank scored itself (`recorded` also holds what other ranks published)
        self.scored_here = np.zeros(self.n_tokens, dtype=bool) if self.ranks else self.recorded
        self.losses = np.full(self.n_tokens, np.nan) if keep_losses else None
        self.order = np.full(self.n_tokens, -1, dtype=np.int64) if keep_losses else None
        self.calls = 0
        self.violation: str | None = None  # why this evaluation is not a valid score (tokens_before_scoring)
        self.loss_sum, self.count, self.lut_sum, self.sidecar_sum = 0.0, 0, 0, 0

    # ---- scoring

    def score(self, windows: list[Window], logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Score one batch of windows: inputs tokens[start:end] (right-padded to one length), targets the
        window's positions start+1+first_scored .. end, each recorded here and nowhere else."""
        if windows:
            with torch.inference_mode():
                self._record(windows, logits_fn)

    def score_for_update(self, windows: list[Window], logits_fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Score as `score` does, with the graph kept: each window's mean loss over the targets just recorded.
        An update on it trains on nothing but scored targets, and one forward serves both (PR #1530's loop)."""
        nll, mask = self._record(windows, logits_fn)
        return (nll * mask).sum(1) / mask.sum(1)

    def _record(self, windows: list[Window], logits_fn: Callable[[torch.Tensor], torch.Tensor]
                ) -> tuple[torch.Tensor | None, torch.Tensor]:
        length = max(w.end - w.start for w in windows)
        x = np.zeros((len(windows), length), dtype=np.int64)
        y = np.zeros_like(x)
        mask = np.zeros(x.shape, dtype=bool)
        positions = []
        for row, w in enumerate(windows):
            n = w.end - w.start
            x[row, :n] = self._tokens[w.start:w.end]
            y[row, :n] = self._tokens[w.start + 1:w.end + 1]
            mask[row, w.first_scored:n] = True
            positions.append(np.arange(w.start + 1 + w.first_scored, w.end + 1))
        targets = np.concatenate(positions)  # row by row, left to right: the order mask selects in
        if self.recorded[targets].any() or np.unique(targets).size != targets.size:
            raise ComplianceError(f"a target scored a second time (batch of {len(windows)} windows from "
                                  f"position {windows[0].start})")
        logits = logits_fn(torch.from_numpy(x).to(self.device))
        if tuple(logits.shape[:2]) != x.shape:
            raise PgolfError(f"model returned logits of shape {tuple(logits.shape)} for inputs {x.shape}")
        y_t, mask_t = torch.from_numpy(y).to(logits.device), torch.from_numpy(mask).to(logits.device)
        if self.mixer is None:
            nll = F.cross_entropy(logits.float().flatten(0, 1), y_t.flatten(), reduction="none").view(y_t.shape)
            scored = nll.detach().double()[mask_t]
        else:  # the n-gram mixture, row by row, left to right (the order mask selects in)
            if torch.is_grad_enabled():
                raise ComplianceError("an n-gram mixture is scored, never trained through (ttt none or score_first)")
            nll = None
            scored = torch.cat([self._mixed_nll(logits[row], x[row], y[row], w) for row, w in enumerate(windows)])
        self.loss_sum += float(scored.sum())
        self.recorded[targets] = True
        self.scored_here[targets] = True
        if self.losses is not None:
            self.losses[targets] = scored.cpu().numpy()
            self.order[targets] = self.calls
        self.calls += 1
        self.count += targets.size
        self.lut_sum += int(self.lut_bytes[targets].sum(dtype=np.int64))
        if self.sidecar is not None:
            self.sidecar_sum += int(self.sidecar[targets].sum(dtype=np.int64))
        return nll, mask_t

    def _mixed_nll(self, logits: torch.Tensor, inputs: np.ndarray, targets: np.ndarray, w: Window) -> torch.Tensor:
        """One window's scored targets under the mixer: −ln of the mixture of the float64 softmax over the full
        vocabulary with the n-gram model, which learns each target once its loss is taken."""
        n = w.end - w.start
        log_p = torch.log_softmax(logits[w.first_scored:n].double(), dim=-1)
        return self.mixer.window_nll(log_p, inputs[:n], w.first_scored, targets[w.first_scored:n])

    # ---- sharing the work between ranks

    @property
    def main(self) -> bool:
        """The rank that reports (progress, messages): rank 0, or the only process."""
        return self.ranks is None or self.ranks.main

    def share(self, items: list) -> list:
        """This rank's part of a work list (windows, batches, documents) that every rank built alike."""
        return self.ranks.mine(items) if self.ranks else items

    def publish(self, start: int = 0, end: int | None = None) -> None:
        """Every rank learns which of targets start..end-1 any rank has recorded (a collective: all ranks call
        it together), so an update on one rank may train on targets another scored."""
        if self.ranks:
            end = self.n_tokens if end is None else end
            union = torch.from_numpy(self.recorded[start:end].astype(np.uint8)).to(self.ranks.device)
            self.recorded[start:end] = self.ranks.all_reduce_(union, op="max").cpu().numpy().astype(bool)

    # ---- what an update may see

    def training_tokens(self, start: int, end: int) -> torch.Tensor:
        """tokens[start:end] for an update, which trains on targets start+1..end-1: all must be recorded."""
        if not 0 <= start < end <= self.n_tokens:
            raise ComplianceError(f"training span [{start}, {end}) is outside the stream")
        if not self.recorded[start + 1:end].all():
            first = start + 1 + int(np.flatnonzero(~self.recorded[start + 1:end])[0])
            raise ComplianceError(f"an update asked for target {first}, which has not been scored yet")
        return torch.from_numpy(self._tokens[start:end].astype(np.int64))

    def tokens_before_scoring(self, start: int, end: int, reason: str) -> torch.Tensor:
        """tokens[start:end], scored or not, for a published protocol that trains before it scores, reproduced
        only to be flagged: from here on this ledger's evaluation is non-compliant, for `reason`."""
        if not 0 <= start < end <= self.n_tokens:
            raise ComplianceError(f"training span [{start}, {end}) is outside the stream")
        self.violation = reason
        return torch.from_numpy(self._tokens[start:end].astype(np.int64))

    def document_starts(self, bos_id: int) -> np.ndarray:
        """Positions of every BOS: where documents start (window plans cut there), nothing else of the text."""
        return np.flatnonzero(self._tokens == bos_id)

    def documents(self, bos_id: int) -> list[tuple[int, int]]:
        """[start, end) of every document: from its BOS to the next BOS inclusive (its last target is the
        next document's BOS, as the record's evaluation counts it); the last one to the stream's end."""
        starts = self.document_starts(bos_id)
        if starts.size == 0 or starts[0] != 0:
            starts = np.concatenate([[0], starts])
        ends = np.concatenate([starts[1:] + 1, [self.n_tokens]])
        return [(int(a), int(b)) for a, b in zip(starts, ends) if b - a >= 2]

    def running_bpb(self) -> float | None:
        n_bytes = self.sidecar_sum if self.sidecar is not None else self.lut_sum
        return self.loss_sum / (math.log(2) * n_bytes) if n_bytes else None

    # ---- the result

    def result(self, expected_targets: int | None = None) -> dict:
        """The BPB accounting (val_loss, tokens_scored, byte sums, val_bpb_*), after checking every planned target was scored."""
        want = expected_targets if expected_targets is not None else self.n_tokens - 1
        if self.ranks:
            self._merge_ranks()
        if self.count != want:
            raise ComplianceError(f"{self.count} targets scored, {want} planned")
        if not math.isfinite(self.loss_sum):
            raise PgolfError("the model produced non-finite loss on the validation set; the weights are broken")
        if self.count == 0:
            raise PgolfError("nothing was scored")
        sidecar = self.sidecar is not None
        out = {
            "val_loss": self.loss_sum / self.count,
            "tokens_scored": self.count,
            "lut_bytes": self.lut_sum,
            "sidecar_bytes": self.sidecar_sum if sidecar else None,
            "val_bpb_lut": bits_per_byte(self.loss_sum, self.lut_sum),
            "val_bpb_sidecar": bits_per_byte(self.loss_sum, self.sidecar_sum) if sidecar else None,
        }
        out["val_bpb"] = out["val_bpb_sidecar"] if sidecar else out["val_bpb_lut"]
        return out

    def _merge_ranks(self) -> None:
        """The ranks' sums added up (in float64), after checking no target was scored on two ranks."""
        times = torch.from_numpy(self.scored_here.astype(np.uint8)).to(self.ranks.device)
        if int(self.ranks.all_reduce_(times).max()) > 1:
            raise ComplianceError("a target was scored on two ranks")
        sums = torch.tensor([self.loss_sum, self.count, self.lut_sum, self.sidecar_sum], dtype=torch.float64,
                            device=self.ranks.device)
        loss_sum, count, lut_sum, sidecar_sum = self.ranks.all_reduce_(sums).tolist()
        self.loss_sum, self.count, self.lut_sum, self.sidecar_sum = loss_sum, int(count), int(lut_sum), int(sidecar_sum)
        self.ranks = None  # merged: a second result() must not add the sums again


def batches_of(windows: Iterable[Window], batch_seqs: int, same_length: bool = True) -> list[list[Window]]:
    """Consecutive windows, at most batch_seqs per batch, of equal length (no padding wasted) unless
    same_length is off (document segments: the ledger right-pads each row, which a causal model never sees)."""
    batches: list[list[Window]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if last and len(last) < batch_seqs and (not same_length or (last[0].end - last[0].start) == (w.end - w.start)):
            last.append(w)
        else:
            batches.append([w])
    return batches


def score(logits_fn: Callable[[torch.Tensor], torch.Tensor], tokens: np.ndarray, sidecar: np.ndarray | None,
          luts: ByteLUTs, *, seq_len: int, stride: int, val_tokens: int, batch_seqs: int, device: str | torch.device,
          progress: bool) -> dict:
    """Score `tokens` with `logits_fn(x[B,T]) -> logits[B,T,V]` over the planned windows, no adaptation.

    Returns val_loss (nats/token), tokens_scored, windows, seq_len, stride, LUT and sidecar byte sums,
    val_bpb_lut, val_bpb_sidecar (None without a sidecar) and val_bpb (the sidecar's when present: the
    canonical one; else the LUT's).
    """
    ledger = Ledger(tokens, sidecar, luts, device)
    windows = plan_windows(ledger.n_tokens, seq_len, stride, val_tokens)
    score_windows(ledger, windows, logits_fn, batch_seqs, progress)
    return {**ledger.result(scored_targets(windows)), "windows": len(windows), "seq_len": seq_len, "stride": stride}


def score_windows(ledger: Ledger, windows: list[Window], logits_fn: Callable[[torch.Tensor], torch.Tensor],
                  batch_seqs: int, progress: bool, same_length: bool = True) -> None:
    """Every window scored in batches of `batch_seqs` (this rank's share of them), the running BPB on the
    progress bar."""
    mine = ledger.share(batches_of(windows, batch_seqs, same_length))
    with Bar("scoring", sum(map(len, mine)), "windows", enabled=progress and ledger.main) as bar:
        for batch in mine:
            ledger.score(batch, logits_fn)
            running = ledger.running_bpb()
            bar.advance(len(batch), f"bpb {running:.4f} so far" if running is not None else None)
