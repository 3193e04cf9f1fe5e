"""Weight averaging: an fp32 shadow of every weight (EMA or SWA), saved and evaluated instead of the
live weights."""

from __future__ import annotations

import torch

from pgolf.config.sections import TrainConfig
from pgolf.errors import PgolfError


class WeightAverage:
    """An fp32 shadow of every weight, which is saved and evaluated instead of the live weights.

    EMA: shadow ← decay·shadow + (1 − decay)·w after every step. The reference starts the shadow at the
    initial weights; with `bias_correction` it starts at zero and is read as shadow / (1 − decayⁿ) (as Adam
    corrects its moments), the same up to decayⁿ (< 1e-7 at the records' step counts) but free of the
    initialization in a short run: 206 steps of decay 0.9965 would otherwise leave 49 % of it.
    SWA: the plain mean of the snapshots taken (every `swa_every` steps from `swa_start_frac` of the run
    on). fp32 either way: summing bf16 weights in bf16 loses the small differences being averaged
    (early record scripts summed bf16 SWA snapshots in bf16).
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
        state = model.state_dict()
        # one fused kernel per group of tensors, not one launch per weight (~100 of them) every step
        torch._foreach_lerp_([self.shadow[k] for k in state], [v.float() for v in state.values()], weight)

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


def weight_average_for(model: torch.nn.Module, cfg: TrainConfig) -> WeightAverage | None:
    """The run's weight average: EMA (ema_decay > 0), SWA (swa_every > 0), or none."""
    if cfg.ema_decay > 0:
        return WeightAverage(model, "ema", cfg.ema_decay, cfg.ema_bias_correction)
    if cfg.swa_every > 0:
        return WeightAverage(model, "swa")
    return None
