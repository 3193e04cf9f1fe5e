"""Calibration statistics of every linear weight W (y = W x):

- H = E[x xᵀ] of its inputs, the statistic GPTQ weighs quantization error by (Frantar et al. 2022);
- G = E[(∂L/∂y)²] of its outputs, per output row, where L is a sequence's summed loss: with H it turns a
  layer's output error into the loss it costs (½ Σ_r G_r δ_r H δ_rᵀ per token, the diagonal
  Kronecker-factored Fisher of Martens & Grosse 2015), which `quantize --budget` minimises.

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


GRAD_SUFFIX = "#out_grad_sq"  # G of weight `name` is stored as `name#out_grad_sq` beside its H


class StatisticsCollector:
    """Hooks accumulating Σ x xᵀ (fp32) of every linear's inputs and, when its output carries a gradient,
    Σ (∂L/∂y)² of its outputs (per row), plus the token count. Looped layers accumulate every pass."""

    def __init__(self, model: GPT):
        self.sums: dict[str, torch.Tensor] = {}
        self.grad_sums: dict[str, torch.Tensor] = {}
        self.tokens = 0
        self.grad_scale = 1.0  # ∂(summed loss)/∂(mean loss): the batch's token count
        # Off while the next batch is made: self-generated text runs the model too, and those forwards
        # are not calibration inputs.
        self.active = False
        self.handles = []
        for name, module in model.named_modules():
            if isinstance(module, CastedLinear):
                self.handles.append(module.register_forward_hook(self._hook(f"{name}.weight")))

    def _hook(self, key: str):
        def hook(_module, inputs, output):
            self.add(key, inputs[0], output)
        return hook

    def add(self, key: str, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        if not self.active:
            return
        x = x.detach().reshape(-1, x.size(-1)).float()
        if key not in self.sums:
            self.sums[key] = torch.zeros(x.size(1), x.size(1), device=x.device)
        self.sums[key].addmm_(x.T, x)
        if y is not None and y.requires_grad:
            y.register_hook(lambda g: self._add_grad(key, g))

    def _add_grad(self, key: str, g: torch.Tensor) -> None:
        g = g.detach().reshape(-1, g.size(-1)).float() * self.grad_scale
        sq = g.pow(2).sum(0)
        self.grad_sums[key] = self.grad_sums[key] + sq if key in self.grad_sums else sq

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def collect_statistics(model: GPT, batches, d: Dist, output_grads: bool
                       ) -> tuple[dict[str, torch.Tensor], int]:
    """Run `batches` ((inputs, targets) pairs) through the model; return {weight name: E[x xᵀ]} and, with
    `output_grads`, {weight name + GRAD_SUFFIX: E[(∂L/∂y)²]}, summed over all ranks, and the token count."""
    collector = StatisticsCollector(model)
    model.eval()
    try:
        for x, y in batches:
            collector.active = True
            with torch.inference_mode(not output_grads), autocast_for(d.device):
                h = model.hidden(x)
                if output_grads or model.lm_head is None:
                    z = model.head_logits(h)
                if model.lm_head is None:  # the tied embedding is the LM head: its input is h, its output z
                    collector.add("tok_emb.weight", h, z)
                if output_grads:
                    collector.grad_scale = float(y.numel())
                    loss = model.loss_from_logits(model.softcap(z), y)
            if output_grads:
                loss.backward()
                model.zero_grad(set_to_none=True)
            collector.active = False
            collector.tokens += x.numel()
    finally:
        collector.close()
    tokens = int(d.all_reduce_(torch.tensor(float(collector.tokens), device=d.device)).item())
    stats = {k: (d.all_reduce_(v) / max(tokens, 1)).cpu() for k, v in sorted(collector.sums.items())}
    for k, v in sorted(collector.grad_sums.items()):
        stats[k + GRAD_SUFFIX] = (d.all_reduce_(v) / max(tokens, 1)).cpu()
    return stats, tokens


def split_statistics(stats: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(Hessians, output-gradient second moments) of a calibrate file, each keyed by weight name."""
    hessians = {k: v for k, v in stats.items() if not k.endswith(GRAD_SUFFIX)}
    grads = {k[:-len(GRAD_SUFFIX)]: v for k, v in stats.items() if k.endswith(GRAD_SUFFIX)}
    return hessians, grads


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


def calibration_batches(cfg: CalibrateConfig, model: GPT, data: Path, d: Dist
                        ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's share (every world-th) of the `n_batches` batches: [batch_seqs, seq_len] inputs and their
    next-token targets."""
    if cfg.source == "train":
        loader = DistributedTokenLoader(data, 0, 1, d.device)
        for i in range(cfg.n_batches):
            x, y = loader.next_batch(cfg.batch_seqs * cfg.seq_len, cfg.seq_len, 1)
            if i % d.world == d.rank:
                yield x, y
    else:
        for i in range(d.rank, cfg.n_batches, d.world):
            generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + i)  # batch i is the same on any world size
            # One token more than the inputs: the last target. Sampling is sequential, so the inputs are
            # the same tokens as a seq_len-long sample.
            seqs = generate(model, cfg.batch_seqs, cfg.seq_len + 1, cfg.temperature, generator).clone()  # autograd-usable
            yield seqs[:, :-1], seqs[:, 1:]
