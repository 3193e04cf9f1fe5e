"""Per-document LoRA TTT (PR #1530; rank, α and warm A as in PR #1767 and the record, PR #1855).

Documents are cut from the validation stream at BOS (a document's last target is the next document's
BOS) and adapted side by side, `ttt_lora_batch_docs` at a time, sorted by length, the longest batch first.
Each document has its own low-rank adapters on the sites of `ttt_lora_targets`: Q, K, V (on those
projections), O (attention input → attention output), MLP (MLP input → MLP output), and the LM head
(logits, before the softcap); the base model stays frozen. A document is read in chunks of
`ttt_lora_chunk_tokens` tokens, left to right: the chunk is scored (context: the document's own earlier
tokens, at most seq_len), then — unless it is the document's last — the adapters take one AdamW step on
the loss of that chunk (mean over its tokens, summed over documents, so no document's gradient touches
another's adapter). At each new batch B is zeroed and the optimizer state reset; A is re-drawn, or kept
warm (`ttt_lora_warm_a`), which carries what earlier, already-scored documents taught. Adapters hang on
the model's own layers (pgolf.nn.model's adapter slots), so every model option applies as in training;
a looped layer shares its adapter across its passes.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from typing import Iterator

import torch
import torch.nn.functional as F

from pgolf.config.sections import EvalConfig, lora_targets
from pgolf.nn.model import GPT, autocast_for, scoring_logits
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
        for site, linear in (("q", attn.c_q), ("k", attn.c_k), ("v", attn.c_v)):
            if site in sites:
                linear.adapter = make(linear.in_features, linear.out_features)
        if "o" in sites:
            attn.adapter = make(dim, dim)
        if "mlp" in sites:
            block.mlp.adapter = make(dim, dim)
    if "head" in sites:
        model.head_adapter = make(dim, model.cfg.vocab_size)
    return adapters


def detach(model: GPT) -> None:
    for block in model.blocks:
        for module in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.attn, block.mlp):
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


def document_lora(model: GPT, ledger: Ledger, cfg: EvalConfig, device: torch.device, deadline: float | None) -> dict:
    """Score every document chunk by chunk, adapting its own adapters in between; returns what it did."""
    batches = document_batches(ledger, model.cfg.bos_id, cfg)
    docs = [doc for batch in batches for doc in batch]
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    # Windows here are a document's own, of every length: flex_attention's compiled kernels (what `auto`
    # picks for gradients on CUDA) fail on short ones and would recompile for each; SDPA with the dense
    # document mask computes the same attention for any length.
    own_cfg, model.cfg = model.cfg, replace(model.cfg, attn_backend="sdpa")
    adapters = attach(model, cfg, cfg.ttt_lora_batch_docs, device)
    params = [t for ad in adapters for t in (ad.A, ad.B)]
    steps = seen = 0
    stopped_at = None

    def use(rows: list[int]) -> None:
        index = torch.tensor(rows, device=device)
        for ad in adapters:
            ad.rows = index
    logits_fn = scoring_logits(model, device)

    try:
        with Bar("ttt lora", len(batches), "document batches") as bar:
            for n, batch in enumerate(batches):
                redraw = not cfg.ttt_lora_warm_a or n == 0
                for site, ad in enumerate(adapters):
                    ad.reset([a * len(adapters) + site for a, _ in batch] if redraw else None)
                optimizer = torch.optim.AdamW(params, lr=cfg.ttt_lora_lr, betas=(0.0, cfg.ttt_beta2), eps=1e-10,
                                              weight_decay=cfg.ttt_weight_decay)
                for rows, windows, learning in chunk_rounds(batch, cfg):
                    use(rows)
                    ledger.score(windows, logits_fn)
                    learn = [(i, w) for i, w in zip(rows, windows) if i in learning]
                    if not learn or (deadline is not None and time.perf_counter() > deadline):
                        if learn and stopped_at is None:
                            stopped_at = n
                        continue
                    use([i for i, _ in learn])
                    loss = chunk_loss(model, ledger, [w for _, w in learn], device)
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    steps += 1
                    seen += scored_targets([w for _, w in learn])
                bar.advance(1, f"bpb {ledger.running_bpb() or 0:.4f} so far, {steps} updates")
    finally:
        detach(model)
        model.cfg = own_cfg
        for p in model.parameters():
            p.requires_grad_(True)
    return {"documents": len(docs), "batches": len(batches), "steps": steps, "tokens_adapted": seen,
            "adapter_params_per_document": sum(ad.A[0].numel() + ad.B[0].numel() for ad in adapters),
            "stopped_adapting_at_batch": stopped_at, "expected_targets": sum(b - a - 1 for a, b in docs)}


def chunk_loss(model: GPT, ledger: Ledger, windows: list[Window], device: torch.device) -> torch.Tensor:
    """Σ over documents of the mean loss of each window's scored targets — tokens the ledger hands out only
    because those targets are already recorded."""
    length = max(w.end - w.start for w in windows)
    x = torch.zeros(len(windows), length, dtype=torch.long)
    y = torch.zeros_like(x)
    weight = torch.zeros(len(windows), length)
    for row, w in enumerate(windows):
        tokens = ledger.training_tokens(w.start, w.end + 1)
        n = w.end - w.start
        x[row, :n], y[row, :n] = tokens[:-1], tokens[1:]
        weight[row, w.first_scored:n] = 1.0 / (n - w.first_scored)
    x, y, weight = x.to(device), y.to(device), weight.to(device)
    with autocast_for(device):
        logits = model.logits(x)
    nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view(y.shape)
    return (nll * weight).sum()
