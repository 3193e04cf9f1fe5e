"""calibrate: ckpt.safetensors + training shards → hessians.safetensors.

For every linear weight W (out × in) it stores H = E[x xᵀ] (in × in, float32) of the inputs x that
W multiplies, averaged over `n_batches` training batches. The tied embedding, used as the LM head,
gets the H of the final normed hidden states. GPTQ reads these to weigh quantization error.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.progress import track

from .artifacts import PgolfError, load_tensors, save_tensors, sha256_file, write_json
from .config import CalibrateConfig, ModelConfig, resolve_device
from .model import CastedLinear, GPT, build_model
from .shards import DistributedTokenLoader


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

    def hessians(self) -> dict[str, torch.Tensor]:
        return {k: (v / max(self.tokens, 1)).cpu() for k, v in self.sums.items()}


def collect_hessians(model: GPT, batches, device: torch.device) -> tuple[dict[str, torch.Tensor], int]:
    collector = HessianCollector(model)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    model.eval()
    try:
        with torch.inference_mode():
            for x in batches:
                with autocast():
                    h = model.hidden(x)
                if model.lm_head is None:  # the tied embedding is the LM head: its input is h
                    collector.add("tok_emb.weight", h)
                collector.tokens += x.numel()
    finally:
        collector.close()
    return collector.hessians(), collector.tokens


def run(ckpt: Path, data: Path, out: Path, cfg: CalibrateConfig, metrics: Path) -> None:
    if cfg.n_batches < 1 or cfg.batch_seqs < 1 or cfg.seq_len < 1:
        raise PgolfError("calibrate: n_batches, batch_seqs and seq_len must be >= 1")
    t0 = time.perf_counter()
    state, meta = load_tensors(ckpt, "checkpoint")
    model_cfg = ModelConfig(**meta["model_config"])
    device = torch.device(resolve_device(cfg.device))
    model = build_model(model_cfg, state, device)
    torch.manual_seed(cfg.seed)
    loader = DistributedTokenLoader(data, 0, 1, device)
    batch_tokens = cfg.batch_seqs * cfg.seq_len
    batches = (loader.next_batch(batch_tokens, cfg.seq_len, 1)[0] for _ in range(cfg.n_batches))
    hessians, n_tokens = collect_hessians(model, track(batches, total=cfg.n_batches, description="calibrate"), device)
    ckpt_sha = sha256_file(ckpt)
    save_tensors(out, hessians, "hessians", {
        "model_config": asdict(model_cfg),
        "params": asdict(cfg),
        "inputs": {"checkpoint": ckpt_sha},
        "tokenizer_sha256": meta.get("tokenizer_sha256"),
        "tokens": n_tokens,
    })
    seconds = time.perf_counter() - t0
    write_json(metrics, {"tensors": len(hessians), "tokens": n_tokens, "seconds": round(seconds, 2)})
    print(f"calibrate: {len(hessians)} Hessians from {n_tokens:,} tokens in {seconds:.1f}s, wrote {out}")
