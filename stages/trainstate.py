"""A training run's full state, saved periodically so that a killed run can resume.

It holds what the next step depends on: weights, every optimizer's state (Adam moments, Muon momentum),
the weight average (EMA or SWA shadow, when on), the data stream's position, the step, and the schedule's clock
(training milliseconds so far). With these restored, a resumed run takes exactly the steps an
uninterrupted one would.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .artifacts import PgolfError, load_tensors, save_tensors
from .config import ModelConfig, TrainConfig

KIND = "train-state"
# Params that may differ between the killed run and its resumption without changing the result.
RESUMABLE_CHANGES = ("checkpoint_every", "log_every", "device", "compile", "val_loss_every")


class WeightAverage:
    """An fp32 shadow of every weight, which is saved and evaluated instead of the live weights.

    EMA: shadow ← decay·shadow + (1 − decay)·w after every step. The reference starts the shadow at the
    initial weights; with `bias_correction` it starts at zero and is read as shadow / (1 − decayⁿ) (as Adam
    corrects its moments), the same up to decayⁿ (< 1e-7 at the records' step counts) but free of the
    initialization in a short run: 206 steps of decay 0.9965 would otherwise leave 49 % of it.
    SWA: the plain mean of the snapshots taken (every `swa_every` steps from `swa_start_frac` of the run
    on). fp32 either way: summing bf16 weights in bf16 loses the small differences being averaged
    (TECHNIQUES.md §7 item 9).
    """

    def __init__(self, model: torch.nn.Module, kind: str, decay: float = 0.0, bias_correction: bool = False):
        self.kind, self.decay, self.count = kind, decay, 0
        self.bias_correction = kind == "ema" and bias_correction
        self.shadow = {k: (torch.zeros_like(v, dtype=torch.float32) if self.bias_correction else v.detach().float().clone())
                       for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.count += 1
        weight = 1.0 - self.decay if self.kind == "ema" else 1.0 / self.count  # SWA's first snapshot replaces
        for k, v in model.state_dict().items():
            self.shadow[k].lerp_(v.float(), weight)

    def averaged(self) -> dict[str, torch.Tensor]:
        """The averaged weights (fp32)."""
        if not self.bias_correction:
            return self.shadow
        if not self.count:
            raise PgolfError("the bias-corrected EMA has no update yet; nothing to average")
        norm = 1.0 - self.decay ** self.count
        return {k: v / norm for k, v in self.shadow.items()}

    def load_into(self, model: torch.nn.Module) -> None:
        own = model.state_dict()
        model.load_state_dict({k: v.to(own[k].dtype) for k, v in self.averaged().items()})


def state_path(out: Path) -> Path:
    return out.with_name(out.name + ".resume")


def _fingerprint(model_cfg: ModelConfig, cfg: TrainConfig, world: int) -> dict[str, Any]:
    params = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}
    return {"model_config": asdict(model_cfg), "params": params, "world_size": world}


def optimizer_states(optimizers: list[torch.optim.Optimizer]) -> list[dict]:
    """Every optimizer's whole state. A collective under torchrun (Muon's momentum is spread over the ranks),
    so every rank calls it and the main one saves."""
    return [getattr(opt, "gathered_state_dict", opt.state_dict)() for opt in optimizers]


def save(path: Path, model: torch.nn.Module, opt_states: list[dict], step: int, train_ms: float,
         stream_position: tuple[int, int], loss_rows: list[tuple], model_cfg: ModelConfig, cfg: TrainConfig,
         world: int, average: WeightAverage | None = None, loop_switch_step: int | None = None) -> None:
    tensors = {f"model/{k}": v.detach() for k, v in model.state_dict().items()}
    tensors.update({f"average/{k}": v for k, v in (average.shadow if average else {}).items()})
    groups = []
    for i, sd in enumerate(opt_states):
        for pid, pstate in sd["state"].items():
            for key, value in pstate.items():
                tensors[f"opt{i}/{pid}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
        groups.append(sd["param_groups"])
    save_tensors(path, tensors, KIND, {
        "step": step, "train_ms": train_ms, "stream_position": list(stream_position),
        "param_groups": json.dumps(groups), "loss_rows": loss_rows, "average_count": average.count if average else 0,
        "loop_switch_step": loop_switch_step,
        **_fingerprint(model_cfg, cfg, world),
    })


def load(path: Path, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer], model_cfg: ModelConfig,
         cfg: TrainConfig, world: int, average: WeightAverage | None = None
         ) -> tuple[int, float, tuple[int, int], list[tuple], int | None]:
    """Restore model, optimizers and weight average in place; return (step, train_ms, stream position, loss rows,
    the step depth recurrence switched on at, if it has)."""
    if not path.is_file():
        raise PgolfError(f"{path}: no saved training state to resume from; run without --resume "
                         "(and with train.checkpoint_every > 0, or --suspend-after, so that a stopped run can resume)")
    tensors, meta = load_tensors(path, KIND)
    want = _fingerprint(model_cfg, cfg, world)
    for key in want:
        if meta.get(key) != want[key]:
            raise PgolfError(f"{path}: saved by a run with another {key.replace('_', ' ')}; resume with the same "
                             "params and world size, or delete the file to start afresh")
    model.load_state_dict({k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
    if average is not None:
        for k, v in average.shadow.items():
            v.copy_(tensors[f"average/{k}"])
        average.count = int(meta["average_count"])
    groups = json.loads(meta["param_groups"])
    for i, opt in enumerate(optimizers):
        state: dict[int, dict[str, Any]] = {}
        prefix = f"opt{i}/"
        for key, value in tensors.items():
            if key.startswith(prefix):
                pid, name = key[len(prefix):].split("/", 1)
                state.setdefault(int(pid), {})[name] = value
        opt.load_state_dict({"state": state, "param_groups": groups[i]})
    rows = [tuple(r) for r in meta.get("loss_rows", [])]
    return int(meta["step"]), float(meta["train_ms"]), tuple(meta["stream_position"]), rows, meta.get("loop_switch_step")
