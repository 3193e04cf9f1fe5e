"""Training on CPU: it learns, priming steps roll back, 2-process torchrun matches 1 process."""

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import assert_flat_metrics, assert_png

from pgolf.errors import PgolfError
from pgolf.formats.files import load_tensors
from pgolf.config.sections import ModelConfig, TrainConfig
from pgolf.nn.optim import build_optimizers
from pgolf.config.build import build
from pgolf.nn.schedule import Schedule
from pgolf.nn.trainer import micro_steps
from pgolf.train import run

def lr_scale(cfg: TrainConfig, step: int, elapsed_ms: float) -> float:
    return Schedule(cfg).lr_scale(step, elapsed_ms)


MODEL = ModelConfig(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)
TRAIN = TrainConfig(iterations=12, max_wallclock_seconds=0, warmdown_iters=4, warmup_steps=0,
                    train_batch_tokens=2048, train_seq_len=64, grad_accum_steps=2,
                    muon_momentum_warmup_steps=5, log_every=1, val_tokens=2048, device="cpu")


def train_once(tokenized_dir: Path, tmp: Path, cfg: TrainConfig = TRAIN, model: ModelConfig = MODEL) -> tuple[dict, dict, Path]:
    tmp.mkdir(parents=True, exist_ok=True)
    run(tokenized_dir, tmp / "ckpt.safetensors", model, cfg, tmp / "metrics.json", tmp / "log.csv")
    state, meta = load_tensors(tmp / "ckpt.safetensors", "checkpoint")
    return state, meta, tmp


def test_training_learns_and_writes_a_described_checkpoint(tokenized_dir, tmp_path):
    state, meta, out = train_once(tokenized_dir, tmp_path, replace(TRAIN, iterations=40))
    rows = list(csv.DictReader(open(out / "log.csv")))
    first, last = float(rows[0]["train_loss"]), float(rows[-1]["train_loss"])
    assert last < first - 0.5, (first, last)
    manifest = json.loads((tokenized_dir / "manifest.json").read_text())
    assert meta["model_config"]["vocab_size"] == manifest["vocab_size"]
    assert meta["tokenizer_sha256"] == manifest["tokenizer_sha256"]
    assert meta["steps"] == 40 and state["tok_emb.weight"].shape[0] == manifest["vocab_size"]
    metrics = assert_flat_metrics(out / "metrics.json")
    assert metrics["tokens"] == 40 * TRAIN.train_batch_tokens and 0 < metrics["val_bpb"] < 20
    # (the generated corpus is word salad: 40 steps memorise it, so val loss is not asserted to fall)
    report = json.loads((out / "metrics_report.json").read_text())
    assert report["steps"] == 40 and report["val_tokens_scored"] == 2048 and report["val_history"][-1]["step"] == 40
    assert report["val_bpb"] == metrics["val_bpb"] and report["denseformer"] is None  # (a study switch, off)
    assert_png(out / "log.png")  # the loss curve beside the loss table


def test_compile_priming_steps_are_rolled_back(tokenized_dir, tmp_path):
    plain, _, _ = train_once(tokenized_dir, tmp_path / "plain")
    primed, _, _ = train_once(tokenized_dir, tmp_path / "primed", replace(TRAIN, warmup_steps=3))
    for name in plain:
        assert torch.equal(plain[name], primed[name]), name


def test_lr_schedule_by_steps_and_by_wallclock():
    cfg = replace(TRAIN, iterations=100, warmdown_iters=20)
    assert lr_scale(cfg, 0, 0) == 1.0 and lr_scale(cfg, 79, 0) == 1.0
    assert lr_scale(cfg, 80, 0) == pytest.approx(1.0) and lr_scale(cfg, 90, 0) == pytest.approx(0.5)
    assert lr_scale(cfg, 99, 0) == pytest.approx(0.05)
    capped = replace(cfg, max_wallclock_seconds=10.0)
    # 100 ms/step so far: the warmdown is the last 20 steps = 2 s of the 10 s budget.
    assert lr_scale(capped, 50, 5000.0) == 1.0
    assert lr_scale(capped, 90, 9000.0) == pytest.approx(0.5)
    assert lr_scale(capped, 100, 10000.0) == 0.0


def test_bad_geometry_and_vocab_mismatch_are_clear_errors(tokenized_dir, tmp_path):
    with pytest.raises(PgolfError, match="not divisible by the world size"):
        micro_steps(replace(TRAIN, grad_accum_steps=3), 2)
    with pytest.raises(PgolfError, match="multiple of"):
        micro_steps(replace(TRAIN, train_batch_tokens=2000), 1)
    with pytest.raises(PgolfError, match="tokenizer"):
        train_once(tokenized_dir, tmp_path, model=replace(MODEL, vocab_size=77))
    assert not (tmp_path / "ckpt.safetensors").exists()


# A small `pgolf train` that 1 process × 2 micro-steps and 2 processes × 1 compute alike (equal global batch);
# the torchrun tests here and in test_multinode.py run it.
TORCHRUN_SETS = ["--set", "preset=tiny", "--set", "iterations=6", "--set", "train_seq_len=64",
                 "--set", "train_batch_tokens=2048", "--set", "grad_accum_steps=2", "--set", "val_tokens=1024",
                 "--set", "model.num_layers=2", "--set", "model.model_dim=64", "--set", "log_every=1"]


def cli_train_args(tokenized_dir: Path, out: Path) -> list[str]:
    """`-m pgolf.cli train …` of that run, writing into `out`; a launcher (python, torchrun) goes before it."""
    return ["-m", "pgolf.cli", "train", "--data", str(tokenized_dir), "--device", "cpu",
            "--out", str(out / "ckpt.safetensors"), "--metrics", str(out / "m.json"),
            "--loss-log", str(out / "log.csv"), "--params", str(out / "none.yaml"), *TORCHRUN_SETS]


@pytest.mark.slow
def test_two_process_torchrun_matches_one_process(tokenized_dir, tmp_path):
    """Equal global batch: 1 process × 2 micro-steps vs 2 processes × 1 (DDP over gloo)."""
    def launch(prefix: list[str], out: Path) -> dict:
        out.mkdir()
        cmd = prefix + cli_train_args(tokenized_dir, out)
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
        return load_tensors(out / "ckpt.safetensors", "checkpoint")[0]

    one = launch([sys.executable], tmp_path / "one")
    two = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], tmp_path / "two")
    for name in one:
        # Same math, different summation order: differences stay at float rounding level.
        assert torch.allclose(one[name].float(), two[name].float(), atol=2e-4, rtol=1e-3), \
            (name, (one[name].float() - two[name].float()).abs().max().item())
    assert json.loads((tmp_path / "two" / "m_report.json").read_text())["world_size"] == 2
    assert one["blocks.0.attn.proj.weight"].abs().max() > 0  # trained away from its zero init


@pytest.mark.parametrize("average", [{}, {"ema_decay": 0.9}, {"swa_every": 3, "swa_start_frac": 0.25}],
                         ids=("plain", "ema", "swa"))
def test_a_killed_run_resumes_to_the_same_result(tokenized_dir, tmp_path, monkeypatch, average):
    from pgolf.formats.shards import DistributedTokenLoader

    cfg = replace(TRAIN, iterations=12, checkpoint_every=4, **average)
    full, _, _ = train_once(tokenized_dir, tmp_path / "full", cfg)
    assert not (tmp_path / "full" / "ckpt.safetensors.resume").exists()  # removed once finished

    real, calls = DistributedTokenLoader.next_batch, {"n": 0}

    def dies_in_step_11(self, *args):
        calls["n"] += 1
        if calls["n"] > 10 * cfg.grad_accum_steps:
            raise KeyboardInterrupt
        return real(self, *args)

    killed = tmp_path / "killed"
    killed.mkdir()
    monkeypatch.setattr(DistributedTokenLoader, "next_batch", dies_in_step_11)
    with pytest.raises(KeyboardInterrupt):
        run(tokenized_dir, killed / "ckpt.safetensors", MODEL, cfg, killed / "metrics.json", killed / "log.csv")
    monkeypatch.undo()
    assert not (killed / "ckpt.safetensors").exists() and (killed / "ckpt.safetensors.resume").exists()

    run(tokenized_dir, killed / "ckpt.safetensors", MODEL, cfg, killed / "metrics.json", killed / "log.csv", resume=True)
    resumed, meta = load_tensors(killed / "ckpt.safetensors", "checkpoint")
    assert meta["steps"] == 12
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    table = lambda path: [(r["step"], r["train_loss"], r["lr_scale"]) for r in csv.DictReader(open(path))]  # noqa: E731
    assert table(killed / "log.csv") == table(tmp_path / "full" / "log.csv")  # all but the wall-clock column
    # a state saved under other params is refused
    monkeypatch.setattr(DistributedTokenLoader, "next_batch", dies_in_step_11)
    calls["n"] = 0
    with pytest.raises(KeyboardInterrupt):
        run(tokenized_dir, killed / "ckpt.safetensors", MODEL, cfg, killed / "metrics.json", killed / "log.csv")
    monkeypatch.undo()
    with pytest.raises(PgolfError, match=r"another params \(matrix_lr: 0.04 saved, 0.02 now\)"):
        run(tokenized_dir, killed / "ckpt.safetensors", MODEL, replace(cfg, matrix_lr=0.02), killed / "metrics.json",
            killed / "log.csv", resume=True)


def test_a_suspended_run_resumes_to_the_same_result(tokenized_dir, tmp_path):
    """--suspend-after saves the state and stops; the same call with --resume goes on, as often as needed."""
    cfg = replace(TRAIN, ema_decay=0.9, loop_enable_frac=0.25)  # depth recurrence switches on at step 3
    looped = replace(MODEL, num_loops=1, loop_start=0, loop_end=1)
    full, _, _ = train_once(tokenized_dir, tmp_path / "full", cfg, looped)
    out = tmp_path / "parts"
    out.mkdir()
    args = (tokenized_dir, out / "ckpt.safetensors", looped, cfg, out / "metrics.json", out / "log.csv")
    run(*args, suspend_after=0)  # a zero budget: one step, then suspend
    for resume in range(2):
        assert not (out / "ckpt.safetensors").exists() and (out / "ckpt.safetensors.resume").exists()
        run(*args, resume=True, suspend_after=0)
    assert load_tensors(out / "ckpt.safetensors.resume", "train-state")[1]["step"] == 3
    run(*args, resume=True)
    parts, meta = load_tensors(out / "ckpt.safetensors", "checkpoint")
    assert meta["steps"] == 12 and not (out / "ckpt.safetensors.resume").exists()
    for name in full:
        assert torch.equal(full[name], parts[name]), name
    looping_at = [json.loads((d / "metrics_report.json").read_text())["looping_enabled_at_step"] for d in (tmp_path / "full", out)]
    assert looping_at == [3, 3]  # switched inside a suspended part, still reported after the resume


@pytest.mark.slow
def test_a_suspended_torchrun_run_resumes_with_every_ranks_momentum(tokenized_dir, tmp_path):
    """Under torchrun each rank holds only its own Muon matrices' momentum: the saved state must hold all."""
    def launch(out: Path, *extra: str) -> None:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *cli_train_args(tokenized_dir, out), *extra]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)

    (tmp_path / "whole").mkdir()
    launch(tmp_path / "whole")
    parts = tmp_path / "parts"
    parts.mkdir()
    launch(parts, "--suspend-after", "0")
    meta = load_tensors(parts / "ckpt.safetensors.resume", "train-state")[1]
    assert meta["step"] == 1 and meta["world_size"] == 2
    launch(parts, "--resume")  # with rank 0's momentum alone saved, rank 1's matrices would diverge here
    whole = load_tensors(tmp_path / "whole" / "ckpt.safetensors", "checkpoint")[0]
    resumed = load_tensors(parts / "ckpt.safetensors", "checkpoint")[0]
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name


def test_ema_weights_are_saved_and_evaluated(tokenized_dir, tmp_path):
    from pgolf.nn.model import GPT

    one_step = replace(TRAIN, iterations=1)
    live, meta, _ = train_once(tokenized_dir, tmp_path / "live", one_step)
    ema, _, out = train_once(tokenized_dir, tmp_path / "ema", replace(one_step, ema_decay=0.75,
                                                                       ema_bias_correction=False))
    torch.manual_seed(TRAIN.seed)  # the run's initial weights, rebuilt
    init = GPT(replace(MODEL, vocab_size=meta["model_config"]["vocab_size"])).state_dict()
    for name in live:  # the reference's EMA: after one step the shadow is 0.75·init + 0.25·live
        assert torch.allclose(ema[name], 0.75 * init[name] + 0.25 * live[name], atol=1e-6), name
    metrics = json.loads((out / "metrics_report.json").read_text())
    live_metrics = json.loads((tmp_path / "live" / "metrics.json").read_text())
    assert metrics["val_bpb_live_weights"] == pytest.approx(live_metrics["val_bpb"], abs=1e-9)
    assert metrics["val_bpb"] != metrics["val_bpb_live_weights"]
    # Bias-corrected (the default): no weight on the initialization, so one step's average is that step.
    corrected, _, _ = train_once(tokenized_dir, tmp_path / "corrected", replace(one_step, ema_decay=0.75))
    for name in live:
        assert torch.allclose(corrected[name], live[name].float(), atol=1e-6), name


def test_bias_corrected_ema_is_the_normalised_weighted_mean_of_the_steps():
    from pgolf.nn.average import WeightAverage

    net = torch.nn.Linear(3, 2)
    init = {k: v.clone() for k, v in net.state_dict().items()}
    plain, corrected = WeightAverage(net, "ema", 0.9), WeightAverage(net, "ema", 0.9, bias_correction=True)
    steps = []
    for _ in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        steps.append({k: v.clone() for k, v in net.state_dict().items()})
        plain.update(net)
        corrected.update(net)
    n = len(steps)
    for k in init:
        weighted = sum(0.1 * 0.9 ** (n - 1 - t) * steps[t][k] for t in range(n))
        assert torch.allclose(plain.averaged()[k], 0.9 ** n * init[k] + weighted, atol=1e-6)
        assert torch.allclose(corrected.averaged()[k], weighted / (1 - 0.9 ** n), atol=1e-6)


def test_lr_warmup_warmdown_fraction_and_floor():
    cfg = replace(TRAIN, iterations=100, lr_warmup_steps=10, warmdown_frac=0.5, min_lr=0.1)
    assert lr_scale(cfg, 0, 0) == pytest.approx(0.1) and lr_scale(cfg, 4, 0) == pytest.approx(0.5)
    assert lr_scale(cfg, 30, 0) == 1.0 and lr_scale(cfg, 50, 0) == pytest.approx(1.0)
    assert lr_scale(cfg, 75, 0) == pytest.approx(0.5) and lr_scale(cfg, 99, 0) == pytest.approx(0.1)  # floored
    capped = replace(cfg, max_wallclock_seconds=10.0, lr_warmup_steps=0)
    assert lr_scale(capped, 500, 7500.0) == pytest.approx(0.5)  # by wall-clock: 75 % of the budget spent


def test_weight_decay_groups_and_bad_train_params():
    from pgolf.nn.model import GPT

    model = GPT(replace(MODEL, vocab_size=64))
    plain, _ = build_optimizers(model, TRAIN, torch.float32)
    decayed, muon = build_optimizers(model, replace(TRAIN, embed_wd=0.1, scalar_wd=0.02, muon_wd=0.05), torch.float32)
    assert [type(o).__name__ for o in plain] == ["Adam", "Muon", "Adam"]
    assert [type(o).__name__ for o in decayed] == ["AdamW", "Muon", "AdamW"] and muon.param_groups[0]["weight_decay"] == 0.05
    for bad in ({"muon_ns": "cubic"}, {"warmdown_frac": 1.5}, {"ema_decay": 1.0}, {"muon_wd": -1.0},
                {"swa_every": 2, "ema_decay": 0.9}, {"qat_bits": 9}, {"loop_enable_frac": 2.0}, {"swa_every": -1}):
        with pytest.raises(PgolfError, match=next(iter(bad))):
            build(TrainConfig, [(bad, "params")], "train")


def test_every_model_option_puts_each_parameter_in_one_optimizer_group():
    from test_model import OPTIONS, TINY

    from pgolf.nn.model import GPT

    for option in OPTIONS:
        model = GPT(ModelConfig(**{**TINY.__dict__, **option}))
        optimizers, _ = build_optimizers(model, TRAIN, torch.float32)  # raises if a parameter is left out
        assert sum(len(g["params"]) for o in optimizers for g in o.param_groups) == len(list(model.parameters()))


def test_swa_saves_the_fp32_mean_of_its_snapshots(tokenized_dir, tmp_path, monkeypatch):
    from pgolf.nn.average import WeightAverage

    snapshots = []
    real_update = WeightAverage.update

    def recording_update(self, model):
        snapshots.append({k: v.detach().float().clone() for k, v in model.state_dict().items()})
        real_update(self, model)

    monkeypatch.setattr(WeightAverage, "update", recording_update)
    cfg = replace(TRAIN, iterations=7, swa_every=2, swa_start_frac=0.5)  # snapshots after steps 4 and 6
    swa, _, out = train_once(tokenized_dir, tmp_path / "swa", cfg)
    live, _, _ = train_once(tokenized_dir, tmp_path / "live", replace(cfg, swa_every=0))
    assert len(snapshots) == 2
    for name in swa:
        assert torch.allclose(swa[name], 0.5 * (snapshots[0][name] + snapshots[1][name]), atol=1e-6), name
    metrics = json.loads((out / "metrics_report.json").read_text())
    assert metrics["weight_average"] == {"kind": "swa", "snapshots": 2}
    assert metrics["val_bpb_live_weights"] == pytest.approx(
        json.loads((tmp_path / "live" / "metrics.json").read_text())["val_bpb"], abs=1e-9)
    assert not torch.equal(swa["blocks.0.mlp.fc.weight"], live["blocks.0.mlp.fc.weight"])


def test_depth_recurrence_switches_on_at_its_fraction_and_qat_runs(tokenized_dir, tmp_path):
    looped = replace(MODEL, num_layers=3, loop_start=1, loop_end=1, num_loops=1)
    cfg = replace(TRAIN, iterations=8, loop_enable_frac=0.5, qat_bits=6, qat_start_frac=0.75)
    state, meta, out = train_once(tokenized_dir, tmp_path / "loop", cfg, looped)
    metrics = json.loads((out / "metrics_report.json").read_text())
    assert metrics["looping_enabled_at_step"] == 4  # step/iterations >= 0.5 from step 4 on
    assert meta["model_config"]["num_loops"] == 1 and not any("qat" in k for k in state)
    # QAT changes training: the same run without it ends elsewhere
    no_qat, _, _ = train_once(tokenized_dir, tmp_path / "noqat", replace(cfg, qat_bits=0), looped)
    assert not torch.equal(state["blocks.0.mlp.fc.weight"], no_qat["blocks.0.mlp.fc.weight"])


def test_dotted_set_of_the_stages_own_section_takes_effect(tokenized_dir, tmp_path):
    """`pgolf train --set train.iterations=3` trains 3 steps (the preset's 200 once won silently)."""
    from typer.testing import CliRunner

    from pgolf.cli import app

    args = ["train", "--data", str(tokenized_dir), "--out", str(tmp_path / "ckpt.safetensors"), "--metrics",
            str(tmp_path / "m.json"), "--loss-log", str(tmp_path / "log.csv"), "--params", str(tmp_path / "none.yaml")]
    small = ["preset=tiny", "train.iterations=3", "train.train_seq_len=64", "train.train_batch_tokens=1024",
             "model.num_layers=1", "model.model_dim=32", "train.val_tokens=512", "train.device=cpu"]
    result = CliRunner().invoke(app, args + [a for s in small for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "m_report.json").read_text())["steps"] == 3
    assert load_tensors(tmp_path / "ckpt.safetensors", "checkpoint")[1]["params"]["iterations"] == 3
