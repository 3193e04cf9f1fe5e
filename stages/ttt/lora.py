"""Per-document LoRA TTT (PR #1530; rank, α and warm A as in PR #1767 and the record, PR #1855).

Documents are cut from the validation stream at BOS (a document's last target is the next document's
BOS) and adapted side by side, `ttt_lora_batch_docs` at a time, sorted by length, the longest batch first.
Each document has its own low-rank adapters on the sites of `ttt_lora_targets`: Q, K, V (on those
projections), O (attention input → attention output), MLP (MLP input → MLP output), and the LM head
(logits, before the softcap); the base model stays frozen. A document is read in chunks of
`ttt_lora_chunk_tokens` tokens, left to right: the chunk is scored (context: the document's own earlier
tokens, at most seq_len), then — unless it is the document's last — the adapters take one AdamW step on
the loss of that chunk, from the same forward (mean over its tokens, summed over documents, so no
document's gradient touches another's adapter). At each new batch B is zeroed and the optimizer state
reset; A is re-drawn, or kept warm (`ttt_lora_warm_a`), which carries what earlier, already-scored
documents taught. Under torchrun each rank takes every world-th batch (a deterministic queue); with warm A
the result then depends on the number of ranks, as the record's does. Adapters hang on the model's own
layers (pgolf.nn.model's adapter slots), so every model option applies as in training;
a looped layer shares its adapter across its passes.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Callable, Iterator

import torch

from pgolf.config.sections import EvalConfig, lora_targets
from pgolf.nn.model import GPT, scoring_logits
from pgolf.report.progress import Bar
from pgolf.text.bpb import Window, scored_targets
from pgolf.text.ledger import Ledger


class BatchedLoRA:
    """x [rows, T, in] → (x · A[r]) · B[r] · α/rank for each row r's own adapter (a plain callable, so it
    never joins the model's parameters or state dict)."""

    def __init__(self, slots: int, d_in: int, d_out: int, rank: int, alpha: float, device: torch.device):
        self.d_in, self.scale = d_in, alpha / rank
        self.A = torch.zeros(slots, d_in, rank, device=device, requires_grad=True)
        self.B = torch.zeros(slots, rank, d_out, device=device, requires_grad=True)
        self.rows: torch.Tensor | None = None  # which adapters the current batch rows use

    def reset(self, seeds: list[int] | None) -> None:
        """B zeroed; with `seeds`, A re-drawn for slot i from seed i — U(±1/√in), as nn.Linear draws — so a
        document's adapter depends on the document alone, never on which others share its batch."""
        with torch.no_grad():
            for slot, seed in enumerate(seeds or []):
                g = torch.Generator().manual_seed(seed)
                bound = 1.0 / math.sqrt(self.d_in)
                self.A[slot].copy_(torch.rand(self.A.shape[1:], generator=g) * 2 * bound - bound)
            self.B.zero_()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.A[self.rows], self.B[self.rows]
        return torch.bmm(torch.bmm(x, a.to(x.dtype)), b.to(x.dtype)) * self.scale


def attach(model: GPT, cfg: EvalConfig, slots: int, device: torch.device) -> list[BatchedLoRA]:
    """Adapters on the sites of ttt_lora_targets, one set per layer (and one for the head)."""
    dim, sites = model.cfg.model_dim, lora_targets(cfg)
    adapters = []

    def make(d_in: int, d_out: int) -> BatchedLoRA:
        adapters.append(BatchedLoRA(slots, d_in, d_out, cfg.ttt_lora_rank, cfg.ttt_lora_alpha, device))
        return adapters[-1]

    for block in model.blocks:
        attn = block.attn
        for site, linear in query_key_value(attn):  # none in an S4D layer's slot (pgolf.nn.studies)
            if site in sites:
                linear.adapter = make(linear.in_features, linear.out_features)
        if "o" in sites:
            attn.adapter = make(dim, dim)
        if "mlp" in sites:
            block.mlp.adapter = make(dim, dim)
    if "head" in sites:
        model.head_adapter = make(dim, model.cfg.vocab_size)
    return adapters


def query_key_value(attn) -> list[tuple[str, torch.nn.Module]]:
    """The q, k, v projections of an attention slot that has them."""
    return [(site, getattr(attn, name)) for site, name in (("q", "c_q"), ("k", "c_k"), ("v", "c_v"))
            if hasattr(attn, name)]


def detach(model: GPT) -> None:
    for block in model.blocks:
        for module in [linear for _, linear in query_key_value(block.attn)] + [block.attn, block.mlp]:
            module.adapter = None
    model.head_adapter = None


def chunk_window(doc: tuple[int, int], k: int, chunk: int, seq_len: int) -> Window:
    """Window scoring document `doc`'s chunk k (targets a+1+k·chunk ..), with the document's own context."""
    a, b = doc
    first, last = a + 1 + k * chunk, min(a + (k + 1) * chunk, b - 1)
    start = max(a, last - seq_len)
    return Window(start, last, first - 1 - start)


def document_batches(ledger: Ledger, bos_id: int, cfg: EvalConfig) -> list[list[tuple[int, int]]]:
    """The documents (of the first val_tokens targets, if set), sorted by length, in batches, longest first."""
    docs = ledger.documents(bos_id)
    if cfg.val_tokens > 0:  # documents up to there, the last one cut
        docs = [(a, min(b, cfg.val_tokens + 1)) for a, b in docs if a + 1 < min(b, cfg.val_tokens + 1)]
    order = sorted(range(len(docs)), key=lambda i: docs[i][1] - docs[i][0], reverse=True)
    return [[docs[i] for i in order[j:j + cfg.ttt_lora_batch_docs]] for j in range(0, len(order), cfg.ttt_lora_batch_docs)]


def chunk_rounds(batch: list[tuple[int, int]], cfg: EvalConfig) -> Iterator[tuple[list[int], list[Window], list[int]]]:
    """Round k of a batch: (rows with a chunk k, their windows, the rows that learn after it: not their last)."""
    chunk = cfg.ttt_lora_chunk_tokens
    chunks = [math.ceil((b - a - 1) / chunk) for a, b in batch]
    for k in range(max(chunks)):
        rows = [i for i, c in enumerate(chunks) if k < c]
        yield rows, [chunk_window(batch[i], k, chunk, cfg.seq_len) for i in rows], [i for i in rows if k < chunks[i] - 1]


Segment = tuple[int, int]  # batches [first, last) adapted before the next pause (phased TTT's global SGD)
Pause = Callable[[int], dict]  # after the segment ending at batch `last`: what it did


def document_lora(model: GPT, ledger: Ledger, cfg: EvalConfig, device: torch.device, deadline: float | None) -> dict:
    """Score every document chunk by chunk, adapting its own adapters in between; returns what it did."""
    batches = document_batches(ledger, model.cfg.bos_id, cfg)
    return adapt_documents(model, ledger, cfg, device, deadline, batches, [(0, len(batches))], None)


def adapt_documents(model: GPT, ledger: Ledger, cfg: EvalConfig, device: torch.device, deadline: float | None,
                    batches: list[list[tuple[int, int]]], segments: list[Segment], pause: Pause | None) -> dict:
    """The per-document loop over `batches`, segment by segment (under torchrun each rank takes its share
    of a segment's batches); between segments `pause(last)` may change the base model, and each segment
    starts with fresh adapters. The base model is frozen while the adapters learn."""
    docs = [doc for batch in batches for doc in batch]
    mine = [ledger.share(list(range(first, last))) for first, last in segments]
    own_cfg = model.cfg
    steps = seen = 0
    stopped_at = None
    pauses: list[dict] = []
    adapters: list[BatchedLoRA] = []

    with Bar("ttt " + cfg.ttt, sum(map(len, mine)), "document batches", enabled=ledger.main) as bar:
        for k, indices in enumerate(mine):
            for p in model.parameters():
                p.requires_grad_(False)
            model.eval()
            # A window here holds one document's tokens and no BOS after its first (the next document's BOS
            # is only ever a target), so the document mask is the causal mask: plain causal attention (SDPA's
            # flash kernel on CUDA, any length, no mask built) computes the same thing.
            model.cfg = replace(own_cfg, doc_mask=False)
            adapters = attach(model, cfg, cfg.ttt_lora_batch_docs, device)
            try:
                for j, n in enumerate(indices):
                    took, saw, late = adapt_batch(model, ledger, cfg, device, deadline, adapters, batches[n],
                                                  redraw=j == 0 or not cfg.ttt_lora_warm_a)
                    steps, seen = steps + took, seen + saw
                    stopped_at = n if late and stopped_at is None else stopped_at
                    bar.advance(1, f"bpb {ledger.running_bpb() or 0:.4f} so far, {steps} updates")
            finally:
                detach(model)
                model.cfg = own_cfg
                for p in model.parameters():
                    p.requires_grad_(True)
            if pause is not None and k < len(segments) - 1:
                pauses.append(pause(segments[k][1]))
    model.eval()
    return {"documents": len(docs), "batches": len(batches), "steps": steps, "tokens_adapted": seen,
            "adapter_params_per_document": sum(ad.A[0].numel() + ad.B[0].numel() for ad in adapters),
            "stopped_adapting_at_batch": stopped_at, "expected_targets": sum(b - a - 1 for a, b in docs),
            **({"phases": pauses} if pause is not None else {})}


def adapt_batch(model: GPT, ledger: Ledger, cfg: EvalConfig, device: torch.device, deadline: float | None,
                adapters: list[BatchedLoRA], batch: list[tuple[int, int]], redraw: bool) -> tuple[int, int, bool]:
    """One batch of documents, chunk round by chunk round: score, then one AdamW step of the adapters on the
    chunk just scored (unless it is a document's last). B is zeroed first and, with `redraw`, A re-drawn
    per document. Returns (steps, tokens adapted on, whether the deadline stopped the adapting)."""
    for site, ad in enumerate(adapters):
        ad.reset([a * len(adapters) + site for a, _ in batch] if redraw else None)
    params = [t for ad in adapters for t in (ad.A, ad.B)]
    optimizer = torch.optim.AdamW(params, lr=cfg.ttt_lora_lr, betas=(0.0, cfg.ttt_beta2), eps=1e-10,
                                  weight_decay=cfg.ttt_weight_decay)
    logits_fn = scoring_logits(model, device)
    steps = seen = 0
    late = False

    def use(rows: list[int]) -> None:
        index = torch.tensor(rows, device=device)
        for ad in adapters:
            ad.rows = index

    for rows, windows, learning in chunk_rounds(batch, cfg):
        use(rows)
        if learning and deadline is not None and time.perf_counter() > deadline:
            late, learning = True, []
        if not learning:
            ledger.score(windows, logits_fn)
            continue
        # one forward: the chunk is scored (recorded) first, then its loss, mean per document and summed
        # over documents (no document's gradient reaches another's adapter), makes the update
        row_losses = ledger.score_for_update(windows, logits_fn)
        learn = [k for k, i in enumerate(rows) if i in learning]
        row_losses[learn].sum().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        steps += 1
        seen += scored_targets([windows[k] for k in learn])
    return steps, seen, late
