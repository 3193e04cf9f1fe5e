"""Every training switch as a function of the run's progress, in one object; and (`scaled`, schedule_scale)
the step-counted lengths fitted to the steps a run will really make.

Progress is the fraction of the run done: by wall-clock under a cap (the reference's rule, so a capped
run's warmdown ends at the cap whatever its step time), else by steps. The loop asks the schedule, step
by step, for the LR multiplier, Muon's momentum, and whether depth recurrence, QAT, SWA and Reptile are on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from pgolf.config.sections import TrainConfig


@dataclass(frozen=True)
class Schedule:
    cfg: TrainConfig

    def progress(self, step: int, elapsed_ms: float) -> float:
        cfg = self.cfg
        if cfg.max_wallclock_seconds > 0:
            return elapsed_ms / (1000.0 * cfg.max_wallclock_seconds)
        return step / max(cfg.iterations, 1)

    def lr_scale(self, step: int, elapsed_ms: float) -> float:
        """A linear warm-up over `lr_warmup_steps`, then 1, then a linear warmdown to 0 floored at `min_lr`
        (or, with `lr_schedule: cosine`, a cosine from 1 to `min_lr` over the run).
        The warmdown is the last `warmdown_frac` of the run, or else the last `warmdown_iters` steps —
        under a cap, that many steps' worth of time at the average step time so far (the reference's rule)."""
        cfg = self.cfg
        warmup = min((step + 1) / cfg.lr_warmup_steps, 1.0) if cfg.lr_warmup_steps > 0 else 1.0
        if cfg.lr_schedule == "cosine":  # PR #1227's AdamW runs: cosine from 1 to min_lr over the whole run
            done = min(max(self.progress(step, elapsed_ms), 0.0), 1.0)
            return warmup * (cfg.min_lr + (1 - cfg.min_lr) * 0.5 * (1 + math.cos(math.pi * done)))
        if cfg.warmdown_frac > 0:
            decay = min((1.0 - self.progress(step, elapsed_ms)) / cfg.warmdown_frac, 1.0)
        elif cfg.warmdown_iters <= 0:
            decay = 1.0
        elif cfg.max_wallclock_seconds <= 0:
            start = max(cfg.iterations - cfg.warmdown_iters, 0)
            decay = max((cfg.iterations - step) / cfg.warmdown_iters, 0.0) if start <= step < cfg.iterations else 1.0
        else:
            warmdown_ms = cfg.warmdown_iters * elapsed_ms / max(step, 1)
            remaining_ms = max(1000.0 * cfg.max_wallclock_seconds - elapsed_ms, 0.0)
            decay = remaining_ms / max(warmdown_ms, 1e-9) if remaining_ms <= warmdown_ms else 1.0
        return warmup * max(decay, cfg.min_lr)

    def muon_momentum(self, step: int) -> float:
        """Linear from `muon_momentum_warmup_start` to `muon_momentum` over the warm-up steps."""
        cfg = self.cfg
        frac = min(step / cfg.muon_momentum_warmup_steps, 1.0) if cfg.muon_momentum_warmup_steps > 0 else 1.0
        return (1 - frac) * cfg.muon_momentum_warmup_start + frac * cfg.muon_momentum

    def delays_looping(self, num_loops: int) -> bool:
        """Whether depth recurrence starts off and switches on part-way (one retrace when it does)."""
        return num_loops > 0 and self.cfg.loop_enable_frac > 0

    def looping(self, progress: float) -> bool:
        return progress >= self.cfg.loop_enable_frac

    def qat(self, progress: float) -> bool:
        return bool(self.cfg.qat_bits) and progress >= self.cfg.qat_start_frac

    def reptile(self, progress: float) -> bool:
        """Whether the step is a Reptile outer step (pgolf.nn.reptile): the last `reptile_frac` of the run."""
        return self.cfg.reptile_frac > 0 and progress >= 1.0 - self.cfg.reptile_frac

    def swa_snapshot(self, step: int, progress: float) -> bool:
        """Whether SWA averages in the weights after `step` steps."""
        return self.cfg.swa_every > 0 and progress >= self.cfg.swa_start_frac and step % self.cfg.swa_every == 0


def scaled(cfg: TrainConfig, factor: float) -> TrainConfig:
    """`cfg` with every step-counted length multiplied by `factor` (schedule_scale): the LR warm-up
    and warmdown, Muon's momentum warm-up, the SWA period and the EMA's horizon 1/(1 − decay). Lengths set
    stay at least one step (the EMA's horizon two); those that are off stay off. Fractions of the run need no
    scaling."""
    def steps(n: int) -> int:
        return max(1, round(n * factor)) if n > 0 else 0

    decay = cfg.ema_decay
    if decay > 0:  # the horizon 1/(1 − decay) scaled, at least 2 steps (decay 0.5), so the EMA stays on
        decay = 1.0 - 1.0 / max(2.0, factor / (1.0 - decay))
    return replace(cfg, lr_warmup_steps=steps(cfg.lr_warmup_steps), warmdown_iters=steps(cfg.warmdown_iters),
                   muon_momentum_warmup_steps=steps(cfg.muon_momentum_warmup_steps), swa_every=steps(cfg.swa_every),
                   ema_decay=decay)


def run_length(cfg: TrainConfig, step_ms: float | None) -> int:
    """The steps this run will make: the cap over the step time (never past `iterations`), or `iterations`."""
    if cfg.max_wallclock_seconds > 0 and step_ms:
        return max(1, min(cfg.iterations, int(1000.0 * cfg.max_wallclock_seconds / step_ms)))
    return max(1, cfg.iterations)
