"""A training run's full state, saved so that a stopped run resumes exactly where it was.

It holds what the next step depends on: weights, every optimizer's state (Adam moments, Muon momentum),
the weight average (EMA or SWA shadow, when on), the data stream's position, the step, the schedule's
clock (training milliseconds so far), the loss rows logged, and the steps depth recurrence and Reptile
started at. With these restored, a resumed run takes exactly the steps an uninterrupted one would. The file is
the checkpoint's name plus `.resume`, written periodically (`checkpoint_every`) or on `--suspend-after`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from pgolf.config.sections import ModelConfig, TrainConfig
from pgolf.errors import PgolfError
from pgolf.formats.files import load_tensors, save_tensors
from pgolf.nn.average import WeightAverage

KIND = "train-state"
# Params that may differ between the stopped run and its resumption without changing the result.
RESUMABLE_CHANGES = ("checkpoint_every", "log_every", "device", "compile", "val_loss_every")


@dataclass
class Progress:
    """Where a run stands: the part of the state that is not tensors."""

    step: int = 0
    train_ms: float = 0.0
    stream_position: tuple[int, int] = (0, 0)
    loss_rows: list[tuple] = field(default_factory=list)
    loop_switch_step: int | None = None
    schedule_factor: float | None = None  # schedule_scale's factor, fixed once (a resumed run keeps it)
    reptile_from_step: int | None = None  # the first Reptile outer step (pgolf.nn.reptile); None before
    tokens: int = 0  # training tokens read so far (a Reptile step reads fewer than a batch)


def state_path(out: Path) -> Path:
    return out.with_name(out.name + ".resume")


def optimizer_states(optimizers: list[torch.optim.Optimizer]) -> list[dict]:
    """Every optimizer's whole state. A collective under torchrun (Muon's momentum is spread over the ranks),
    so every rank calls it and the main one saves."""
    return [getattr(opt, "gathered_state_dict", opt.state_dict)() for opt in optimizers]


class Checkpointer:
    """Saves and restores the full training state of one run (its params and world size fingerprinted)."""

    def __init__(self, out: Path, model_cfg: ModelConfig, cfg: TrainConfig, world: int, tokenizer_sha256: str | None):
        """tokenizer_sha256: the training data's, so that a run never resumes on text of another tokenizer."""
        self.path = state_path(Path(out))
        self.every = cfg.checkpoint_every
        params = {k: v for k, v in asdict(cfg).items() if k not in RESUMABLE_CHANGES}
        self.fingerprint = {"model_config": asdict(model_cfg), "params": params, "world_size": world,
                            "tokenizer_sha256": tokenizer_sha256}

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def save(self, model: torch.nn.Module, opt_states: list[dict], progress: Progress,
             average: WeightAverage | None) -> None:
        tensors = {f"model/{k}": v.detach() for k, v in model.state_dict().items()}
        tensors.update({f"average/{k}": v for k, v in (average.shadow if average else {}).items()})
        groups = []
        for i, sd in enumerate(opt_states):
            for pid, pstate in sd["state"].items():
                for key, value in pstate.items():
                    tensors[f"opt{i}/{pid}/{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
            groups.append(sd["param_groups"])
        save_tensors(self.path, tensors, KIND, {
            "step": progress.step, "train_ms": progress.train_ms, "stream_position": list(progress.stream_position),
            "param_groups": json.dumps(groups), "loss_rows": progress.loss_rows,
            "average_count": average.count if average else 0, "loop_switch_step": progress.loop_switch_step,
            "schedule_factor": progress.schedule_factor, "reptile_from_step": progress.reptile_from_step,
            "tokens": progress.tokens,
            **self.fingerprint,
        })

    def load(self, model: torch.nn.Module, optimizers: list[torch.optim.Optimizer],
             average: WeightAverage | None) -> Progress:
        """Restore model, optimizers and weight average in place; return where the run stood."""
        if not self.path.is_file():
            raise PgolfError(f"{self.path}: no saved training state to resume from; run without --resume "
                             "(and with train.checkpoint_every > 0, or --suspend-after, so that a stopped run can "
                             "resume)")
        tensors, meta = load_tensors(self.path, KIND)
        for key, want in self.fingerprint.items():
            if meta.get(key) != want:
                raise PgolfError(f"{self.path}: saved by a run with another {key.replace('_', ' ')}"
                                 f"{_differences(meta.get(key), want)}; resume with the same data, params and world "
                                 "size, or delete the file to start afresh")
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
        return Progress(int(meta["step"]), float(meta["train_ms"]), tuple(meta["stream_position"]),
                        [tuple(r) for r in meta.get("loss_rows", [])], meta.get("loop_switch_step"),
                        meta.get("schedule_factor"), meta.get("reptile_from_step"),
                        # states saved before the count read a whole batch a step
                        meta.get("tokens", int(meta["step"]) * self.fingerprint["params"]["train_batch_tokens"]))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def _differences(saved: Any, want: Any) -> str:
    """' (iterations: 200 saved, 300 now; ...)' for two param dicts; '' otherwise."""
    if not isinstance(saved, dict) or not isinstance(want, dict):
        return f" ({saved} saved, {want} now)" if not isinstance(want, dict) else ""
    keys = [k for k in sorted(set(saved) | set(want)) if saved.get(k) != want.get(k)]
    return " (" + "; ".join(f"{k}: {saved.get(k)!r} saved, {want.get(k)!r} now" for k in keys[:6]) + ")" if keys else ""
