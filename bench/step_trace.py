"""Where a pgolf training step waits on the host (issue 16: "no host syncs in the step"), from a profiler trace.

    python bench/step_trace.py --out DIR [--device cuda]

Builds pgolf's Trainer on synthetic shards (random tokens, a BOS every ~500), with a small `record`-like
model so that compiling fits a short device call, primes it, then profiles STEPS optimizer steps twice:
with the loader staging batches in pinned memory (pgolf's default) and in pageable memory (pgolf before
this issue). Writes DIR/step_trace.json (per setting: ms/step, the host-blocking CUDA calls and their
time, GPU busy fraction over the window) and DIR/trace_{pinned,pageable}.json.gz (Chrome traces).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pgolf.config.resolve import resolve
from pgolf.formats.shards import DistributedTokenLoader, shard_name, write_shard
from pgolf.nn.distributed import Dist
from pgolf.nn.trainer import Trainer
from pgolf.nn.trainstate import Checkpointer

SYNC_CALLS = {"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy"}


def synthetic_shards(root: Path, vocab: int, tokens: int, bos: int) -> Path:
    rng = np.random.default_rng(0)
    t = rng.integers(2, vocab, tokens).astype(np.uint16)
    t[rng.random(tokens) < 1 / 500] = bos
    root.mkdir(parents=True, exist_ok=True)
    write_shard(root / shard_name("train", 0), t)
    return root


def profile_steps(trainer: Trainer, loader, steps: int, device, trace: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step(loader)
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as f, gzip.open(f"{trace}.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    trace.unlink()
    events = prof.events()
    blocking, copies = {}, {"calls": 0, "ms": 0.0}
    for e in events:
        if e.name in SYNC_CALLS:
            b = blocking.setdefault(e.name, {"calls": 0, "ms": 0.0})
            b["calls"] += 1
            b["ms"] += e.cpu_time_total / 1000
        elif e.name == "cudaMemcpyAsync":  # host-blocking when its source is pageable
            copies["calls"] += 1
            copies["ms"] += e.cpu_time_total / 1000
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events
                     if cuda and e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, None
    for a, b in kernels:  # union of device intervals
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    span = (kernels[-1][1] - kernels[0][0]) if kernels else 0
    memcpy_kinds = {}
    for e in events:
        if cuda and e.device_type == torch.autograd.DeviceType.CUDA and e.name.startswith("Memcpy"):
            memcpy_kinds[e.name] = memcpy_kinds.get(e.name, 0) + 1
    return {"ms_per_step": 1000 * wall / steps, "host_blocking_calls": blocking, "cudaMemcpyAsync": copies,
            "device_copies": memcpy_kinds, "gpu_busy_fraction": busy / span if span else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=2048, help="smaller for a CPU dry run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    p = resolve("train", None, {"preset": "record"})
    # small enough to compile in seconds; the step's structure (micro-batches, copies, optimizers) is record's
    model_cfg = replace(p.model, vocab_size=8192, num_layers=4, num_loops=0, parallel_from=0, xsa_layers=4,
                        doc_mask=False, attn_backend="sdpa")
    cfg = replace(p.train, train_seq_len=args.seq_len, train_batch_tokens=8 * 2 * args.seq_len, grad_accum_steps=2,
                  warmup_steps=2, device=args.device)
    d = Dist(cfg.device)
    data = synthetic_shards(args.out / "data", model_cfg.vocab_size, 4_000_000, model_cfg.bos_id)
    trainer = Trainer(d, data, model_cfg, cfg, Checkpointer(args.out / "ckpt", model_cfg, cfg, 1, None))
    trainer.prime_compiled_kernels()
    result = {"device": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu",
              "torch": torch.__version__, "model": {"num_layers": 4, "model_dim": model_cfg.model_dim,
                                                    "vocab": 8192, "micro_batches": 2, "seqs": 8,
                                                    "seq_len": args.seq_len}}
    for name, pinned in (("pinned", True), ("pageable", False)):
        loader = DistributedTokenLoader(data, 0, 1, d.device, pinned=pinned)
        trainer.train_step(loader)  # warm the allocator for this setting
        result[name] = profile_steps(trainer, loader, args.steps, d.device, args.out / f"trace_{name}.json")
        print(name, json.dumps(result[name]), flush=True)
    (args.out / "step_trace.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
