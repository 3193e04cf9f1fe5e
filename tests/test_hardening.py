"""Nothing silently wrong, nothing lost: bad params, data of another tokenizer, killed writes, hand runs
inside a DVC project, and a demo preset that really quantizes."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from pgolf.cli import app
from pgolf.config.sections import CalibrateConfig, PackConfig, QuantizeConfig
from pgolf.errors import PgolfError
from pgolf.formats.files import save_tensors, write_json


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


@pytest.mark.parametrize("stage, args, message", [
    ("train", ["--set", "grad_accum_steps=0"], "train.grad_accum_steps=0 must be >= 1"),
    ("train", ["--set", "log_every=0"], "train.log_every=0 must be >= 1"),
    ("train", ["--set", "warmup_steps=-3"], "train.warmup_steps=-3 must be >= 0"),
    ("train", ["--max-wallclock-seconds", "-1"], "train.max_wallclock_seconds=-1.0 must be >= 0"),
    ("ttt-eval", ["--val-tokens", "-5"], "ttt_eval.val_tokens=-5 must be >= 0"),
    ("ttt-eval", ["--set", "batch_seqs=0"], "ttt_eval.batch_seqs=0 must be >= 1"),
    ("tokenize", ["corpus.jsonl", "--set", "workers=-1"], "tokenize.workers=-1 must be >= 0"),
])
def test_out_of_range_params_are_refused_and_blamed_on_the_command_line(tmp_path, stage, args, message):
    """Each of these once ran silently or died in a ZeroDivisionError."""
    result = invoke(stage, *args, "--params", str(tmp_path / "none.yaml"))
    assert result.exit_code == 2, result.output
    assert f"pgolf: error: command line: {message}" in result.output


def test_calibrate_refuses_data_of_another_tokenizer(calibrated_model, foreign_tokenized, tmp_path):
    from pgolf import calibrate

    cfg = CalibrateConfig(n_batches=2, batch_seqs=2, seq_len=32, device="cpu")
    ckpt, out = calibrated_model["ckpt"], tmp_path / "h.safetensors"
    with pytest.raises(PgolfError, match=r"tokenizer mismatch \(same vocabulary size, other pieces\)"):
        calibrate.run(ckpt, foreign_tokenized["same_vocab"], out, cfg, tmp_path / "m.json")
    with pytest.raises(PgolfError, match="has a 512-token vocabulary, but .* has 384 tokens"):  # not an IndexError
        calibrate.run(ckpt, foreign_tokenized["other_vocab"], out, cfg, tmp_path / "m.json")
    assert not out.exists()
    calibrate.run(ckpt, foreign_tokenized["same_vocab"], out, replace(cfg, source="self", seq_len=8), tmp_path / "m.json")
    assert out.exists()  # self-generated text reads no data, so any data directory will do


def test_resume_refuses_data_of_another_tokenizer(tokenized_dir, foreign_tokenized, tmp_path):
    from test_train import MODEL, TRAIN

    from pgolf import train

    cfg = replace(TRAIN, iterations=4)
    args = (tmp_path / "ckpt.safetensors", MODEL, cfg, tmp_path / "m.json", tmp_path / "log.csv")
    train.run(tokenized_dir, *args, suspend_after=0)
    with pytest.raises(PgolfError, match="saved by a run with another tokenizer sha256"):
        train.run(foreign_tokenized["same_vocab"], *args, resume=True)
    train.run(tokenized_dir, *args, resume=True)  # the run's own data still resumes
    assert (tmp_path / "ckpt.safetensors").is_file()


def test_budget_refuses_data_of_another_tokenizer(calibrated_model, foreign_tokenized, tmp_path):
    from pgolf import quantize

    cfg = QuantizeConfig(keep_float_max_numel=256, device="cpu", budget=10**6)
    out = tmp_path / "q.safetensors"
    with pytest.raises(PgolfError, match="tokenizer mismatch"):
        quantize.run(calibrated_model["ckpt"], out, cfg, PackConfig(codec="zlib"), None, tmp_path / "m.json",
                     foreign_tokenized["same_vocab"])
    assert not out.exists()


def test_a_killed_write_leaves_no_lasting_temp_file_and_outputs_get_normal_permissions(tmp_path):
    path = tmp_path / "ckpt.safetensors"
    dead = tmp_path / ".ckpt.safetensors.tmp-999999999-x1y2"  # what a SIGKILL mid-save leaves: no such process
    live = tmp_path / f".ckpt.safetensors.tmp-{os.getpid()}-x1y2"  # a write in progress (this process)
    dead.write_bytes(b"half a file")
    live.write_bytes(b"being written")
    save_tensors(path, {"w": torch.ones(3)}, "checkpoint", {})
    assert not dead.exists() and live.exists()
    umask = os.umask(0)
    os.umask(umask)
    write_json(tmp_path / "m.json", {"a": 1})
    for out in (path, tmp_path / "m.json"):
        assert (out.stat().st_mode & 0o777) == 0o666 & ~umask, out  # safetensors alone would make it 0600


def test_a_hand_run_never_writes_over_the_pipelines_outputs(calibrated_model, tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "artifacts").mkdir(parents=True)
    shutil.copy(calibrated_model["ckpt"], project / "artifacts" / "ckpt.safetensors")
    (project / "dvc.yaml").write_text(
        "stages:\n  quantize:\n    cmd: pgolf quantize ...\n    outs:\n      - artifacts/quantized.safetensors\n"
        "    metrics:\n      - artifacts/quantize_metrics.json\n")
    pipeline_q = project / "artifacts" / "quantized.safetensors"
    pipeline_q.write_bytes(b"the pipeline's own output")
    monkeypatch.chdir(project)
    result = invoke("quantize", "--bits", "6", "artifacts/ckpt.safetensors", "--params", "none.yaml",
                    "--set", "device=cpu")
    assert result.exit_code == 0, result.output
    assert pipeline_q.read_bytes() == b"the pipeline's own output"
    assert not (project / "artifacts" / "quantize_metrics.json").exists()
    assert (project / "quantized.safetensors").is_file() and (project / "quantize_metrics.json").is_file()
    assert "is an output of the DVC pipeline here" in result.output
    named = invoke("quantize", "--bits", "6", "artifacts/ckpt.safetensors", "--params", "none.yaml",
                   "--set", "device=cpu", "--out", "artifacts/quantized.safetensors")
    assert named.exit_code == 0 and pipeline_q.read_bytes() != b"the pipeline's own output"  # named: the user's call


def test_the_demo_preset_quantizes_every_matrix():
    from pgolf.config.resolve import resolve
    from pgolf.nn.model import GPT
    from pgolf.nn.optim import group_of
    from pgolf.quant.encode import is_quantized

    params = resolve("quantize", None, {"preset": "tiny"})
    model = GPT(replace(resolve("train", None, {"preset": "tiny"}).model, vocab_size=1024))
    groups = {n: group_of(n, p) for n, p in model.named_parameters()}
    matrices = {n: p for n, p in model.state_dict().items() if groups[n] in ("matrix", "embed")}
    controls = {n: p for n, p in model.state_dict().items() if groups[n] == "scalar"}
    assert len(matrices) == 25 and all(is_quantized(p, params.quantize) for p in matrices.values())
    assert not any(is_quantized(p, params.quantize) for p in controls.values())
    baseline = resolve("quantize", None, {"preset": "baseline"}).quantize
    assert sum(is_quantized(p, baseline) for p in matrices.values()) == 1  # the embedding alone, as before
