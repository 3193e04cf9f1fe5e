"""The training loop, as a story: prime the compiled kernels, resume if asked, then step until the
iteration count or the wall-clock cap, validating on the way and saving a resumable state when due.

The reference recipe (the challenge's train_gpt.py): gradient accumulation to a fixed global batch, the
schedule of pgolf.nn.schedule, compile-priming steps that are rolled back, validation time not counted
as training time. One process, or DDP under torchrun (NCCL on CUDA, gloo on CPU). The seed studies'
knowledge distillation and Reptile phase are pgolf.nn.distill and pgolf.nn.reptile, hooked in per micro-batch
and per step.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import record_function

from pgolf.config.sections import EvalConfig, ModelConfig, TrainConfig
from pgolf.errors import PgolfError
from pgolf.formats.shards import DistributedTokenLoader
from pgolf.nn.attention import SegmentPlanner, training_backend
from pgolf.nn.average import weight_average_for
from pgolf.nn.distill import DistilledObjective, load_teacher
from pgolf.nn.distributed import Dist
from pgolf.nn.model import GPT, autocast_for, enable_qat, prepare_for_device, set_qat
from pgolf.nn.muon import Muon
from pgolf.nn.optim import build_optimizers
from pgolf.nn.reptile import reptile_step
from pgolf.nn.schedule import Schedule, run_length, scaled
from pgolf.nn.trainstate import Checkpointer, Progress, optimizer_states
from pgolf.report.progress import Bar
from pgolf.text.evaluate import EvalData, evaluate_model


def micro_steps(cfg: TrainConfig, world: int) -> int:
    """Micro-steps per rank; the global batch stays the same whatever the world size."""
    if cfg.grad_accum_steps % world:
        raise PgolfError(f"train.grad_accum_steps={cfg.grad_accum_steps} is not divisible by the world size {world}; "
                         "use a world size that divides it")
    accum = cfg.grad_accum_steps // world
    if cfg.train_batch_tokens % (world * accum * cfg.train_seq_len):
        raise PgolfError(f"train.train_batch_tokens={cfg.train_batch_tokens} must be a multiple of "
                         f"world·accum·seq_len = {world * accum * cfg.train_seq_len}")
    return accum


class Clock:
    """Training time in ms: running while the model trains, paused for validation and saving."""

    def __init__(self, cuda: bool, train_ms: float = 0.0):
        self.cuda, self.train_ms = cuda, train_ms
        self.start()

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.train_ms += 1000.0 * (time.perf_counter() - self.t0)

    def elapsed_ms(self) -> float:
        return self.train_ms + 1000.0 * (time.perf_counter() - self.t0)

    @contextlib.contextmanager
    def excluded(self):
        """Time spent in the block (saving a state) is not training time."""
        pause = time.perf_counter()
        yield
        self.t0 += time.perf_counter() - pause


@dataclass
class TrainResult:
    """What a finished run hands to the train stage to write out (on the main rank)."""

    model: GPT
    progress: Progress
    last_loss: float
    final_val: dict
    live_val: dict  # before the EMA/SWA swap; {} without one
    val_history: list[dict] = field(default_factory=list)
    weight_average: dict | None = None
    looping_enabled_at_step: int | None = None
    peak_memory_bytes: int | None = None
    schedule: dict | None = None  # schedule_scale's factor and the lengths it gave; None when off
    distill_teacher: dict | None = None  # the teacher's file, sha256 and size; None without one
    reptile: dict | None = None  # where the Reptile phase started and its steps; None when off


def l1_penalty(matrix_opt: torch.optim.Optimizer, lam: float) -> torch.Tensor:
    """λ·Σ|w| over the block matrices (their optimizer's parameters): the seed study's L1 regularisation (PR #375)."""
    return lam * sum(p.abs().sum() for g in matrix_opt.param_groups for p in g["params"])


CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile's modes that replay CUDA graphs


def own_gradients(model: torch.nn.Module) -> None:
    """Under CUDA graphs (a compile_mode of CUDA_GRAPH_MODES) the first backward's gradients become the parameters'
    .grad as they are, buffers the backward graph owns; its next replay overwrites them, and accumulating into
    them then reads overwritten memory (pytorch/pytorch#169545). A copy per step makes them ours."""
    for p in model.parameters():
        if p.grad is not None:
            p.grad = p.grad.clone()


class Trainer:
    """One rank's run: the model (compiled, DDP-wrapped), its optimizers, schedule, weight average and checkpointer."""

    def __init__(self, d: Dist, data: Path, model_cfg: ModelConfig, cfg: TrainConfig, checkpointer: Checkpointer):
        self.d, self.data, self.cfg, self.checkpointer = d, data, cfg, checkpointer
        self.accum = micro_steps(cfg, d.world)
        self.cuda = d.device.type == "cuda"
        # Knowledge distillation (pgolf.nn.distill): the teacher is built before the seed is set, so that its
        # construction draws none of the random numbers the student's init and training see.
        self.teacher = None
        if cfg.distill_teacher:
            self.teacher = load_teacher(cfg.distill_teacher, model_cfg, checkpointer.fingerprint["tokenizer_sha256"],
                                        d.device)
            checkpointer.fingerprint["distill_teacher_sha256"] = self.teacher.sha256  # never resume on another
        torch.manual_seed(cfg.seed)
        if self.cuda:
            torch.cuda.manual_seed(cfg.seed)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.cuda.reset_peak_memory_stats()
        self.model = prepare_for_device(GPT(model_cfg), d.device)
        self.model.label_smoothing = cfg.label_smoothing  # before compile: read as a constant of the graph
        self.model.mtp_weight = cfg.mtp_weight if model_cfg.mtp_heads else 0.0  # likewise
        if cfg.qat_bits:
            enable_qat(self.model, cfg.qat_bits)  # before compile: the on/off toggle is a buffer
        # with a teacher the objective takes its logits as an input and computes the student's loss un-fused
        objective = self.model if self.teacher is None else DistilledObjective(self.model, cfg.distill_temperature,
                                                                                 cfg.distill_alpha)
        compiling = self.cuda and cfg.compile
        outer = d.enabled and compiling and cfg.ddp_graph == "compiled_ddp"
        mode = None if cfg.compile_mode == "default" else cfg.compile_mode
        self.cuda_graphs = compiling and cfg.compile_mode in CUDA_GRAPH_MODES
        compiled = (torch.compile(objective, dynamic=False, fullgraph=True, mode=mode) if compiling and not outer
                    else objective)
        if d.enabled and compiling:  # read when Dynamo compiles (the first forward); see TrainConfig.ddp_graph
            torch._dynamo.config.optimize_ddp = cfg.ddp_graph != "whole"
        # fa4: each batch's document segments are planned on the host (pgolf.nn.attention)
        self.attention = training_backend(model_cfg.attn_backend, d.device, model_cfg.doc_mask, model_cfg.memory_tokens)
        self.planner = SegmentPlanner(model_cfg.bos_id) if self.attention == "fa4" else None
        if d.main and model_cfg.doc_mask:
            print(f"train: document-masked attention on {self.attention} (attn_backend {model_cfg.attn_backend})")
        self.forward = DDP(compiled, device_ids=[d.local_rank] if self.cuda else None,
                           broadcast_buffers=False) if d.enabled else compiled
        self.no_sync = self.forward.no_sync if d.enabled else contextlib.nullcontext
        if outer:
            self.forward = torch.compile(self.forward, dynamic=False, mode=mode)
        self.optimizers, self.matrix_opt = build_optimizers(self.model, cfg, torch.bfloat16 if self.cuda else torch.float32)
        self.schedule = Schedule(cfg)
        self.delayed_loops = self.schedule.delays_looping(model_cfg.num_loops)
        self.average = weight_average_for(self.model, cfg)  # evaluated and saved instead of the live weights
        self.progress = Progress()
        self.val_history: list[dict] = []
        self.primed_step_ms: float | None = None  # the compiled step's time, measured while priming
        self.estimated_steps: int | None = None  # schedule_scale: auto's run length
        self.in_reptile = False  # whether the next step is a Reptile outer step (set by apply_schedule)

    # ---- one optimizer step

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)

    def next_micro_batch(self, loader: DistributedTokenLoader) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """This rank's next micro-batch: inputs, targets and (fa4) its planned document segments."""
        cfg = self.cfg
        if self.planner is None:
            x, y = loader.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, self.accum)
            return x, y, ()
        x, y, cu_seqlens = loader.next_segmented_batch(cfg.train_batch_tokens, cfg.train_seq_len, self.accum,
                                                       self.planner)
        return x, y, (cu_seqlens,)

    def micro_loss(self, x: torch.Tensor, y: torch.Tensor, segments: tuple) -> torch.Tensor:
        """The training objective on one micro-batch (with the teacher's logits when distilling, and L1)."""
        teacher = () if self.teacher is None else (self.teacher.logits(x),)  # no_grad, frozen, eval mode
        if self.cuda_graphs:  # each micro-batch a new replay: the last one's outputs may be overwritten
            torch.compiler.cudagraph_mark_step_begin()
        with autocast_for(self.d.device):
            loss = self.forward(x, y, *teacher, *segments)
        if self.cfg.l1_lambda:
            loss = loss + l1_penalty(self.matrix_opt, self.cfg.l1_lambda)
        return loss

    def micro_step(self, loader: DistributedTokenLoader, micro: int, total: torch.Tensor) -> None:
        """Micro-batch `micro` of a step: forward and backward, its gradients accumulated (DDP syncs on the
        last micro-batch); its loss added to `total`."""
        with record_function("pgolf.micro_batch"):  # the labels are what a profiler trace shows
            x, y, segments = self.next_micro_batch(loader)
            with contextlib.nullcontext() if micro == self.accum - 1 else self.no_sync():
                loss = self.micro_loss(x, y, segments)
                total += loss.detach()
                (loss / self.accum).backward()
            if self.cuda_graphs and micro == 0 and self.accum > 1:
                own_gradients(self.model)

    def train_step(self, loader: DistributedTokenLoader) -> torch.Tensor:
        """Accumulate `accum` micro-batches, clip, step every optimizer; mean loss."""
        cfg = self.cfg
        total = torch.zeros((), device=self.d.device)
        for micro in range(self.accum):
            self.micro_step(loader, micro, total)
        with record_function("pgolf.optimizer_step"):
            if cfg.grad_clip_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip_norm)
            for opt in self.optimizers:
                opt.step()
            self.zero_grad()
        return total / self.accum

    def reptile_step(self, loader: DistributedTokenLoader) -> torch.Tensor:
        """A Reptile outer step (pgolf.nn.reptile) in place of train_step: `reptile_inner_steps` SGD steps, one
        micro-batch each (every backward syncs under DDP, so the ranks' inner gradients are averaged), then the
        interpolation. The regular optimizers do not step and keep their state; mean inner loss."""
        cfg = self.cfg
        self.zero_grad()
        params = [p for p in self.model.parameters() if p.requires_grad]
        return reptile_step(params, lambda k: self.micro_loss(*self.next_micro_batch(loader)), cfg.reptile_inner_lr,
                            cfg.reptile_outer_lr, cfg.reptile_inner_steps)

    def step_tokens(self) -> int:
        """The tokens the step just taken read over all ranks: a batch, or one micro-batch per inner step of a
        Reptile step (3 of 8 with grad_accum_steps 8 on one GPU), which is why its steps are faster."""
        cfg = self.cfg
        if self.in_reptile:
            return cfg.reptile_inner_steps * cfg.train_batch_tokens // self.accum
        return cfg.train_batch_tokens

    def apply_schedule(self, elapsed_ms: float, say) -> float:
        """Set the switches, momentum and learning rates for the next step; returns the LR multiplier."""
        step, schedule, model = self.progress.step, self.schedule, self.model
        progress = schedule.progress(step, elapsed_ms)
        if self.delayed_loops and model.looping != schedule.looping(progress):
            model.set_looping(schedule.looping(progress))
            self.progress.loop_switch_step = step if model.looping else None
            say(f"step {step}: depth recurrence {'on' if model.looping else 'off'}")
        if self.cfg.qat_bits:
            set_qat(model, schedule.qat(progress))
        if self.cfg.reptile_frac > 0:
            # under a cap each rank's clock differs a little: all ranks switch together, or their collectives part
            self.in_reptile = self.d.any(schedule.reptile(progress))
            if self.in_reptile and self.progress.reptile_from_step is None:
                self.progress.reptile_from_step = step
                say(f"step {step}: Reptile on ({self.cfg.reptile_inner_steps} inner SGD steps at lr "
                    f"{self.cfg.reptile_inner_lr}, outer lr {self.cfg.reptile_outer_lr}); the optimizers pause")
        if isinstance(self.matrix_opt, Muon):  # AdamW's betas stay as set (matrix_optimizer=adamw)
            for group in self.matrix_opt.param_groups:
                group["momentum"] = schedule.muon_momentum(step)
        scale = schedule.lr_scale(step, elapsed_ms)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * scale
        return scale

    # ---- before the loop

    def prime_compiled_kernels(self) -> None:
        """Run `warmup_steps` steps (in both depth modes when looping switches on later) so compilation is
        not timed, then roll model, optimizers and data back."""
        if self.cfg.warmup_steps <= 0:
            return
        initial_model = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        initial_opts = [copy.deepcopy(opt.state_dict()) for opt in self.optimizers]
        warm_loader = DistributedTokenLoader(self.data, self.d.rank, self.d.world, self.d.device)
        times = []
        for looping in ((False, True) if self.delayed_loops else (True,)):
            self.model.set_looping(looping)
            for i in range(self.cfg.warmup_steps):
                t0 = time.perf_counter()
                self.train_step(warm_loader)
                if self.cuda:
                    torch.cuda.synchronize()
                if i:  # the first step of each mode compiles
                    times.append(time.perf_counter() - t0)
        if times:  # every rank the same (the slowest), so that schedule_scale: auto agrees across ranks
            step_ms = torch.tensor(1000.0 * statistics.median(times), device=self.d.device)
            self.primed_step_ms = float(self.d.all_reduce_(step_ms, op="max"))
        self.model.load_state_dict(initial_model, strict=True)
        for opt, state in zip(self.optimizers, initial_opts):
            opt.load_state_dict(state)
        self.zero_grad()

    def fit_schedule(self) -> None:
        """schedule_scale: the step-counted lengths fitted to the steps this run will make. The factor
        is fixed once and saved with the training state, so a resumed run keeps it."""
        cfg, p = self.cfg, self.progress
        if cfg.schedule_scale == "off":
            return
        if p.schedule_factor is None:
            self.estimated_steps = run_length(cfg, self.primed_step_ms)
            p.schedule_factor = (self.estimated_steps / cfg.schedule_steps if cfg.schedule_scale == "auto"
                                 else float(cfg.schedule_scale))
        self.cfg = scaled(cfg, p.schedule_factor)
        self.schedule = Schedule(self.cfg)
        if self.average is not None:
            self.average.decay = self.cfg.ema_decay
        if self.d.main:
            c = self.cfg
            why = cfg.schedule_scale
            if self.estimated_steps and cfg.schedule_scale == "auto":
                why += f", ~{self.estimated_steps} steps over schedule_steps {cfg.schedule_steps}"
            print(f"train: schedule × {p.schedule_factor:.3f} ({why}): warmdown_iters {c.warmdown_iters}, "
                  f"muon_momentum_warmup_steps {c.muon_momentum_warmup_steps}, lr_warmup_steps {c.lr_warmup_steps}, "
                  f"swa_every {c.swa_every}, ema_decay {c.ema_decay:.5f}")

    def resume(self) -> None:
        self.progress = self.checkpointer.load(self.model, self.optimizers, self.average)
        if self.delayed_loops:  # as the saved run was, so that a switch still to come is seen (and reported)
            self.model.set_looping(self.progress.loop_switch_step is not None)
        if self.d.main:
            print(f"train: resuming at step {self.progress.step} ({self.progress.train_ms / 1000:.1f} s trained) "
                  f"from {self.checkpointer.path}")

    # ---- validation

    def validate(self, eval_data: EvalData | None, eval_cfg: EvalConfig) -> dict:
        result = evaluate_model(self.model, eval_data, eval_cfg, progress=True) if self.d.main else {}
        self.val_history.append({"step": self.progress.step, "val_loss": result.get("val_loss"),
                                 "val_bpb": result.get("val_bpb")})
        return result

    # ---- the loop

    def run(self, started: float, suspend_after: float | None) -> TrainResult | None:
        """Train to the end (None when suspended after `suspend_after` seconds since `started`)."""
        cfg, d, p = self.cfg, self.d, self.progress
        loader = DistributedTokenLoader(self.data, d.rank, d.world, d.device, p.stream_position)
        eval_cfg = EvalConfig(seq_len=cfg.train_seq_len, val_tokens=cfg.val_tokens, device=str(d.device))
        eval_data = EvalData.load(self.data) if d.main else None
        bar = Bar("train", cfg.iterations, "steps", enabled=d.main)
        say = bar.print

        stop_after, last_loss, final_val, live_val = None, float("nan"), {}, {}
        loss_read_at = 0.0
        clock = Clock(self.cuda, p.train_ms)
        # under a wall-clock cap the run ends at the cap, not at `iterations`: the bar follows the clock
        def done(elapsed_ms: float) -> float | None:
            return self.schedule.progress(p.step, elapsed_ms) if cfg.max_wallclock_seconds > 0 else None

        with bar:
            bar.update(p.step, done=done(p.train_ms))
            while True:
                last_step = p.step == cfg.iterations or (stop_after is not None and p.step >= stop_after)
                if last_step or (cfg.val_loss_every > 0 and p.step % cfg.val_loss_every == 0 and p.step > 0):
                    clock.stop()  # validation time is not training time
                    if last_step:  # the float weights of the full model are evaluated and saved
                        self.model.set_looping(True)
                        set_qat(self.model, False)
                        if self.average is not None and self.average.count:
                            live_val = self.validate(eval_data, eval_cfg)
                            self.average.load_into(self.model)
                    final_val = self.validate(eval_data, eval_cfg)
                    if final_val:
                        say(f"step {p.step}: val_loss {final_val['val_loss']:.4f} val_bpb {final_val['val_bpb']:.4f}")
                    clock.start()
                if last_step:
                    break

                scale = self.apply_schedule(clock.elapsed_ms(), say)
                loss = self.reptile_step(loader) if self.in_reptile else self.train_step(loader)
                p.step += 1
                p.tokens += self.step_tokens()
                elapsed_ms = clock.elapsed_ms()
                if self.average is not None and (self.average.kind == "ema" or self.schedule.swa_snapshot(
                        p.step, self.schedule.progress(p.step, elapsed_ms))):
                    self.average.update(self.model)

                logged = p.step % cfg.log_every == 0 or p.step == 1 or p.step == cfg.iterations
                # reading the loss waits for the device: every rank on logged steps (so all stop alike on a
                # divergence), the main rank also once a second for the bar
                if logged or (d.main and time.perf_counter() - loss_read_at >= 1.0):
                    last_loss, loss_read_at = float(loss.item()), time.perf_counter()
                if logged and not math.isfinite(last_loss):
                    raise PgolfError(f"training diverged at step {p.step} (loss {last_loss}); lower the learning rates")
                tokens_per_s = p.tokens / max(elapsed_ms / 1000, 1e-9)
                bar.update(p.step, f"loss {last_loss:.4f}, {tokens_per_s:,.0f} tokens/s", done=done(elapsed_ms))
                if logged:
                    p.loss_rows.append((p.step, last_loss, scale, round(elapsed_ms, 1), p.tokens))
                    if p.step % cfg.log_every == 0 or p.step == 1:
                        say(f"step {p.step}/{cfg.iterations}: loss {last_loss:.4f} lr×{scale:.3f} "
                            f"{elapsed_ms / p.step:.0f} ms/step")

                capped = cfg.max_wallclock_seconds > 0 and elapsed_ms >= 1000.0 * cfg.max_wallclock_seconds
                if stop_after is None and d.any(capped):
                    stop_after = p.step
                unfinished = p.step < cfg.iterations and stop_after is None
                suspend = (unfinished and suspend_after is not None
                           and d.any(time.perf_counter() - started >= suspend_after))
                if suspend or (unfinished and self.checkpointer.due(p.step)):
                    with clock.excluded():  # saving is not training time
                        p.train_ms, p.stream_position = elapsed_ms, loader.stream.state()
                        opt_states = optimizer_states(self.optimizers)  # every rank: Muon gathers its momentum
                        if d.main:
                            self.checkpointer.save(self.model, opt_states, p, self.average)
                if suspend:
                    say(f"train: suspended at step {p.step} ({elapsed_ms / 1000:.1f} s trained); the state is in "
                        f"{self.checkpointer.path}: run the same command with --resume")
                    return None

        p.train_ms = clock.train_ms
        return TrainResult(
            model=self.model, progress=p, last_loss=last_loss, final_val=final_val, live_val=live_val,
            val_history=self.val_history,
            weight_average={"kind": self.average.kind, "snapshots": self.average.count} if self.average else None,
            looping_enabled_at_step=p.loop_switch_step if self.delayed_loops else None,
            peak_memory_bytes=torch.cuda.max_memory_allocated() if self.cuda else None,
            schedule=None if cfg.schedule_scale == "off" else {
                "factor": p.schedule_factor, "estimated_steps": self.estimated_steps,
                "primed_step_ms": self.primed_step_ms, "warmdown_iters": cfg.warmdown_iters,
                "muon_momentum_warmup_steps": cfg.muon_momentum_warmup_steps, "lr_warmup_steps": cfg.lr_warmup_steps,
                "swa_every": cfg.swa_every, "ema_decay": cfg.ema_decay},
            distill_teacher=None if self.teacher is None else {
                **self.teacher.describe(), "temperature": cfg.distill_temperature, "alpha": cfg.distill_alpha},
            reptile=None if cfg.reptile_frac <= 0 else {
                "from_step": p.reptile_from_step,
                "steps": 0 if p.reptile_from_step is None else p.step - p.reptile_from_step,
                "inner_steps": cfg.reptile_inner_steps, "inner_lr": cfg.reptile_inner_lr,
                "outer_lr": cfg.reptile_outer_lr})
