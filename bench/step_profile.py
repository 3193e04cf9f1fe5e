"""Where a preset's training step spends its time, one rank or several (issue 16: pr2071's 2-GPU step).

    python bench/step_profile.py --preset pr2071 --out DIR [--set KEY=VALUE ...]
    torchrun --standalone --nproc_per_node=2 bench/step_profile.py --preset pr2071 --out DIR

The preset's own model and batch geometry on synthetic shards (random tokens, a BOS every ~500, so the
document mask has real segments) or on a tokenized folder (`--data`); depth recurrence on from the start (the
slower mode); compile-priming steps, then:
1. `--steps` steps timed as `pgolf train` runs them (`Trainer.train_step`), ms/step;
2. the same steps with a device sync between the phases: data + forward + backward of the micro-batches
   that do not sync gradients, the last micro-batch (whose backward carries DDP's all-reduce), gradient
   clipping, each optimizer's step; ms per phase (the syncs stop overlap and pace the ranks, so the phases
   attribute time and need not add up to 1.: on pr2071's 2-GPU step they added up to less);
3. `--profile-steps` steps under torch.profiler: ms/step, host-blocking CUDA calls, and rank 0's Chrome trace
   summarised by bench/trace_summary.py (host and device time per step and per micro-batch, kernel time by
   kind).
Writes DIR/profile_<world>gpu<TAG>.json (rank 0) and rank 0's Chrome trace DIR/trace_<world>gpu<TAG>.json.gz.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch
from step_trace import SYNC_CALLS, synthetic_shards  # bench/, beside this script
from trace_summary import summarize

from pgolf.config.resolve import resolve
from pgolf.formats.shards import DistributedTokenLoader
from pgolf.nn.distributed import Dist
from pgolf.nn.trainer import Trainer
from pgolf.nn.trainstate import Checkpointer


def sync(d: Dist) -> None:
    if d.device.type == "cuda":
        torch.cuda.synchronize(d.device)
    if d.enabled:
        torch.distributed.barrier()


def phase_times(trainer: Trainer, loader, steps: int) -> dict:
    """ms per phase, with a sync between phases (so overlap is removed: these attribute, they do not add up)."""
    d, cfg, acc = trainer.d, trainer.cfg, {}
    losses = torch.zeros((), device=d.device)

    def timed(name, fn):
        sync(d)
        t0 = time.perf_counter()
        out = fn()
        sync(d)
        acc[name] = acc.get(name, 0.0) + 1000 * (time.perf_counter() - t0) / steps
        return out

    for _ in range(steps):
        for micro in range(trainer.accum):
            last = micro == trainer.accum - 1
            timed("last_micro_batch_with_grad_sync" if last else "micro_batches_without_sync",
                  lambda micro=micro: trainer.micro_step(loader, micro, losses))
        if cfg.grad_clip_norm > 0:
            timed("clip", lambda: torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), cfg.grad_clip_norm))
        for opt in trainer.optimizers:
            timed(f"step_{type(opt).__name__}_{len(opt.param_groups[0]['params'])}", opt.step)
        trainer.zero_grad()
    return {k: round(v, 2) for k, v in acc.items()}


def profiled(run_step, steps: int, trace: Path | None, wait=torch.cuda.synchronize) -> dict:
    """`steps` calls of `run_step` (one training step) under torch.profiler: ms/step, the host-blocking CUDA
    calls, and (where `trace` is given: rank 0) bench/trace_summary.py's host and device figures from the Chrome
    trace it writes there. `wait` waits for the device (and the other ranks). bench/speed_record.py profiles the
    record script's step with it too."""
    from torch.profiler import ProfilerActivity, profile

    wait()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            run_step()
        wait()
        wall = time.perf_counter() - t0
    blocking: dict[str, dict] = {}
    for e in prof.events():
        if e.name in SYNC_CALLS:
            b = blocking.setdefault(e.name, {"calls": 0, "ms": 0.0})
            b["calls"] += 1
            b["ms"] = round(b["ms"] + e.cpu_time_total / 1000, 2)
    out = {"ms_per_step": round(1000 * wall / steps, 2), "host_blocking_calls": blocking}
    if trace is not None:
        raw = trace.with_suffix("")
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as f, gzip.open(trace, "wb") as g:
            shutil.copyfileobj(f, g)
        raw.unlink()
        out["trace"] = summarize(trace, steps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="pr2071")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--tag", default="", help="appended to the output names")
    ap.add_argument("--vocab", type=int, default=8192, help="the tokenizer's size (the model reads it from the data)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE for the train stage")
    ap.add_argument("--data", type=Path, help="a tokenized folder to train on instead of synthetic shards (the "
                    "side-by-side's, so that both sides' attention sees the same documents)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    p = resolve("train", None, ["preset=" + args.preset, "warmup_steps=3", "loop_enable_frac=0", *args.sets])
    d = Dist(p.train.device)
    model_cfg, cfg = replace(p.model, vocab_size=args.vocab), replace(p.train, max_wallclock_seconds=0)
    # per rank and tag: runs of one call may go at once, one a GPU
    data = args.data or synthetic_shards(args.out / f"data_rank{d.rank}{args.tag}", model_cfg.vocab_size, 30_000_000,
                                         model_cfg.bos_id)
    world = f"{d.world}gpu{args.tag}"
    trainer = Trainer(d, data, model_cfg, cfg, Checkpointer(args.out / f"ckpt{d.rank}{args.tag}", model_cfg, cfg, d.world, None))
    t0 = time.perf_counter()
    trainer.prime_compiled_kernels()
    result = {"preset": args.preset, "world": d.world, "sets": args.sets, "micro_batches_per_rank": trainer.accum,
              "seqs_per_micro_batch": cfg.train_batch_tokens // (cfg.train_seq_len * cfg.grad_accum_steps),
              "attention": trainer.attention, "ddp_graph": cfg.ddp_graph, "compile_mode": cfg.compile_mode,
              "device": torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else "cpu",
              "torch": torch.__version__, "prime_s": round(time.perf_counter() - t0, 1)}
    loader = DistributedTokenLoader(data, d.rank, d.world, d.device)
    trainer.train_step(loader)
    sync(d)
    t0, load_before = time.perf_counter(), os.getloadavg()[0]
    for _ in range(args.steps):
        trainer.train_step(loader)
    sync(d)
    result["ms_per_step"] = round(1000 * (time.perf_counter() - t0) / args.steps, 2)
    # the step is bound by the host: its CPU count and load (1-minute averages) say whether it was shared
    result["host"] = {"cpus": os.cpu_count(), "load_before": load_before, "load_after": os.getloadavg()[0]}
    result["phases_ms_synced"] = phase_times(trainer, loader, max(2, args.steps // 2))
    result["profile"] = profiled(lambda: trainer.train_step(loader), args.profile_steps,
                                 args.out / f"trace_{world}.json.gz" if d.main else None, lambda: sync(d))
    if d.main:
        (args.out / f"profile_{world}.json").write_text(json.dumps(result, indent=1))
        print(json.dumps(result), flush=True)
    d.close()


if __name__ == "__main__":
    main()
