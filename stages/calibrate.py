"""calibrate: ckpt.safetensors (+ training shards) → hessians.safetensors.

For every linear weight W (out × in) it stores H = E[x xᵀ] (in × in, float32) of the inputs x that
W multiplies, averaged over `n_batches` batches. The tied embedding, used as the LM head, gets the H of
the final normed hidden states. GPTQ reads these to weigh quantization error.

The batches are training data (`source: train`) or text the model samples itself (`source: self`,
TECHNIQUES.md §4.1), which touches no data at all after training. Under torchrun each rank takes every
world-size-th batch and the sums are all-reduced.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch
from rich.progress import track

from .artifacts import PgolfError, load_tensors, save_tensors, sha256_file, write_json
from .config import CalibrateConfig, ModelConfig
from .distributed import Dist
from .model import CastedLinear, GPT, build_model
from .shards import DistributedTokenLoader

SOURCES = ("train", "self")


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


def autocast_for(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


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


def run(ckpt: Path, data: Path, out: Path, cfg: CalibrateConfig, metrics: Path) -> None:
    if cfg.source not in SOURCES:
        raise PgolfError(f"calibrate params: source={cfg.source!r}; choose one of {', '.join(SOURCES)}")
    if cfg.n_batches < 1 or cfg.batch_seqs < 1 or cfg.seq_len < 1 or cfg.temperature <= 0:
        raise PgolfError("calibrate params: n_batches, batch_seqs and seq_len must be >= 1 and temperature > 0")
    t0 = time.perf_counter()
    state, meta = load_tensors(ckpt, "checkpoint")
    model_cfg = ModelConfig(**meta["model_config"])
    d = Dist(cfg.device)
    try:
        if cfg.n_batches < d.world:
            raise PgolfError(f"calibrate params: n_batches={cfg.n_batches} is fewer than the {d.world} ranks; "
                             "give every rank at least one batch")
        model = build_model(model_cfg, state, d.device)
        share = (cfg.n_batches - d.rank + d.world - 1) // d.world
        batches = track(calibration_batches(cfg, model, Path(data), d), total=share,
                        description=f"calibrate ({cfg.source})", disable=not d.main)
        hessians, n_tokens = collect_hessians(model, batches, d)
    finally:
        d.close()
    if not d.main:
        return
    save_tensors(out, hessians, "hessians", {
        "model_config": asdict(model_cfg),
        "params": asdict(cfg),
        "inputs": {"checkpoint": sha256_file(ckpt)},
        "tokenizer_sha256": meta.get("tokenizer_sha256"),
        "tokens": n_tokens,
        "world_size": d.world,
    })
    seconds = time.perf_counter() - t0
    write_json(metrics, {"source": cfg.source, "tensors": len(hessians), "tokens": n_tokens,
                         "seconds": round(seconds, 2), "world_size": d.world})
    print(f"calibrate: {len(hessians)} Hessians from {n_tokens:,} {cfg.source} tokens in {seconds:.1f}s, wrote {out}")
