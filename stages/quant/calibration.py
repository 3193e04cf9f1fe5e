"""Calibration Hessians: H = E[x xᵀ] of the inputs of every linear weight, the statistic GPTQ weighs
quantization error by (Frantar et al. 2022).

The tied embedding, used as the LM head, gets the H of the final normed hidden states. The batches are
training data (`source: train`) or text the model samples itself (`source: self`, PR #1019's
autoregressive self-generated calibration), which touches no data at all after training. Under torchrun
each rank takes every world-size-th batch and the sums are all-reduced.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import torch

from pgolf.config.sections import CalibrateConfig
from pgolf.formats.shards import DistributedTokenLoader
from pgolf.nn.distributed import Dist
from pgolf.nn.model import GPT, CastedLinear, autocast_for


class HessianCollector:
    """Forward hooks accumulating Σ x xᵀ (fp32) per weight, plus the token count."""

    def __init__(self, model: GPT):
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, CastedLinear):
                self.handles.append(module.register_forward_hook(self._hook(f"{name}.weight")))

    def _hook(self, key: str):
        def hook(_module, inputs, _output):
            self.add(key, inputs[0])
        return hook

    def add(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.size(-1)).float()
        if key not in self.sums:
            self.sums[key] = torch.zeros(x.size(1), x.size(1), device=x.device)
        self.sums[key].addmm_(x.T, x)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def collect_hessians(model: GPT, batches, d: Dist) -> tuple[dict[str, torch.Tensor], int]:
    """Run `batches` through the model; return {weight name: E[x xᵀ]} summed over all ranks."""
    collector = HessianCollector(model)
    model.eval()
    try:
        with torch.inference_mode():
            for x in batches:
                with autocast_for(d.device):
                    h = model.hidden(x)
                if model.lm_head is None:  # the tied embedding is the LM head: its input is h
                    collector.add("tok_emb.weight", h)
                collector.tokens += x.numel()
    finally:
        collector.close()
    tokens = int(d.all_reduce_(torch.tensor(float(collector.tokens), device=d.device)).item())
    return {k: (d.all_reduce_(v) / max(tokens, 1)).cpu() for k, v in sorted(collector.sums.items())}, tokens


@torch.inference_mode()
def generate(model: GPT, n_seqs: int, seq_len: int, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """Sample `n_seqs` sequences of `seq_len` tokens from the model, each from a random first token."""
    device = next(model.parameters()).device
    x = torch.randint(0, model.cfg.vocab_size, (n_seqs, 1), generator=generator, device="cpu").to(device)
    for _ in range(seq_len - 1):
        with autocast_for(device):
            logits = model.logits(x)[:, -1].float()
        probs = torch.softmax(logits / max(temperature, 1e-6), dim=-1)
        nxt = torch.multinomial(probs.cpu(), 1, generator=generator).to(device)
        x = torch.cat([x, nxt], dim=1)
    return x


def calibration_batches(cfg: CalibrateConfig, model: GPT, data: Path, d: Dist) -> Iterator[torch.Tensor]:
    """This rank's share (every world-th) of the `n_batches` batches of [batch_seqs, seq_len] tokens."""
    if cfg.source == "train":
        loader = DistributedTokenLoader(data, 0, 1, d.device)
        for i in range(cfg.n_batches):
            x, _ = loader.next_batch(cfg.batch_seqs * cfg.seq_len, cfg.seq_len, 1)
            if i % d.world == d.rank:
                yield x
    else:
        for i in range(d.rank, cfg.n_batches, d.world):
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)  # batch i is the same on any world size
            yield generate(model, cfg.batch_seqs, cfg.seq_len, cfg.temperature, generator)
