"""Score-first full-model TTT (PR #549; the R0409 record's settings in PR #1855's lineage).

The validation stream is cut into chunks of `ttt_chunk_tokens` targets. For chunk c: every window whose
first scored target lies in c is scored (the ledger records those targets); then, unless c is the last
chunk, the model trains on chunk c's tokens — which the ledger hands out only because they are scored —
with SGD (momentum, LR η·½(1 + cos(π·c/(C−1))), `ttt_epochs` passes, gradient clipping). What adapts: every
weight, all but the first `ttt_freeze_blocks` blocks (PR #212's freeze_blocks), or, with `ttt_mlp_only`,
only the MLPs of the blocks not frozen (PR #375's variant); `ttt_max_steps` caps the optimizer steps.
"""

from __future__ import annotations

import math
import time

import torch

from pgolf.config.sections import EvalConfig
from pgolf.nn.distributed import Dist
from pgolf.nn.model import GPT, autocast_for, scoring_logits
from pgolf.report.progress import Bar
from pgolf.text.bpb import Window, plan_windows, scored_targets
from pgolf.text.ledger import Ledger, batches_of


def adapted_parameters(model: GPT, cfg: EvalConfig) -> list[torch.nn.Parameter]:
    """The parameters TTT updates; the others are frozen (requires_grad off)."""
    if cfg.ttt_freeze_blocks == 0 and not cfg.ttt_mlp_only:
        adapted = model
    else:
        adapted = torch.nn.ModuleList(block.mlp if cfg.ttt_mlp_only else block
                                      for block in model.blocks[cfg.ttt_freeze_blocks:])
    keep = {id(p) for p in adapted.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    return [p for p in model.parameters() if id(p) in keep]


def chunk_windows(windows: list[Window], chunk_tokens: int) -> list[list[Window]]:
    """Windows grouped by the chunk of their first scored target (targets 1..T; chunk c holds c·n+1 .. (c+1)·n)."""
    last = windows[-1].end
    chunks: list[list[Window]] = [[] for _ in range(max(1, -(-last // chunk_tokens)))]
    for w in windows:
        chunks[(w.start + w.first_scored) // chunk_tokens].append(w)
    return chunks


def train_on(model: GPT, tokens: torch.Tensor, cfg: EvalConfig, optimizer: torch.optim.Optimizer,
             device: torch.device, steps_left: int | None, epochs: int, ranks: Dist | None = None) -> tuple[int, int]:
    """`epochs` passes over `tokens` cut into sequences of seq_len targets; (steps taken, tokens seen).
    Under torchrun each batch's sequences are split between the ranks and the gradients summed, weighted so
    that every step is the one a single process would take on the whole batch (up to float rounding)."""
    pieces = [tokens[i:i + cfg.seq_len + 1] for i in range(0, tokens.numel() - 1, cfg.seq_len)]
    full = [p for p in pieces if p.numel() == cfg.seq_len + 1]
    batches = [torch.stack(full[i:i + cfg.ttt_batch_seqs]) for i in range(0, len(full), cfg.ttt_batch_seqs)]
    batches += [p[None] for p in pieces if 1 < p.numel() < cfg.seq_len + 1]  # the chunk's tail, alone
    params = [p for g in optimizer.param_groups for p in g["params"]]
    rank, world = (ranks.rank, ranks.world) if ranks is not None and ranks.enabled else (0, 1)
    steps = seen = 0
    model.train()
    for _ in range(epochs):
        for batch in batches:
            if steps_left is not None and steps >= steps_left:
                return steps, seen
            mine = batch[rank::world].to(device)
            if len(mine):
                with autocast_for(device):
                    loss = model(mine[:, :-1], mine[:, 1:])
                (loss * (len(mine) / len(batch))).backward()  # rows are equally long: the batch mean's share
            if world > 1:
                for p in params:
                    p.grad = ranks.all_reduce_(p.grad if p.grad is not None else torch.zeros_like(p))
            if cfg.ttt_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.ttt_grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            seen += batch[:, 1:].numel()
    return steps, seen


def past(deadline: float | None, ranks: Dist | None) -> bool:
    """Whether the adaptation budget is spent: on every rank alike (any rank past it), so none waits alone
    in a collective the others skipped."""
    late = deadline is not None and time.perf_counter() > deadline
    return ranks.any(late) if ranks is not None else late


def cosine(peak: float, c: int, chunks: int) -> float:
    """η·½(1 + cos(π·c/(C−1))) for chunk c of C (PR #549's schedule over chunks)."""
    return peak * 0.5 * (1 + math.cos(math.pi * c / max(chunks - 1, 1)))


def score_first(model: GPT, ledger: Ledger, cfg: EvalConfig, device: torch.device, deadline: float | None) -> dict:
    """Score chunk by chunk, adapting after each; returns what the adaptation did (the scores are in the ledger).
    `deadline` (time.perf_counter()): past it, scoring goes on without updates."""
    windows = plan_windows(ledger.n_tokens, cfg.seq_len, cfg.stride, cfg.val_tokens)
    chunks = chunk_windows(windows, cfg.ttt_chunk_tokens)
    params = adapted_parameters(model, cfg)
    optimizer = torch.optim.SGD(params, lr=cfg.ttt_lr, momentum=cfg.ttt_momentum)
    steps = seen = 0
    stopped_at = None
    logits_fn = scoring_logits(model, device)

    with Bar("ttt score_first", len(chunks), "chunks", enabled=ledger.main) as bar:
        for c, chunk in enumerate(chunks):
            model.eval()
            for batch in ledger.share(batches_of(chunk, cfg.batch_seqs)):
                ledger.score(batch, logits_fn)
            if chunk:  # what the other ranks scored of this chunk, before anyone trains on it
                ledger.publish(min(w.start + 1 + w.first_scored for w in chunk), max(w.end for w in chunk) + 1)
            bar.advance(1, f"bpb {ledger.running_bpb() or 0:.4f} so far, {steps} updates")
            if c == len(chunks) - 1 or cfg.ttt_lr == 0 or not params:
                continue
            if past(deadline, ledger.ranks):
                stopped_at = stopped_at if stopped_at is not None else c
                continue
            if cfg.ttt_max_steps and steps >= cfg.ttt_max_steps:
                continue
            for group in optimizer.param_groups:
                group["lr"] = cosine(cfg.ttt_lr, c, len(chunks))
            end = min((c + 1) * cfg.ttt_chunk_tokens, windows[-1].end) + 1
            tokens = ledger.training_tokens(c * cfg.ttt_chunk_tokens, end)
            left = cfg.ttt_max_steps - steps if cfg.ttt_max_steps else None
            took, saw = train_on(model, tokens, cfg, optimizer, device, left, cfg.ttt_epochs, ledger.ranks)
            steps, seen = steps + took, seen + saw
    model.eval()
    return {"chunks": len(chunks), "steps": steps, "tokens_adapted": seen, "adapted_params": sum(p.numel() for p in params),
            "stopped_adapting_at_chunk": stopped_at, "expected_targets": scored_targets(windows)}
