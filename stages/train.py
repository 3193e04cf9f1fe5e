"""train: tokenized shards → ckpt.safetensors, train_metrics.json (+ its report), train_log.csv (+ .png).

The loop, the optimizer groups and the schedule are pgolf.nn (trainer, optim, schedule); this stage
reads the data's manifest, runs the trainer on every rank, and on the main rank writes the checkpoint
(weights + model config, params and the data's tokenizer hash), the loss table and the metrics.
"""

from __future__ import annotations

import csv
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from pgolf.config.sections import ModelConfig, TrainConfig
from pgolf.errors import PgolfError
from pgolf.formats.files import atomic_path, finite_or_none, read_json, save_tensors, sha256_file
from pgolf.nn.distributed import Dist
from pgolf.nn.trainer import Trainer, TrainResult
from pgolf.nn.trainstate import Checkpointer
from pgolf.report.metrics import write_metrics
from pgolf.report.plots import loss_chart

LOG_COLUMNS = ("step", "train_loss", "lr_scale", "elapsed_ms", "tokens")


def resolve_vocab(model_cfg: ModelConfig, manifest: dict, manifest_path: Path) -> ModelConfig:
    """The model config with the data's vocabulary size and BOS id."""
    vocab = int(manifest["vocab_size"])
    if model_cfg.vocab_size not in (0, vocab):
        raise PgolfError(f"model.vocab_size={model_cfg.vocab_size} but {manifest_path} has a {vocab}-token "
                         "tokenizer; drop model.vocab_size (it defaults to the data's) or re-tokenize")
    return replace(model_cfg, vocab_size=vocab, bos_id=int(manifest.get("bos_id", 1)))


def run(data: Path, out: Path, model_cfg: ModelConfig, cfg: TrainConfig, metrics: Path, log: Path,
        resume: bool = False, suspend_after: float | None = None) -> None:
    """Train and write the checkpoint. `suspend_after` (seconds of this call, compiling included) saves the
    full state and returns early, to be continued with `resume` (for machines lent by the hour)."""
    started = time.perf_counter()
    data, out = Path(data), Path(out)
    manifest_path = data / "manifest.json"
    manifest = read_json(manifest_path, "tokenized-data manifest")
    model_cfg = resolve_vocab(model_cfg, manifest, manifest_path)
    d = Dist(cfg.device)
    try:
        checkpointer = Checkpointer(out, model_cfg, cfg, d.world, manifest.get("tokenizer_sha256"))
        trainer = Trainer(d, data, model_cfg, cfg, checkpointer)
        trainer.prime_compiled_kernels()
        if resume:
            trainer.resume()
        trainer.fit_schedule()
        result = trainer.run(started, suspend_after)
    finally:
        d.close()
    if result is None or not d.main:
        return
    write_outputs(result, cfg, manifest_path, manifest, out, metrics, log, d.world, str(d.device))
    checkpointer.remove()  # finished: nothing left to resume


def write_outputs(result: TrainResult, cfg: TrainConfig, manifest_path: Path, manifest: dict, out: Path,
                  metrics: Path, log: Path, world: int, device: str) -> None:
    p, val = result.progress, result.final_val
    model = result.model
    # Multi-token heads are a training objective (PR #375): the checkpoint is the model without them.
    state = {k: v.detach() for k, v in model.state_dict().items() if not k.startswith("mtp.")}
    save_tensors(out, state, "checkpoint", {
        "model_config": {**asdict(model.cfg), "mtp_heads": 0},
        "params": asdict(cfg),
        # a distilled checkpoint names its teacher by content (pgolf.nn.distill)
        "inputs": {"manifest": sha256_file(manifest_path),
                   **({"distill_teacher": result.distill_teacher["sha256"]} if result.distill_teacher else {})},
        "tokenizer_sha256": manifest.get("tokenizer_sha256"),
        "steps": p.step,
        "world_size": world,
    })
    with atomic_path(log) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(LOG_COLUMNS)
        writer.writerows(p.loss_rows)
    loss_chart(Path(log).with_suffix(".png"), p.loss_rows, result.val_history,
               f"{out.name}: {p.step} steps, val_bpb {val.get('val_bpb'):.4f}")
    seconds = max(p.train_ms / 1000.0, 1e-9)
    cuda = device.startswith("cuda")
    detail = {
        "steps": p.step,
        "train_time_ms": round(p.train_ms, 1),
        "ms_per_step": round(p.train_ms / max(p.step, 1), 2),
        "tokens_per_s": round(p.tokens / seconds),
        "train_loss": finite_or_none(result.last_loss),
        "val_loss": val.get("val_loss"),
        "val_bpb": val.get("val_bpb"),
        "val_bpb_lut": val.get("val_bpb_lut"),
        "val_bpb_sidecar": val.get("val_bpb_sidecar"),
        "val_bpb_live_weights": result.live_val.get("val_bpb"),  # before the EMA/SWA swap (None without one)
        "weight_average": result.weight_average,
        "looping_enabled_at_step": result.looping_enabled_at_step,
        "schedule": result.schedule,
        "distill_teacher": result.distill_teacher,
        "reptile": result.reptile,
        "denseformer": model.denseformer.describe() if model.denseformer is not None else None,
        "val_tokens_scored": val.get("tokens_scored"),
        "val_history": result.val_history,
        "model_params": sum(t.numel() for t in state.values()),  # as saved (multi-token heads dropped)
        "peak_memory_bytes": result.peak_memory_bytes,
        "world_size": world,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
    }
    # tokens trained (comparable across batch sizes; steps are in the report), seconds of training as the
    # wall-clock cap counts them
    row = {"tokens": p.tokens, "val_bpb": val.get("val_bpb"), "seconds": round(seconds, 1)}
    write_metrics(metrics, row, detail)
    peak = result.peak_memory_bytes
    mem = f", peak {peak / 2**30:.2f} GiB" if peak else ""
    print(f"train: {p.step} steps, {p.train_ms / max(p.step, 1):.1f} ms/step, "
          f"{p.tokens / seconds:,.0f} tokens/s{mem}; "
          f"val_bpb {val.get('val_bpb'):.4f} (LUT {val.get('val_bpb_lut'):.4f}); wrote {out}")
