"""Train-then-score (PR #398's published protocol), kept to reproduce that number and flag it.

It trains every weight on the validation tokens for `ttt_epochs` passes (SGD, `ttt_lr`, `ttt_momentum`,
`ttt_batch_seqs` sequences of seq_len per step, clipping at `ttt_grad_clip`, at most `ttt_max_steps`
steps) and only then scores them: every target is seen by an update before its loss is recorded, which the
challenge's reviewers ruled out (issues #402 and #677). The ledger hands these tokens out only through
`tokens_before_scoring`, which marks the evaluation non-compliant; the metrics say so and verify refuses
a claim made this way.
"""

from __future__ import annotations

import torch

from pgolf.config.sections import NONCOMPLIANT_TTT, EvalConfig
from pgolf.nn.model import GPT, scoring_logits
from pgolf.text.bpb import plan_windows, scored_targets
from pgolf.text.ledger import Ledger, score_windows
from pgolf.ttt.score_first import train_on


def train_then_score(model: GPT, ledger: Ledger, cfg: EvalConfig, device: torch.device, deadline: float | None) -> dict:
    """Train on the (first val_tokens of the) validation stream, then score it; returns what it did."""
    windows = plan_windows(ledger.n_tokens, cfg.seq_len, cfg.stride, cfg.val_tokens)
    tokens = ledger.tokens_before_scoring(0, windows[-1].end + 1, NONCOMPLIANT_TTT["train_then_score"])
    params = [p for p in model.parameters()]
    optimizer = torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
    steps, seen = (0, 0) if cfg.ttt_lr == 0 else train_on(model, tokens, cfg, optimizer, device,
                                                          cfg.ttt_max_steps or None, cfg.ttt_epochs, ledger.ranks)
    model.eval()
    score_windows(ledger, windows, scoring_logits(model, device), cfg.batch_seqs, progress=ledger.main)
    return {"steps": steps, "tokens_adapted": seen, "expected_targets": scored_targets(windows)}
