"""The byte-denominator audit: from a claim's loss, token count and BPB, the byte count it divided by.

BPB = loss / ln 2 × tokens / bytes, so bytes = loss / ln 2 × tokens / BPB — the one line of arithmetic that
found PR #2071's inflated denominator in review. That implied count is compared with what the validation
text holds over the same targets: the canonical count (the sidecar's original bytes; the tokenizer-LUT
count where the data has no sidecar), and the counts the catalogued mistakes give (MISTAKES). Each
verdict carries its derivation; the precision allowed is what the printed decimals leave, not a guess.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pgolf.audit.challenge_claims import Run
from pgolf.text.bpb import record_batches, stream_lut_bytes
from pgolf.text.evaluate import EvalData


@dataclass(frozen=True)
class Counts:
    """Byte counts over targets 1..n of the validation stream."""

    n: int
    canonical: int  # the sidecar's original-text bytes, or the LUT count without a sidecar
    lut: int  # the tokenizer-LUT count (the baseline script's rule)
    leading_space: int  # targets whose piece carries a leading space
    has_sidecar: bool


def byte_counts(data: EvalData, ranges: list[tuple[int, int]]) -> Counts:
    """Counts over the targets in `ranges` ([a, b) positions of the validation stream)."""
    targets = np.concatenate([np.arange(a, b) for a, b in ranges]) if ranges else np.zeros(0, dtype=np.int64)
    lut = stream_lut_bytes(data.tokens, data.luts)[targets]
    lead = data.luts.has_leading_space[np.asarray(data.tokens, dtype=np.int64)[targets]]
    canonical = data.sidecar[targets].sum(dtype=np.int64) if data.sidecar is not None else lut.sum()
    return Counts(targets.size, int(canonical), int(lut.sum()), int(lead.sum()), data.sidecar is not None)


def scored_targets(run: Run) -> tuple[list[tuple[int, int]], str]:
    """The target ranges the claim's score covers, and the rule that says so ('' for the first N): the
    record scripts' diagnostic scores drop windows (Run.record_eval), so they cover fewer targets than the
    val_tokens they print."""
    record = run.record_eval()
    if record is None:
        return [(1, run.tokens + 1)], ""
    world, per_batch, seq_len = record
    span = per_batch * seq_len  # targets a+1 .. a+span of the batch starting at token a
    ranges = [(a + 1, a + span + 1) for a in record_batches(run.tokens + 1, seq_len, per_batch, world)]
    rule = (f"the record script's eval_val scores per rank whole batches of {per_batch} windows of {seq_len} "
            f"(world size {world}, from the log's hyperparameters)")
    return ranges, rule


@dataclass(frozen=True)
class Mistake:
    name: str
    how: str
    count: Callable[[Counts], int]
    applies: Callable[[Counts], bool] = lambda c: True


MISTAKES = (
    Mistake("CaseOps data scored with tokenizer-LUT bytes",
            "the LUT counts the case-transformed text (operators in, capitals lowercased), not the original "
            "bytes the sidecar holds (PR #2071's review: caseops_enabled False on CaseOps shards)",
            lambda c: c.lut, lambda c: c.has_sidecar and c.lut != c.canonical),
    Mistake("leading space counted twice",
            "each piece's leading space counted once in the piece and again by the space rule (PR #1804's audit)",
            lambda c: c.lut + c.leading_space),
)

# the loaders' truncation: whole windows of these lengths (the baseline: seq_len 1024; the records: 2048)
WINDOW_UNITS = (1024, 2048, 4096)


def implied_bytes(run: Run, tokens: int) -> tuple[float, float]:
    """(bytes the claim divided by, ± what its printed decimals allow), over `tokens` scored targets."""
    loss, bpb = run.val_loss, run.val_bpb
    value = loss / math.log(2) * tokens / bpb
    relative = 0.5 * 10 ** -run.decimals[0] / loss + 0.5 * 10 ** -run.decimals[1] / bpb
    return value, value * relative + 1.0


def _truncation(n: int, full: int) -> str:
    for unit in WINDOW_UNITS:
        if n == full // unit * unit:
            return f"; {n:,} is the full {full:,} cut to whole {unit}-token windows (a loader's truncation rule)"
    return ""


def audit_run(run: Run, data: EvalData) -> tuple[bool, str]:
    """(passed, the derivation and verdict) for one run that states val_loss, tokens and val_bpb."""
    full = data.tokens.size - 1
    ranges, rule = scored_targets(run)
    n = sum(b - a for a, b in ranges)
    implied, slack = implied_bytes(run, n)
    scored = f" ({rule}: {n:,} of the {run.tokens:,} it loaded)" if rule else ""
    derivation = (f"{run.source}: implied bytes = val_loss {run.val_loss} / ln 2 × {n:,} tokens{scored} / val_bpb "
                  f"{run.val_bpb} = {implied:,.0f} (± {slack:,.0f} from the printed decimals)")
    if run.tokens > full:
        return False, (f"{derivation}; but this validation set has {full:,} targets: a different tokenizer or "
                       "validation set")
    counts = byte_counts(data, ranges)
    kind = "sidecar" if counts.has_sidecar else "LUT"
    which = "those" if rule else f"the first {n:,}"
    canonical = f"canonical ({kind}) bytes of {which} targets = {counts.canonical:,}"
    real = run.val_loss / math.log(2) * n / counts.canonical
    if abs(implied - counts.canonical) <= slack:
        if n == full:
            return True, f"{derivation} = {canonical}"
        return False, (f"{derivation} = {canonical}, but a partial validation set: {n:,} of {full:,} "
                       f"targets ({n / full:.2%}){_truncation(n, full)}")
    inflation = implied - counts.canonical
    verdict = (f"{derivation} ≠ {canonical}: {inflation:+,.0f} bytes ({inflation / counts.canonical:+.2%}); "
               f"over the canonical bytes the claim is val_bpb {real:.6f}")
    for mistake in MISTAKES:
        if mistake.applies(counts) and abs(implied - mistake.count(counts)) <= slack:
            flag = " (the log says caseops_enabled: False)" if run.caseops is False and counts.has_sidecar else ""
            partial = f"; and only {n:,} of {full:,} targets" if n != full else ""
            return False, (f"{verdict}. Cause: {mistake.name}{flag} — {mistake.how}; that count is "
                           f"{mistake.count(counts):,}{partial}")
    if n != full:
        return False, f"{verdict}. {n:,} targets against {full:,} here: a different tokenizer or validation set"
    return False, f"{verdict}. No catalogued cause fits"
