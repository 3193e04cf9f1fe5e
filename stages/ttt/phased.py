"""Phased LoRA TTT (the 1.0611 record, PR #1855; phases from PRs #1610 and #1626).

Per-document LoRA (pgolf.ttt.lora), paused at prefix boundaries: with `ttt_prefix_docs` D and
`ttt_phases` P, once the documents adapted so far reach D·k/P (k = 1..P), the base model itself takes
global SGD on the first D·k/P of them, in the order they were scored — every weight, momentum
`ttt_global_momentum`, `ttt_global_epochs` passes, the learning rate `ttt_global_lr` on a cosine over
chunks of `ttt_chunk_tokens` (the last chunk skipped, as the record does), `ttt_batch_seqs` sequences of
seq_len per step, gradients clipped at `ttt_grad_clip` — and the queue goes on with fresh adapters on the
adapted model. The documents it trains on were all scored before the pause (the ledger hands out nothing
else). Pauses fall after whole batches, at the batch where the count first reaches a boundary, and every
rank pauses there; so the trained set, unlike the record's (which follows the ranks' timing), depends only
on the settings, and one process and a torchrun group compute the same thing.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from pgolf.config.sections import EvalConfig
from pgolf.nn.model import GPT
from pgolf.text.ledger import Ledger
from pgolf.ttt.lora import Segment, adapt_documents, document_batches
from pgolf.ttt.score_first import cosine, past, train_on


def phase_segments(batches: list[list[tuple[int, int]]], prefix_docs: int, phases: int) -> list[tuple[Segment, int]]:
    """(segment, documents the pause after it trains on) for each pause; then the rest with no pause (0)."""
    counts = np.cumsum([len(batch) for batch in batches])
    pauses: dict[int, int] = {}  # last batch (exclusive) → documents
    for k in range(1, phases + 1):
        boundary = prefix_docs * k // phases
        reached = np.flatnonzero(counts >= boundary)
        if boundary > 0 and reached.size and reached[0] + 1 < len(batches):  # a pause with nothing left: none
            pauses[int(reached[0]) + 1] = boundary
    segments, first = [], 0
    for last in sorted(pauses):
        segments.append(((first, last), pauses[last]))
        first = last
    return segments + [((first, len(batches)), 0)]


def global_sgd(model: GPT, ledger: Ledger, docs: list[tuple[int, int]], cfg: EvalConfig,
               device: torch.device) -> tuple[int, int]:
    """Every weight of `model` trained on the documents `docs` (all scored), concatenated in order."""
    bos = model.cfg.bos_id
    pieces = []
    for a, b in docs:
        tokens = ledger.training_tokens(a, b)
        pieces.append(tokens[:-1] if tokens[-1] == bos else tokens)  # the next document brings its own BOS
    stream = torch.cat(pieces)
    n = cfg.ttt_chunk_tokens
    chunks = max(1, -(-(stream.numel() - 1) // n))
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.ttt_global_lr, momentum=cfg.ttt_global_momentum)
    steps = seen = 0
    for c in range(chunks - 1):
        for group in optimizer.param_groups:
            group["lr"] = cosine(cfg.ttt_global_lr, c, chunks)
        took, saw = train_on(model, stream[c * n:(c + 1) * n + 1], cfg, optimizer, device, None,
                             cfg.ttt_global_epochs, ledger.ranks)
        steps, seen = steps + took, seen + saw
    model.eval()
    return steps, seen


def phased_lora(model: GPT, ledger: Ledger, cfg: EvalConfig, device: torch.device, deadline: float | None) -> dict:
    """Per-document LoRA with global SGD pauses; returns what it did, a row per pause."""
    batches = document_batches(ledger, model.cfg.bos_id, cfg)
    plan = phase_segments(batches, cfg.ttt_prefix_docs, cfg.ttt_phases)
    documents = dict((segment[1], docs) for segment, docs in plan)

    def pause(last: int) -> dict:
        started = time.perf_counter()
        ledger.publish()  # every rank learns what the others scored: the documents it is about to train on
        if cfg.ttt_global_lr == 0 or past(deadline, ledger.ranks):
            return {"after_batch": last, "documents": documents[last], "steps": 0, "tokens": 0, "skipped": True}
        docs = [doc for batch in batches[:last] for doc in batch][:documents[last]]
        steps, seen = global_sgd(model, ledger, docs, cfg, device)
        return {"after_batch": last, "documents": len(docs), "steps": steps, "tokens": seen,
                "seconds": round(time.perf_counter() - started, 2)}

    return adapt_documents(model, ledger, cfg, device, deadline, batches, [segment for segment, _ in plan], pause)
