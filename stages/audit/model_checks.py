"""Model-level compliance checks on decoded weights: cheap (a few hundred validation tokens, one forward
each), through the model's own forward, so they hold for whatever the artifact computes. The two that compare
forwards run a float32 copy: bf16 rounds two sequence lengths differently, enough to look like a leak.

- causality (condition C1 of the challenge's rules, issue #1017): changing a token changes no logit at
  an earlier position;
- document isolation: a document's logits are the same whether or not another document precedes it in
  the window — the SmearGate BOS leak (one document's last token mixed into the next document's BOS,
  fixed in PR #1851) fails it; only for models that mask attention at document starts (the others attend
  across documents by design);
- a normalised distribution (C2): every logit is finite, so the softmax over the full vocabulary sums to 1,
  and the loss the scoring path records equals −log of that softmax at the target, recomputed in float64;
  for a claim scored with an n-gram mixture (ttt_eval.ngram_mix), the same of the mixture.
"""

from __future__ import annotations

import numpy as np
import torch

from pgolf.errors import PgolfError
from pgolf.nn.model import GPT, scoring_logits
from pgolf.text.bpb import Window
from pgolf.text.evaluate import EvalData
from pgolf.text.ledger import Ledger

SAMPLE_TOKENS = 256
TOLERANCE = 1e-4  # × the largest |logit|: float noise between two batch shapes, far below any leak


def sample(data: EvalData, n: int = SAMPLE_TOKENS) -> np.ndarray:
    return np.asarray(data.tokens[:n + 1], dtype=np.int64)


def boundary_sample(data: EvalData, bos_id: int, n: int = SAMPLE_TOKENS) -> np.ndarray | None:
    """n + 1 tokens with the stream's first document start (after position 0) in the middle: long documents
    (Wikipedia's run to thousands of tokens) put none in the first n. None: the stream is one document."""
    starts = np.flatnonzero(np.asarray(data.tokens[1:]) == bos_id)
    if not starts.size:
        return None
    first = max(0, int(starts[0]) + 1 - n // 2)
    return np.asarray(data.tokens[first:first + n + 1], dtype=np.int64)


def _logits(model: GPT, tokens: np.ndarray, device: torch.device, exact: bool = False) -> torch.Tensor:
    """The scoring path's logits; exact: the model as it is, no autocast (causality and isolation get a
    float32 copy, so two forwards of different lengths differ by float32 noise only)."""
    x = torch.from_numpy(tokens)[None].to(device)
    with torch.inference_mode():
        return (model.logits(x) if exact else scoring_logits(model, device)(x))[0].double().cpu()


def _gap(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(largest |a − b|, allowed)."""
    return float((a - b).abs().max()) if a.numel() else 0.0, TOLERANCE * max(float(a.abs().max()), 1.0)


def causality(model: GPT, tokens: np.ndarray, device: torch.device) -> str:
    x = tokens[:-1]
    at = x.size // 2
    changed = x.copy()
    changed[at] = (changed[at] + 1) % model.cfg.vocab_size
    before, after = _logits(model, x, device, exact=True), _logits(model, changed, device, exact=True)
    gap, allowed = _gap(before[:at], after[:at])
    moved = float((before[at:] - after[at:]).abs().max())
    if gap > allowed:
        raise PgolfError(f"changing token {at} moved the logits of earlier positions by up to {gap:.3g} (allowed "
                         f"{allowed:.3g}): the model sees the future")
    return (f"token {at} of {x.size} changed: earlier logits moved ≤ {gap:.2g} (allowed {allowed:.2g}), "
            f"later ones by up to {moved:.3g}")


def document_isolation(model: GPT, tokens: np.ndarray, device: torch.device) -> str:
    bos = model.cfg.bos_id
    starts = [int(i) for i in np.flatnonzero(tokens[:-1] == bos) if i > 0]
    if not starts:
        raise PgolfError(f"no document start (BOS) after the first of these {tokens.size} tokens to test with")
    b = starts[0]
    x = tokens[:-1]
    together = _logits(model, x, device, exact=True)[b:]
    alone = _logits(model, x[b:], device, exact=True)
    gap, allowed = _gap(together, alone)
    if gap > allowed:
        raise PgolfError(f"the document at token {b} scores differently after the previous one (logits differ by up "
                         f"to {gap:.3g}, allowed {allowed:.3g}): information leaks across the BOS (e.g. a "
                         "SmearGate or bigram without the BOS fix)")
    return (f"the document at token {b}: logits after the previous document = alone (≤ {gap:.2g}, allowed "
            f"{allowed:.2g})")


def normalised(model: GPT, tokens: np.ndarray, data: EvalData, device: torch.device, mixer=None) -> str:
    """mixer: a callable giving a fresh pgolf.ttt.ngram_mix.NgramMixer, for a claim scored with one."""
    logits = _logits(model, tokens[:-1], device)
    if not torch.isfinite(logits).all():
        raise PgolfError("the model produces non-finite logits: no proper distribution over the vocabulary")
    log_p = torch.log_softmax(logits, dim=-1)
    total = float(log_p.exp().sum(-1).sub(1).abs().max())
    targets = torch.from_numpy(tokens[1:])
    what = f"{logits.shape[1]:,}-way softmax"
    if mixer is not None:  # the distribution scored is the mixture, built as the ledger builds it
        mixed = mixer().mix_window(log_p, tokens[:-1], 0, tokens[1:])
        if not bool((mixed > 0).all()):
            raise PgolfError("the n-gram mixture gives some token probability 0: no proper distribution")
        log_p, what = mixed.log(), f"{logits.shape[1]:,}-way n-gram mixture"
        total = max(total, float(mixed.sum(-1).sub(1).abs().max()))
    expected = -log_p.gather(1, targets[:, None]).squeeze(1)
    ledger = Ledger(tokens, None, data.luts, device, keep_losses=True, mixer=mixer() if mixer is not None else None)
    ledger.score([Window(0, tokens.size - 1, 0)], scoring_logits(model, device))
    recorded = torch.from_numpy(ledger.losses[1:])
    gap = float((recorded - expected).abs().max())
    if total > 1e-9 or gap > 1e-4:
        raise PgolfError(f"the scoring path is not the full {what}: Σp − 1 up to {total:.2g}, recorded loss vs "
                         f"−log p up to {gap:.2g}")
    return (f"{what} sums to 1 (|Σp − 1| ≤ {total:.1g}); recorded loss = −log p(target) "
            f"(≤ {gap:.1g}) on {tokens.size - 1} targets")


def same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> str:
    differ = sorted(k for k in first if k not in second or not torch.equal(first[k], second[k]))
    if differ or set(second) - set(first):
        raise PgolfError(f"two decodes of the artifact differ: {differ[:5]}")
    return f"two decodes give identical weights ({len(first)} tensors)"

