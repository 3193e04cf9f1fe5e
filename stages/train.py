"""train: tokenized shards → ckpt.safetensors, train_metrics.json, train_log.csv.

The reference recipe: Muon on block matrices, Adam on the embedding and control tensors, gradient
accumulation to a fixed global batch, momentum warm-up, linear warmdown (estimated in wall-clock
under a cap), compile-priming steps that are rolled back. One process, or DDP under torchrun
(NCCL on CUDA, gloo on CPU).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from .artifacts import PgolfError, atomic_path, read_json, save_tensors, sha256_file, write_json, finite_or_none
from .config import EvalConfig, ModelConfig, TrainConfig
from .distributed import Dist
from . import trainstate
from .model import GPT, enable_qat, is_control, prepare_for_device, set_qat
from .muon import Muon
from .shards import DistributedTokenLoader


def check_batch_geometry(cfg: TrainConfig, world: int) -> int:
    """Micro-steps per rank; the global batch stays the same whatever the world size."""
    if cfg.grad_accum_steps % world:
        raise PgolfError(f"train.grad_accum_steps={cfg.grad_accum_steps} is not divisible by the world size {world}; "
                         "use a world size that divides it")
    accum = cfg.grad_accum_steps // world
    if cfg.train_batch_tokens % (world * accum * cfg.train_seq_len):
        raise PgolfError(f"train.train_batch_tokens={cfg.train_batch_tokens} must be a multiple of "
                         f"world·accum·seq_len = {world * accum * cfg.train_seq_len}")
    return accum


def validate_train_config(cfg: TrainConfig, source: str = "train params") -> None:
    from .muon import NS_COEFFICIENTS

    if cfg.muon_ns not in NS_COEFFICIENTS:
        raise PgolfError(f"{source}: muon_ns={cfg.muon_ns!r}; choose one of {', '.join(NS_COEFFICIENTS)}")
    for name in ("muon_wd", "embed_wd", "scalar_wd", "lr_warmup_steps", "checkpoint_every"):
        if getattr(cfg, name) < 0:
            raise PgolfError(f"{source}: {name}={getattr(cfg, name)} must be >= 0")
    for name in ("warmdown_frac", "min_lr"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise PgolfError(f"{source}: {name}={getattr(cfg, name)} must be in [0, 1]")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise PgolfError(f"{source}: ema_decay={cfg.ema_decay} must be in [0, 1) (0: off)")
    for name in ("swa_start_frac", "loop_enable_frac", "qat_start_frac"):
        if not 0.0 <= getattr(cfg, name) <= 1.0:
            raise PgolfError(f"{source}: {name}={getattr(cfg, name)} must be in [0, 1]")
    if cfg.swa_every < 0:
        raise PgolfError(f"{source}: swa_every={cfg.swa_every} must be >= 0 (0: off)")
    if cfg.swa_every and cfg.ema_decay:
        raise PgolfError(f"{source}: ema_decay and swa_every are two ways to average the weights; set one to 0")
    if cfg.qat_bits and not 2 <= cfg.qat_bits <= 8:
        raise PgolfError(f"{source}: qat_bits={cfg.qat_bits} must be 0 (off) or 2..8")
    if cfg.iterations < 0 or cfg.train_seq_len < 1 or cfg.train_batch_tokens < 1:
        raise PgolfError(f"{source}: iterations >= 0, train_seq_len >= 1 and train_batch_tokens >= 1 are required")


def resolve_vocab(model_cfg: ModelConfig, manifest: dict, manifest_path: Path) -> ModelConfig:
    vocab = int(manifest["vocab_size"])
    if model_cfg.vocab_size not in (0, vocab):
        raise PgolfError(f"model.vocab_size={model_cfg.vocab_size} but {manifest_path} has a {vocab}-token "
                         "tokenizer; drop model.vocab_size (it defaults to the data's) or re-tokenize")
    return ModelConfig(**{**asdict(model_cfg), "vocab_size": vocab, "bos_id": int(manifest.get("bos_id", 1))})


def build_optimizers(model: GPT, cfg: TrainConfig, ns_dtype: torch.dtype) -> tuple[list[torch.optim.Optimizer], Muon]:
    """Reference groups: Muon for block matrices, Adam for the embedding (and untied head), Adam for
    control tensors and skip weights. `base_lr` is what the schedule scales."""
    block_params = list(model.blocks.named_parameters())
    matrices = [p for n, p in block_params if not is_control(n, p)]
    embeddings = [model.tok_emb.weight]
    if model.bigram is not None:  # a second embedding table and its projection matrix
        embeddings.append(model.bigram.embed.weight)
        matrices.append(model.bigram.proj.weight)
    # control tensors inside blocks, plus every model-level one (skip weights/gates, smear gate, ...)
    scalars = [p for n, p in block_params if is_control(n, p)]
    scalars += [p for n, p in model.named_parameters() if not n.startswith(("blocks.", "tok_emb.", "lm_head.", "bigram."))]
    fused = next(model.parameters()).is_cuda

    def adam(params, lr, wd):
        # AdamW's decay is decoupled (W ← W·(1 − lr·wd)); without decay, plain Adam as the reference
        kind, extra = (torch.optim.AdamW, {"weight_decay": wd}) if wd > 0 else (torch.optim.Adam, {})
        return kind([{"params": params, "lr": lr, "base_lr": lr}], betas=(cfg.beta1, cfg.beta2),
                    eps=cfg.adam_eps, fused=fused, **extra)

    token_lr = cfg.tied_embed_lr if model.cfg.tie_embeddings else cfg.embed_lr
    muon = Muon(matrices, lr=cfg.matrix_lr, momentum=cfg.muon_momentum, backend_steps=cfg.muon_backend_steps,
                ns_dtype=ns_dtype, coefficients=cfg.muon_ns, row_norm=cfg.muon_row_norm, weight_decay=cfg.muon_wd)
    for group in muon.param_groups:
        group["base_lr"] = cfg.matrix_lr
    optimizers: list[torch.optim.Optimizer] = [adam(embeddings, token_lr, cfg.embed_wd), muon,
                                               adam(scalars, cfg.scalar_lr, cfg.scalar_wd)]
    if model.lm_head is not None:
        optimizers.insert(1, adam([model.lm_head.weight], cfg.head_lr, cfg.embed_wd))
    grouped = [id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]]
    if sorted(grouped) != sorted(id(p) for p in model.parameters()):  # a new component must join a group
        raise RuntimeError("every parameter must be in exactly one optimizer group")
    return optimizers, muon


def run_fraction(cfg: TrainConfig, step: int, elapsed_ms: float) -> float:
    """How far the run is: by wall-clock under a cap (the reference's rule), else by steps."""
    if cfg.max_wallclock_seconds > 0:
        return elapsed_ms / (1000.0 * cfg.max_wallclock_seconds)
    return step / max(cfg.iterations, 1)


def lr_scale(cfg: TrainConfig, step: int, elapsed_ms: float) -> float:
    """The LR multiplier: a linear warm-up over `lr_warmup_steps`, then 1, then a linear warmdown to 0
    floored at `min_lr`. The warmdown is the last `warmdown_frac` of the run (by steps, or by wall-clock
    under a cap), or else the last `warmdown_iters` steps — under a cap, that many steps' worth of time
    at the average step time so far (the reference's rule)."""
    warmup = min((step + 1) / cfg.lr_warmup_steps, 1.0) if cfg.lr_warmup_steps > 0 else 1.0
    capped = cfg.max_wallclock_seconds > 0
    if cfg.warmdown_frac > 0:
        decay = min((1.0 - run_fraction(cfg, step, elapsed_ms)) / cfg.warmdown_frac, 1.0)
    elif cfg.warmdown_iters <= 0:
        decay = 1.0
    elif not capped:
        start = max(cfg.iterations - cfg.warmdown_iters, 0)
        decay = max((cfg.iterations - step) / cfg.warmdown_iters, 0.0) if start <= step < cfg.iterations else 1.0
    else:
        warmdown_ms = cfg.warmdown_iters * elapsed_ms / max(step, 1)
        remaining_ms = max(1000.0 * cfg.max_wallclock_seconds - elapsed_ms, 0.0)
        decay = remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
    return warmup * max(decay, cfg.min_lr)


def run(data: Path, out: Path, model_cfg: ModelConfig, cfg: TrainConfig, metrics: Path, log: Path,
        resume: bool = False, suspend_after: float | None = None) -> None:
    """Train and write the checkpoint. `suspend_after` (seconds of this call, compiling included) saves the
    full state and returns early, to be continued with `resume` (for machines lent by the hour)."""
    validate_train_config(cfg)
    manifest_path = Path(data) / "manifest.json"
    manifest = read_json(manifest_path, "tokenized-data manifest")
    model_cfg = resolve_vocab(model_cfg, manifest, manifest_path)
    d = Dist(cfg.device)
    try:
        _train(d, Path(data), manifest_path, model_cfg, cfg, Path(out), Path(metrics), Path(log), resume,
               suspend_after)
    finally:
        d.close()


def _train(d: Dist, data: Path, manifest_path: Path, model_cfg: ModelConfig, cfg: TrainConfig,
           out: Path, metrics: Path, log: Path, resume: bool, suspend_after: float | None) -> None:
    from .ttt_eval import EvalData, evaluate_model

    started = time.perf_counter()
    accum = check_batch_geometry(cfg, d.world)
    cuda = d.device.type == "cuda"
    torch.manual_seed(cfg.seed)
    if cuda:
        torch.cuda.manual_seed(cfg.seed)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats()

    base_model = prepare_for_device(GPT(model_cfg), d.device)
    n_params = sum(p.numel() for p in base_model.parameters())
    if cfg.qat_bits:
        enable_qat(base_model, cfg.qat_bits)  # before compile: the on/off toggle is a buffer
    compiled = torch.compile(base_model, dynamic=False, fullgraph=True) if (cuda and cfg.compile) else base_model
    model = DDP(compiled, device_ids=[d.local_rank] if cuda else None, broadcast_buffers=False) if d.enabled else compiled
    optimizers, muon = build_optimizers(base_model, cfg, torch.bfloat16 if cuda else torch.float32)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else contextlib.nullcontext

    def zero_grad() -> None:
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)

    def train_step(loader: DistributedTokenLoader) -> torch.Tensor:
        total = torch.zeros((), device=d.device)
        for micro in range(accum):
            x, y = loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, accum)
            sync = contextlib.nullcontext() if (not d.enabled or micro == accum - 1) else model.no_sync()
            with sync:
                with autocast():
                    loss = model(x, y)
                total += loss.detach()
                (loss / accum).backward()
        if cfg.grad_clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(base_model.parameters(), cfg.grad_clip_norm)
        for opt in optimizers:
            opt.step()
        zero_grad()
        return total / accum

    # Depth recurrence switched on part-way: the run starts without it (one retrace when it switches).
    delayed_loops = model_cfg.num_loops > 0 and cfg.loop_enable_frac > 0
    if cfg.warmup_steps > 0:  # prime compiled kernels, then roll model, optimizers and data back
        initial_model = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
        initial_opts = [copy.deepcopy(opt.state_dict()) for opt in optimizers]
        warm_loader = DistributedTokenLoader(data, d.rank, d.world, d.device)
        for looping in ((False, True) if delayed_loops else (True,)):  # prime both graphs
            base_model.set_looping(looping)
            for _ in range(cfg.warmup_steps):
                train_step(warm_loader)
        base_model.load_state_dict(initial_model, strict=True)
        for opt, state in zip(optimizers, initial_opts):
            opt.load_state_dict(state)
        zero_grad()
        del warm_loader

    resume_file = trainstate.state_path(out)
    train_ms, stop_after, step, last_loss = 0.0, None, 0, float("nan")
    rows: list[tuple] = []
    position = (0, 0)
    loop_switch_step = None
    # fp32 shadow of every weight; it, not the live weights, is evaluated and saved at the end
    average = (trainstate.WeightAverage(base_model, "ema", cfg.ema_decay, cfg.ema_bias_correction) if cfg.ema_decay > 0
               else trainstate.WeightAverage(base_model, "swa") if cfg.swa_every > 0 else None)
    if resume:
        step, train_ms, position, rows, loop_switch_step = trainstate.load(resume_file, base_model, optimizers,
                                                                           model_cfg, cfg, d.world, average)
        if delayed_loops:  # as the saved run was, so that a switch still to come is seen (and reported)
            base_model.set_looping(loop_switch_step is not None)
        if d.main:
            print(f"train: resuming at step {step} ({train_ms / 1000:.1f} s trained) from {resume_file}")
    loader = DistributedTokenLoader(data, d.rank, d.world, d.device, position)
    eval_cfg = EvalConfig(seq_len=cfg.train_seq_len, val_tokens=cfg.val_tokens, device=str(d.device))
    eval_data = EvalData.load(data) if d.main else None
    val_history: list[dict] = []

    def validate() -> dict:
        result = evaluate_model(base_model, eval_data, eval_cfg, progress=False) if d.main else {}
        val_history.append({"step": step, "val_loss": result.get("val_loss"), "val_bpb": result.get("val_bpb")})
        return result

    from rich.progress import Progress, BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    progress = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                        TimeElapsedColumn(), disable=not d.main, transient=True)
    task = progress.add_task("", total=cfg.iterations, completed=step)
    final_val: dict = {}
    live_val: dict = {}
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with progress:
        while True:
            last_step = step == cfg.iterations or (stop_after is not None and step >= stop_after)
            if last_step or (cfg.val_loss_every > 0 and step % cfg.val_loss_every == 0 and step > 0):
                if cuda:
                    torch.cuda.synchronize()
                train_ms += 1000.0 * (time.perf_counter() - t0)  # validation time is not training time
                if last_step:  # the float weights of the full model are evaluated and saved
                    base_model.set_looping(True)
                    set_qat(base_model, False)
                if last_step and average is not None and average.count:
                    live_val = validate()
                    average.load_into(base_model)
                final_val = validate()
                if d.main and final_val:
                    progress.console.print(f"step {step}: val_loss {final_val['val_loss']:.4f} val_bpb {final_val['val_bpb']:.4f}")
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            if last_step:
                break
            elapsed_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
            scale = lr_scale(cfg, step, elapsed_ms)
            run_frac = run_fraction(cfg, step, elapsed_ms)
            if delayed_loops and base_model.looping != (run_frac >= cfg.loop_enable_frac):
                base_model.set_looping(run_frac >= cfg.loop_enable_frac)
                loop_switch_step = step if base_model.looping else None
                if d.main:
                    progress.console.print(f"step {step}: depth recurrence {'on' if base_model.looping else 'off'}")
            if cfg.qat_bits:
                set_qat(base_model, run_frac >= cfg.qat_start_frac)
            frac = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps > 0 else 1.0
            for group in muon.param_groups:
                group["momentum"] = (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum
            for opt in optimizers:
                for group in opt.param_groups:
                    group["lr"] = group["base_lr"] * scale
            loss = train_step(loader)
            step += 1
            approx_ms = train_ms + 1000.0 * (time.perf_counter() - t0)
            if average is not None and (average.kind == "ema" or (
                    run_fraction(cfg, step, approx_ms) >= cfg.swa_start_frac and step % cfg.swa_every == 0)):
                average.update(base_model)
            if step % cfg.log_every == 0 or step == 1 or step == cfg.iterations:
                last_loss = float(loss.item())
                if not math.isfinite(last_loss):
                    raise PgolfError(f"training diverged at step {step} (loss {last_loss}); lower the learning rates")
                rows.append((step, last_loss, scale, round(approx_ms, 1), step * cfg.train_batch_tokens))
                status = f"loss {last_loss:.4f} lr×{scale:.3f} {approx_ms / step:.0f} ms/step"
                progress.update(task, completed=step, description=status)
                if d.main and (step % cfg.log_every == 0 or step == 1):
                    progress.console.print(f"step {step}/{cfg.iterations}: {status}")
            capped = cfg.max_wallclock_seconds > 0 and approx_ms >= 1000.0 * cfg.max_wallclock_seconds
            if stop_after is None and d.any(capped):
                stop_after = step
            unfinished = step < cfg.iterations and stop_after is None
            suspend = (unfinished and suspend_after is not None
                       and d.any(time.perf_counter() - started >= suspend_after))
            if suspend or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0 and unfinished):
                pause = time.perf_counter()  # saving is not training time
                opt_states = trainstate.optimizer_states(optimizers)  # every rank: Muon gathers its momentum
                if d.main:
                    trainstate.save(resume_file, base_model, opt_states, step, approx_ms, loader.stream.state(),
                                    rows, model_cfg, cfg, d.world, average, loop_switch_step)
                t0 += time.perf_counter() - pause
            if suspend:
                if d.main:
                    progress.console.print(f"train: suspended at step {step} ({approx_ms / 1000:.1f} s trained); "
                                           f"the state is in {resume_file}: run the same command with --resume")
                return

    if not d.main:
        return
    peak_mem = torch.cuda.max_memory_allocated() if cuda else None
    state = {k: v.detach() for k, v in base_model.state_dict().items()}
    meta = {
        "model_config": asdict(base_model.cfg),
        "params": asdict(cfg),
        "inputs": {"manifest": sha256_file(manifest_path)},
        "tokenizer_sha256": read_json(manifest_path).get("tokenizer_sha256"),
        "steps": step,
        "world_size": d.world,
    }
    save_tensors(out, state, "checkpoint", meta)
    with atomic_path(log) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("step", "train_loss", "lr_scale", "elapsed_ms", "tokens"))
        writer.writerows(rows)
    write_json(metrics, {
        "steps": step,
        "train_time_ms": round(train_ms, 1),
        "ms_per_step": round(train_ms / max(step, 1), 2),
        "tokens_per_s": round(step * cfg.train_batch_tokens / max(train_ms / 1000.0, 1e-9)),
        "train_loss": finite_or_none(last_loss),
        "val_loss": final_val.get("val_loss"),
        "val_bpb": final_val.get("val_bpb"),
        "val_bpb_lut": final_val.get("val_bpb_lut"),
        "val_bpb_sidecar": final_val.get("val_bpb_sidecar"),
        "val_bpb_live_weights": live_val.get("val_bpb"),  # before the EMA/SWA swap (None without one)
        "weight_average": {"kind": average.kind, "snapshots": average.count} if average else None,
        "looping_enabled_at_step": loop_switch_step if delayed_loops else None,
        "val_tokens_scored": final_val.get("tokens_scored"),
        "val_history": val_history,
        "model_params": n_params,
        "peak_memory_bytes": peak_mem,
        "world_size": d.world,
        "device": torch.cuda.get_device_name(d.device) if cuda else "cpu",
    })
    mem = f", peak {peak_mem / 2**30:.2f} GiB" if peak_mem else ""
    lut = final_val.get("val_bpb_lut")
    resume_file.unlink(missing_ok=True)  # finished: nothing left to resume
    print(f"train: {step} steps, {train_ms / max(step, 1):.1f} ms/step, "
          f"{step * cfg.train_batch_tokens / max(train_ms / 1000.0, 1e-9):,.0f} tokens/s{mem}; "
          f"val_bpb {final_val.get('val_bpb'):.4f} (LUT {lut:.4f}); wrote {out}")
