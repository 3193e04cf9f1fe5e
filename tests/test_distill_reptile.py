"""The seed studies' training-loop switches: knowledge distillation (PR #1227, pgolf.nn.distill) and Reptile
(PR #375, pgolf.nn.reptile) — each off by default, each checked against its definition, and one run of the
train stage with both on."""

from __future__ import annotations

import copy
import csv
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import filled_gpt

from pgolf import train
from pgolf.config.build import build
from pgolf.config.sections import ModelConfig, TrainConfig
from pgolf.errors import PgolfError
from pgolf.formats.files import load_tensors, read_json, save_tensors, sha256_file
from pgolf.formats.shards import DistributedTokenLoader
from pgolf.nn.distill import distillation_term, distilled_loss, load_teacher
from pgolf.nn.distributed import Dist
from pgolf.nn.reptile import reptile_step
from pgolf.nn.schedule import Schedule
from pgolf.nn.trainer import Trainer
from pgolf.nn.trainstate import Checkpointer

MODEL = ModelConfig(num_layers=2, model_dim=64, num_heads=4, num_kv_heads=2)
TEACHER_MODEL = ModelConfig(num_layers=1, model_dim=32, num_heads=2, num_kv_heads=1)  # another shape: allowed
TRAIN = TrainConfig(iterations=8, max_wallclock_seconds=0, warmdown_iters=3, warmup_steps=0,
                    train_batch_tokens=2048, train_seq_len=64, grad_accum_steps=2,
                    muon_momentum_warmup_steps=5, log_every=1, val_tokens=1024, device="cpu")


def train_once(data: Path, out: Path, cfg: TrainConfig = TRAIN, model: ModelConfig = MODEL) -> tuple[dict, dict]:
    out.mkdir(parents=True, exist_ok=True)
    train.run(data, out / "ckpt.safetensors", model, cfg, out / "metrics.json", out / "log.csv")
    return load_tensors(out / "ckpt.safetensors", "checkpoint")


@pytest.fixture(scope="module")
def teacher(tokenized_dir, tmp_path_factory) -> Path:
    """A smaller GPT trained a few steps on the session data: a teacher unlike the student's initial weights."""
    out = tmp_path_factory.mktemp("teacher")
    train_once(tokenized_dir, out, replace(TRAIN, iterations=6, seed=7), TEACHER_MODEL)
    return out / "ckpt.safetensors"


def student_config(data: Path) -> ModelConfig:
    return train.resolve_vocab(MODEL, read_json(data / "manifest.json", "manifest"), data / "manifest.json")


def make_trainer(data: Path, out: Path, cfg: TrainConfig) -> Trainer:
    manifest = read_json(data / "manifest.json", "manifest")
    model_cfg = student_config(data)
    checkpointer = Checkpointer(out / "ckpt.safetensors", model_cfg, cfg, 1, manifest.get("tokenizer_sha256"))
    return Trainer(Dist("cpu"), data, model_cfg, cfg, checkpointer)


def initial_weights(data: Path, out: Path, seed: int) -> Path:
    """A checkpoint of the student's initial weights for `seed` (a run of 0 steps)."""
    train_once(data, out, replace(TRAIN, iterations=0, seed=seed))
    return out / "ckpt.safetensors"


# ---- knowledge distillation


def test_the_loss_is_the_direct_formula_with_the_t_squared_scaling():
    g = torch.Generator().manual_seed(0)
    student = 3 * torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    teacher_logits = 3 * torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 11, (2, 5), generator=g)
    T, alpha = 2.5, 0.3
    ce = F.cross_entropy(student.reshape(-1, 11), targets.reshape(-1))
    p_t = torch.softmax(teacher_logits / T, -1)
    kl = (p_t * (torch.log(p_t) - torch.log_softmax(student / T, -1))).sum(-1).mean()  # per position, averaged
    got = distilled_loss(ce, student, teacher_logits, T, alpha)
    assert float(got) == pytest.approx(float((1 - alpha) * ce + alpha * T * T * kl), rel=1e-6)
    assert float(distillation_term(student, teacher_logits, T)) == pytest.approx(float(T * T * kl), rel=1e-6)
    # T² on the gradient: d(T²·KL)/dz_student = T·(softmax(z_s/T) − softmax(z_t/T)) / positions, the same scale
    # as the hard term's softmax − onehot whatever T
    z = student.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(distillation_term(z, teacher_logits, T), z)
    want = T * (torch.softmax(student / T, -1) - p_t) / 10
    assert torch.allclose(grad.double(), want, atol=1e-6), (grad.double() - want).abs().max()
    assert float(distillation_term(student, student, T)) == pytest.approx(0.0, abs=1e-6)


def test_alpha_zero_trains_exactly_as_without_a_teacher(tokenized_dir, tmp_path, teacher):
    plain, _ = train_once(tokenized_dir, tmp_path / "plain")
    with_teacher = replace(TRAIN, distill_teacher=str(teacher), distill_alpha=0.0)
    zero, meta = train_once(tokenized_dir, tmp_path / "zero", with_teacher)
    for name in plain:
        assert torch.equal(plain[name], zero[name]), name
    # the artifact says what it was distilled from, by content
    assert meta["inputs"]["distill_teacher"] == sha256_file(teacher)
    assert meta["params"]["distill_teacher"] == str(teacher)
    report = json.loads((tmp_path / "zero" / "metrics_report.json").read_text())
    assert report["distill_teacher"]["sha256"] == sha256_file(teacher)
    assert report["distill_teacher"]["model_dim"] == TEACHER_MODEL.model_dim
    assert report["reptile"] is None
    assert "distill_teacher" not in load_tensors(tmp_path / "plain" / "ckpt.safetensors", "checkpoint")[1]["inputs"]
    # and the teacher is really in the loop once α > 0
    half, _ = train_once(tokenized_dir, tmp_path / "half", replace(with_teacher, distill_alpha=0.5))
    assert not torch.equal(half["blocks.0.mlp.fc.weight"], plain["blocks.0.mlp.fc.weight"])


def test_a_teacher_equal_to_the_student_gives_no_distillation_gradient(tokenized_dir, tmp_path, teacher):
    same = initial_weights(tokenized_dir, tmp_path / "init7", seed=TRAIN.seed)
    other = initial_weights(tokenized_dir, tmp_path / "init8", seed=TRAIN.seed + 1)

    def step0_gradients(teacher_path: Path) -> tuple[float, dict[str, torch.Tensor]]:
        cfg = replace(TRAIN, distill_teacher=str(teacher_path), distill_alpha=1.0)
        t = make_trainer(tokenized_dir, tmp_path / "run", cfg)
        loader = DistributedTokenLoader(tokenized_dir, 0, 1, "cpu")
        loss = t.micro_loss(*t.next_micro_batch(loader))
        loss.backward()
        return float(loss.detach()), {n: p.grad.clone() for n, p in t.model.named_parameters() if p.grad is not None}

    loss_same, grads_same = step0_gradients(same)
    loss_other, grads_other = step0_gradients(other)
    loss_trained, grads_trained = step0_gradients(teacher)
    assert loss_same == pytest.approx(0.0, abs=1e-6)  # KL of identical distributions
    largest = max(g.abs().max() for g in grads_same.values())
    assert largest < 1e-6, largest
    for loss, grads in ((loss_other, grads_other), (loss_trained, grads_trained)):
        assert loss > 1e-3
        assert max(g.abs().max() for g in grads.values()) > 1e3 * max(largest, 1e-9)
    assert set(grads_other) == set(grads_same) and len(grads_same) > 0


def test_a_teacher_of_another_vocabulary_or_tokenizer_or_no_checkpoint_is_refused(tokenized_dir, tmp_path, teacher):
    student = student_config(tokenized_dir)
    small = replace(TEACHER_MODEL, vocab_size=64)
    wrong_vocab = tmp_path / "vocab64.safetensors"
    save_tensors(wrong_vocab, GPT_state(small), "checkpoint", {"model_config": small.__dict__,
                                                               "tokenizer_sha256": None})
    with pytest.raises(PgolfError, match=rf"distill_teacher.*vocab64\.safetensors has a 64-token vocabulary and the "
                                         rf"student {student.vocab_size}.*set train\.distill_teacher"):
        load_teacher(str(wrong_vocab), student, None, "cpu")
    # the train stage refuses it before training: no checkpoint
    out = tmp_path / "refused"
    with pytest.raises(PgolfError, match="64-token vocabulary"):
        train_once(tokenized_dir, out, replace(TRAIN, distill_teacher=str(wrong_vocab)))
    assert not (out / "ckpt.safetensors").exists()
    # the same vocabulary size from another tokenizer
    state, meta = load_tensors(teacher, "checkpoint")
    other_tokenizer = tmp_path / "other_tokenizer.safetensors"
    save_tensors(other_tokenizer, state, "checkpoint", {**meta, "tokenizer_sha256": "f" * 64})
    with pytest.raises(PgolfError, match="another tokenizer"):
        load_teacher(str(other_tokenizer), student, meta["tokenizer_sha256"], "cpu")
    # a missing file, a file of another kind, a file that is not safetensors
    with pytest.raises(PgolfError, match=r"train\.distill_teacher: .*missing\.safetensors: file not found"):
        load_teacher(str(tmp_path / "missing.safetensors"), student, None, "cpu")
    hessians = tmp_path / "hessians.safetensors"
    save_tensors(hessians, {"x": torch.zeros(2)}, "hessians", {})
    with pytest.raises(PgolfError, match=r"train\.distill_teacher: .*expected a 'checkpoint'"):
        load_teacher(str(hessians), student, None, "cpu")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(PgolfError, match=r"train\.distill_teacher: .*junk\.safetensors"):
        load_teacher(str(junk), student, None, "cpu")
    # the params themselves
    for bad, key in (({"distill_teacher": "teacher.pt"}, "distill_teacher"), ({"distill_alpha": 1.5}, "distill_alpha"),
                     ({"distill_temperature": 0.0}, "distill_temperature"), ({"reptile_frac": 1.2}, "reptile_frac"),
                     ({"reptile_inner_steps": 0}, "reptile_inner_steps"), ({"reptile_outer_lr": 2.0}, "reptile_outer_lr")):
        with pytest.raises(PgolfError, match=key):
            build(TrainConfig, [(bad, "params")], "train")
    defaults = TrainConfig()
    assert defaults.distill_teacher == "" and defaults.reptile_frac == 0.0  # both off by default


def GPT_state(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in filled_gpt(cfg).state_dict().items()}


# ---- Reptile


def test_the_outer_step_interpolates_toward_the_sgd_result():
    """On ½‖θ − c_k‖² the inner SGD steps have a closed form: θ_k+1 = θ_k − lr·(θ_k − c_k)."""
    g = torch.Generator().manual_seed(1)
    theta0 = torch.randn(6, generator=g)
    targets = [torch.randn(6, generator=g) for _ in range(3)]
    theta = theta0.clone().requires_grad_(True)
    losses = []

    def inner_loss(k: int) -> torch.Tensor:
        loss = 0.5 * (theta - targets[k]).square().sum()
        losses.append(float(loss.detach()))
        return loss

    inner_lr, outer_lr = 0.1, 0.25
    mean = reptile_step([theta], inner_loss, inner_lr, outer_lr, 3)
    adapted = theta0.clone()
    for c in targets:
        adapted = adapted - inner_lr * (adapted - c)
    assert torch.allclose(theta.detach(), theta0 + outer_lr * (adapted - theta0), atol=1e-6)
    assert theta.grad is None and float(mean) == pytest.approx(sum(losses) / 3)


def test_a_reptile_step_of_the_trainer_moves_by_outer_lr_times_the_sgd_displacement(tokenized_dir, tmp_path):
    cfg = replace(TRAIN, reptile_frac=0.5, reptile_inner_lr=0.05, reptile_outer_lr=0.3, reptile_inner_steps=3)
    t = make_trainer(tokenized_dir, tmp_path, cfg)
    loader = DistributedTokenLoader(tokenized_dir, 0, 1, "cpu")
    t.train_step(loader)  # the optimizers have state (Adam moments, Muon momentum) that Reptile must leave alone
    opt_before = [copy.deepcopy(o.state_dict()) for o in t.optimizers]
    theta0 = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    # the inner loop recomputed by hand: plain SGD on a copy, on the same consecutive micro-batches
    replica = copy.deepcopy(t.model)
    twin = DistributedTokenLoader(tokenized_dir, 0, 1, "cpu", loader.stream.state())
    for _ in range(cfg.reptile_inner_steps):
        x, y = twin.next_batch(cfg.train_batch_tokens, cfg.train_seq_len, t.accum)
        params = list(replica.parameters())
        grads = torch.autograd.grad(replica(x, y), params)
        with torch.no_grad():
            for p, grad in zip(params, grads):
                p.sub_(cfg.reptile_inner_lr * grad)
    adapted = dict(replica.named_parameters())
    t.reptile_step(loader)
    moved = 0.0
    for name, p in t.model.named_parameters():
        step = p.detach() - theta0[name]
        want = cfg.reptile_outer_lr * (adapted[name].detach() - theta0[name])
        assert torch.allclose(step, want, atol=1e-6, rtol=1e-4), (name, (step - want).abs().max())
        moved = max(moved, float(want.abs().max()))
        assert p.grad is None
    assert moved > 1e-4  # the inner steps really went somewhere
    assert loader.stream.state() == twin.stream.state()  # one micro-batch per inner step
    for before, opt in zip(opt_before, t.optimizers):  # paused, untouched
        after = opt.state_dict()
        assert before["state"].keys() == after["state"].keys() and len(after["state"]) > 0
        for pid, state in before["state"].items():
            for key, value in state.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(after["state"][pid][key])), (pid, key)


def test_reptile_runs_only_in_the_last_fraction_of_the_run(tokenized_dir, tmp_path, monkeypatch):
    """Before the phase the run is plain training, step for step; by steps, and by wall-clock under a cap."""
    record: list[tuple[str, int, dict]] = []
    real_train, real_reptile = Trainer.train_step, Trainer.reptile_step

    def recorded(kind, real):
        def step(self, loader):
            loss = real(self, loader)
            record.append((kind, self.progress.step, {n: p.detach().clone() for n, p in self.model.named_parameters()}))
            return loss
        return step

    monkeypatch.setattr(Trainer, "train_step", recorded("plain", real_train))
    monkeypatch.setattr(Trainer, "reptile_step", recorded("reptile", real_reptile))
    frac = 0.25
    train_once(tokenized_dir, tmp_path / "plain")
    plain, record[:] = list(record), []
    final, _ = train_once(tokenized_dir, tmp_path / "reptile", replace(TRAIN, reptile_frac=frac))
    kinds = [(kind, step) for kind, step, _ in record]
    schedule = Schedule(replace(TRAIN, reptile_frac=frac))
    assert kinds == [("reptile" if schedule.reptile(s / TRAIN.iterations) else "plain", s) for s in range(8)]
    assert [k for k, _ in kinds] == ["plain"] * 6 + ["reptile"] * 2
    for (_, step, ours), (_, _, theirs) in zip(record[:6], plain[:6]):
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), (step, name)
    assert not torch.equal(record[6][2]["blocks.0.mlp.fc.weight"], plain[6][2]["blocks.0.mlp.fc.weight"])
    report = json.loads((tmp_path / "reptile" / "metrics_report.json").read_text())
    assert report["reptile"]["from_step"] == 6 and report["reptile"]["steps"] == 2
    # a Reptile step reads one micro-batch per inner step, not a batch: the token count and the log say so
    reptile_step_tokens = TRAIN.reptile_inner_steps * TRAIN.train_batch_tokens // TRAIN.grad_accum_steps
    assert reptile_step_tokens != TRAIN.train_batch_tokens
    want = [s * TRAIN.train_batch_tokens if s <= 6 else 6 * TRAIN.train_batch_tokens + (s - 6) * reptile_step_tokens
            for s in range(1, 9)]
    rows = list(csv.DictReader(open(tmp_path / "reptile" / "log.csv")))
    assert [int(r["tokens"]) for r in rows] == want
    assert read_json(tmp_path / "reptile" / "metrics.json")["tokens"] == want[-1]
    # under a cap, progress is wall-clock: the phase starts at (1 − frac) of the budget whatever the step
    capped = Schedule(replace(TRAIN, reptile_frac=0.2, max_wallclock_seconds=10.0))
    assert not capped.reptile(capped.progress(10_000, 7_900.0))
    assert capped.reptile(capped.progress(3, 8_000.0)) and capped.reptile(capped.progress(3, 9_999.0))
    assert not Schedule(TRAIN).reptile(1.0)  # off by default


def test_a_suspended_reptile_run_resumes_to_the_same_result(tokenized_dir, tmp_path):
    cfg = replace(TRAIN, iterations=6, reptile_frac=0.5)
    full, _ = train_once(tokenized_dir, tmp_path / "full", cfg)
    out = tmp_path / "parts"
    out.mkdir()
    args = (tokenized_dir, out / "ckpt.safetensors", MODEL, cfg, out / "metrics.json", out / "log.csv")
    train.run(*args, suspend_after=0)
    for _ in range(4):  # suspended inside the phase too (it starts at step 3)
        train.run(*args, resume=True, suspend_after=0)
    assert load_tensors(out / "ckpt.safetensors.resume", "train-state")[1]["reptile_from_step"] == 3
    train.run(*args, resume=True)
    parts, _ = load_tensors(out / "ckpt.safetensors", "checkpoint")
    for name in full:
        assert torch.equal(full[name], parts[name]), name
    reports = [json.loads((d / "metrics_report.json").read_text())["reptile"] for d in (tmp_path / "full", out)]
    assert reports[0] == reports[1] and reports[0]["from_step"] == 3
    tokens = [read_json(d / "metrics.json")["tokens"] for d in (tmp_path / "full", out)]  # counted across the parts
    reptile_step_tokens = cfg.reptile_inner_steps * cfg.train_batch_tokens // cfg.grad_accum_steps
    assert tokens[0] == tokens[1] == 3 * cfg.train_batch_tokens + 3 * reptile_step_tokens


# ---- both, through the command line


def test_the_train_stage_runs_with_distillation_and_reptile(tokenized_dir, tmp_path, teacher):
    from typer.testing import CliRunner

    from pgolf.cli import app

    args = ["train", "--data", str(tokenized_dir), "--out", str(tmp_path / "ckpt.safetensors"), "--metrics",
            str(tmp_path / "m.json"), "--loss-log", str(tmp_path / "log.csv"), "--params", str(tmp_path / "none.yaml")]
    small = ["preset=tiny", "train.iterations=6", "train.train_seq_len=64", "train.train_batch_tokens=2048",
             "train.grad_accum_steps=2", "model.num_layers=2", "model.model_dim=64", "train.val_tokens=1024",
             "train.device=cpu", f"train.distill_teacher={teacher}", "train.distill_temperature=2",
             "train.distill_alpha=0.5", "train.reptile_frac=0.5"]
    result = CliRunner().invoke(app, args + [a for s in small for a in ("--set", s)])
    assert result.exit_code == 0, result.output
    state, meta = load_tensors(tmp_path / "ckpt.safetensors", "checkpoint")
    assert meta["steps"] == 6 and meta["inputs"]["distill_teacher"] == sha256_file(teacher)
    assert all(torch.isfinite(t).all() for t in state.values())
    report = json.loads((tmp_path / "m_report.json").read_text())
    assert report["reptile"]["from_step"] == 3 and report["reptile"]["steps"] == 3
    assert report["distill_teacher"]["alpha"] == 0.5 and report["distill_teacher"]["temperature"] == 2.0
    assert report["train_loss"] is not None and report["val_bpb"] is not None


SYNC_SCRIPT = '''
import json, sys
from dataclasses import replace
from pathlib import Path
import torch, torch.distributed as dist
from pgolf import train
from pgolf.config.sections import ModelConfig, TrainConfig
from pgolf.formats.files import read_json
from pgolf.formats.shards import DistributedTokenLoader
from pgolf.nn.distributed import Dist
from pgolf.nn.trainer import Trainer
from pgolf.nn.trainstate import Checkpointer

data, teacher, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
cfg = TrainConfig(**json.loads(sys.argv[4]), distill_teacher=teacher)
manifest = read_json(data / "manifest.json", "manifest")
model_cfg = train.resolve_vocab(ModelConfig(**json.loads(sys.argv[5])), manifest, data / "manifest.json")
d = Dist("cpu")
t = Trainer(d, data, model_cfg, cfg, Checkpointer(out / "x.safetensors", model_cfg, cfg, d.world,
                                                   manifest["tokenizer_sha256"]))
loader = DistributedTokenLoader(data, d.rank, d.world, d.device)
t.train_step(loader)
before = torch.cat([p.detach().flatten() for p in t.model.parameters()])
for _ in range(2):
    t.reptile_step(loader)
after = torch.cat([p.detach().flatten() for p in t.model.parameters()])
every = [torch.zeros_like(after) for _ in range(d.world)]
dist.all_gather(every, after)
if d.main:
    (out / "sync.json").write_text(json.dumps({"equal": all(torch.equal(every[0], v) for v in every),
                                               "moved": float((after - before).abs().max()), "world": d.world}))
d.close()
'''


@pytest.mark.slow
def test_under_torchrun_reptile_and_distillation_keep_every_rank_s_weights_equal(tokenized_dir, tmp_path, teacher):
    """Each rank takes its own micro-batches; DDP averages the inner SGD gradients, so θ' and θ agree everywhere."""
    import subprocess
    import sys
    from dataclasses import asdict

    script = tmp_path / "sync.py"
    script.write_text(SYNC_SCRIPT)
    cfg = {k: v for k, v in asdict(replace(TRAIN, reptile_frac=0.5)).items() if k != "distill_teacher"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           str(tokenized_dir), str(teacher), str(tmp_path), json.dumps(cfg), json.dumps(asdict(MODEL))]
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
    result = json.loads((tmp_path / "sync.json").read_text())
    assert result["world"] == 2 and result["equal"] and result["moved"] > 1e-5, result
