"""The record script's (PR #1855) training step, timed on one GPU for the speed side-by-side (issue 16).

bench/speed_sidebyside.sh runs it with the record's settings in the environment (its README's command) and
bench/fa3_on_fa4 first on PYTHONPATH (FlashAttention 3 → FlashAttention-4, the kernel pgolf's fa4 backend
runs). The script is imported as a module and its own pieces train: GPT, restore_fp32_params, Optimizers,
DocumentPackingLoader, its fused softcapped CE and fused LeakyReLU² MLP, under
torch.compile(dynamic=False, fullgraph=True) as it compiles them. The loop below is the script's step (micro-
batches, Muon momentum warm-up, LR schedule by step fraction, clipping, EMA), written out here because the
script's is a closure inside train_model, which would also run its evaluation, GPTQ and serialization.

One difference, for compile time only: the script pads each batch's cu_seqlens to a multiple of 64 entries
and pre-compiles 4 such sizes × 2 depth modes (8 full-model compiles, more than a device call allows); here
every batch is padded to one size (SEGMENT_CAPACITY), so it compiles once per depth mode, as pgolf does.
Padding entries are empty segments, as in the script.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path

import torch

from record_fidelity import load_record_module

SEGMENT_CAPACITY = 512  # cu_seqlens entries per micro-batch: ≥ its segments (98,304 tokens, ~100–200 documents)


def padded(cu: torch.Tensor, total: int) -> torch.Tensor:
    if cu.numel() > SEGMENT_CAPACITY:
        raise SystemExit(f"a batch has {cu.numel()} cu_seqlens entries; raise SEGMENT_CAPACITY")
    out = torch.full((SEGMENT_CAPACITY,), total, dtype=cu.dtype, device=cu.device)
    out[:cu.numel()] = cu
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--script", type=Path, required=True)
    ap.add_argument("--steps", type=int, required=True, help="timed steps; depth recurrence on from loop_frac")
    ap.add_argument("--loop-frac", type=float, default=0.5)
    ap.add_argument("--prime", type=int, default=3, help="compile-priming steps per depth mode (rolled back)")
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--profile-steps", type=int, default=0,
                    help="then this many steps under torch.profiler (bench/step_profile.py's): their kernel time by "
                         "kind beside pgolf's, and the Chrome trace as trace_record_script.json.gz beside --out")
    args = ap.parse_args()

    rec = load_record_module(args.script)
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.set_float32_matmul_precision("high")
    torch._dynamo.config.cache_size_limit = 64
    h = rec.Hyperparameters()
    rec.set_logging_hparams(h)
    torch.manual_seed(h.seed)
    torch.cuda.manual_seed_all(h.seed)

    model = rec.GPT(h).to(device).bfloat16()
    rec.restore_fp32_params(model)
    compiled = torch.compile(model, dynamic=False, fullgraph=True)
    optimizers = rec.Optimizers(h, model)
    params = [p for p in model.parameters() if p.requires_grad]
    for blk in model.blocks:  # the script sizes its rotary cache before training the same way
        blk.attn.rotary(h.train_batch_tokens // h.world_size, device, torch.bfloat16)

    def step(loader, step_index: int, lr_scale: float) -> torch.Tensor:
        total = torch.zeros((), device=device)
        for _ in range(h.grad_accum_steps):
            x, y, cu, _ = loader.next_batch(h.train_batch_tokens, h.grad_accum_steps)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
                loss = compiled(x, y, cu_seqlens=padded(cu, x.numel()), max_seqlen=h.train_seq_len)
            total += loss.detach()
            (loss / h.grad_accum_steps).backward()
        frac = min(step_index / h.muon_momentum_warmup_steps, 1.0) if h.muon_momentum_warmup_steps > 0 else 1.0
        for group in optimizers.optimizer_muon.param_groups:
            group["momentum"] = (1 - frac) * h.muon_momentum_warmup_start + frac * h.muon_momentum
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * lr_scale
        if h.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, h.grad_clip_norm)
        optimizers.step(distributed=False)
        return total / h.grad_accum_steps

    # prime: compile both depth modes, then roll weights, optimizer states and data back (as the script does)
    t_prime = time.perf_counter()
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    initial_opt = [copy.deepcopy(o.state_dict()) for o in optimizers]
    loader = rec.DocumentPackingLoader(h, device)
    for looping in (False, True):
        model.looping_active = looping
        for i in range(args.prime):
            step(loader, i, 1.0)
    torch.cuda.synchronize()
    prime_s = time.perf_counter() - t_prime
    model.looping_active = False
    model.load_state_dict(initial, strict=True)
    for o, s in zip(optimizers, initial_opt):
        o.load_state_dict(s)
    optimizers.zero_grad_all()
    loader = rec.DocumentPackingLoader(h, device)
    torch.cuda.reset_peak_memory_stats()

    live = model.state_dict(keep_vars=True)
    ema = {k: t.detach().float().clone() for k, t in live.items()}
    pairs = [(ema[k], t) for k, t in live.items()]

    def lr_mul(frac: float) -> float:  # the script's schedule (warmdown over the last warmdown_frac, floor min_lr)
        if h.warmdown_frac <= 0 or frac < 1.0 - h.warmdown_frac:
            return 1.0
        return max((1.0 - frac) / h.warmdown_frac, h.min_lr)

    rows, switch = [], None
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for s in range(args.steps):
        frac = s / args.steps
        if switch is None and frac >= args.loop_frac:
            model.looping_active, switch = True, s
        loss = step(loader, s, lr_mul(frac))
        with torch.no_grad():
            for e, t in pairs:
                e.mul_(h.ema_decay).add_(t.detach(), alpha=1.0 - h.ema_decay)
        if (s + 1) % args.log_every == 0 or s + 1 == args.steps:
            rows.append({"step": s + 1, "loss": float(loss.item()), "elapsed_ms": 1000 * (time.perf_counter() - t0)})
            print(f"record {rows[-1]}", flush=True)
    result = {"side": "record", "steps": args.steps, "loop_switch_step": switch, "prime_s": prime_s,
              "batch_tokens": h.train_batch_tokens, "seq_len": h.train_seq_len, "grad_accum_steps": h.grad_accum_steps,
              "peak_memory_bytes": torch.cuda.max_memory_allocated(), "rows": rows,
              "env": {k: os.environ.get(k) for k in ("FUSED_CE_ENABLED", "TORCH_COMPILE_DISABLE")}}
    if args.profile_steps:  # after the timed steps, in the depth mode the run ended in, at its last LR
        from step_profile import profiled

        result["profile"] = profiled(lambda: step(loader, args.steps, lr_mul(1.0)), args.profile_steps,
                                     args.out.with_name("trace_record_script.json.gz"))
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
