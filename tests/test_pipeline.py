"""The seven commands end to end through the real `pgolf` console script, and DVC on top of them."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import assert_flat_metrics, assert_png, make_docs, write_jsonl

REPO = Path(__file__).resolve().parents[1]
STAGES = ["tokenize", "train", "calibrate", "quantize", "pack", "ttt-eval", "verify"]
# A model and trainer small enough for seconds on a CPU.
TRAIN_SETS = ["preset=tiny", "iterations=25", "train_seq_len=64", "train_batch_tokens=2048",
              "model.num_layers=2", "model.model_dim=64", "val_tokens=1024"]


def pgolf(*args: str, cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["pgolf", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    if ok and result.returncode != 0:
        raise AssertionError(f"pgolf {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def test_every_stage_has_help_with_an_example():
    top = pgolf("--help", cwd=REPO).stdout
    for stage in STAGES:
        assert stage in top
        text = pgolf(stage, "--help", cwd=REPO).stdout
        assert "Example: pgolf " + stage in " ".join(text.split()), stage


@pytest.mark.slow
def test_cli_chain_on_a_generated_corpus(tmp_path):
    write_jsonl(tmp_path / "corpus.jsonl", make_docs())
    run = lambda *a, ok=True: pgolf(*a, "--params", "none.yaml", cwd=tmp_path, ok=ok)  # noqa: E731
    run("tokenize", "corpus.jsonl", "--out", "tok", "--vocab-size", "512", "--val-docs", "20",
        "--metrics", "tokenize.json")
    run("train", "--data", "tok", "--out", "ckpt.safetensors", "--metrics", "train.json",
        "--loss-log", "loss.csv", *sets(TRAIN_SETS))
    run("calibrate", "ckpt.safetensors", "--data", "tok", "--out", "hessians.safetensors",
        "--metrics", "calibrate.json", *sets(["n_batches=2", "seq_len=64", "batch_seqs=4"]))
    # as users type it: the output lands beside the checkpoint under the default name. This model's
    # matrices are all small enough to stay float by the reference rule; quantize them anyway.
    run("quantize", "--bits", "8", "ckpt.safetensors", "--hessians", "hessians.safetensors",
        "--set", "keep_float_max_numel=1024")
    assert (tmp_path / "quantized.safetensors").is_file()
    run("pack", "quantized.safetensors", "--data", "tok", "--out", "model.pgolf", "--metrics", "pack.json")
    run("ttt-eval", "model.pgolf", "--data", "tok", "--seq-len", "64", "--val-tokens", "1024", "--metrics", "eval.json")
    verify = run("verify", "model.pgolf", "--data", "tok", "--claims", "eval.json", "--report", "verify.json")

    # every metrics file is a flat table row; the detail is in the report beside it
    rows = {name: assert_flat_metrics(tmp_path / f"{name}.json")
            for name in ("tokenize", "train", "calibrate", "quantize_metrics", "pack", "eval", "verify")}
    full = lambda name: json.loads((tmp_path / f"{name}_report.json").read_text())  # noqa: E731
    train, evaluated, pack = full("train"), full("eval"), full("pack")
    assert "PASS" in verify.stdout and rows["verify"]["passed"] is True and full("verify")["checks"]
    assert rows["eval"]["val_bpb"] == evaluated["val_bpb"] and rows["eval"]["seq_len"] == 64
    assert rows["pack"]["bytes"] == pack["total_bytes"] == pack["model_bytes"] + pack["code_bytes"] <= 16_000_000
    assert pack["model_bytes"] == (tmp_path / "model.pgolf").stat().st_size
    assert_png(tmp_path / "loss.png")
    assert_png(tmp_path / "quantize_bits.png")
    # int8 costs little: the blob scores close to the float checkpoint on the same windows
    assert evaluated["tokens_scored"] == train["val_tokens_scored"]
    assert evaluated["val_bpb"] != train["val_bpb"]  # it really is the quantized model
    assert abs(evaluated["val_bpb"] - train["val_bpb"]) < 0.01 * train["val_bpb"]

    # a false claim fails verify with a non-zero exit
    bad = run("verify", "model.pgolf", "--data", "tok", "--claim", str(evaluated["val_bpb"] + 0.5),
              "--report", "bad.json", ok=False)
    assert bad.returncode != 0 and json.loads((tmp_path / "bad.json").read_text())["passed"] is False
    # GPTQ to a byte budget below the int8 artifact's size: the packed result fits it
    budget = pack["total_bytes"] - 5_000
    run("quantize", "ckpt.safetensors", "--method", "gptq", "--hessians", "hessians.safetensors", "--data", "tok",
        "--budget", str(budget), "--out", "qb.safetensors", "--set", "keep_float_max_numel=1024",
        "--set", "budget_bits=2,3,4,5,6,7,8")
    run("pack", "qb.safetensors", "--data", "tok", "--out", "qb.pgolf", "--metrics", "packb.json")
    assert json.loads((tmp_path / "packb.json").read_text())["bytes"] <= budget
    # a lower bit width packs smaller
    run("quantize", "--bits", "4", "ckpt.safetensors", "--out", "q4.safetensors", "--set", "keep_float_max_numel=1024")
    run("pack", "q4.safetensors", "--data", "tok", "--out", "q4.pgolf", "--metrics", "pack4.json")
    assert json.loads((tmp_path / "pack4_report.json").read_text())["model_bytes"] < pack["model_bytes"]


def test_bad_input_is_one_clear_error_and_writes_nothing(tmp_path):
    (tmp_path / "ckpt.safetensors").write_bytes(b"\x00" * 100)
    result = pgolf("quantize", "ckpt.safetensors", "--params", "none.yaml", cwd=tmp_path, ok=False)
    assert result.returncode == 2
    assert "ckpt.safetensors" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "quantized.safetensors").exists()
    result = pgolf("train", "--data", "missing", "--params", "none.yaml", cwd=tmp_path, ok=False)
    assert result.returncode == 2 and "manifest" in result.stderr and "Traceback" not in result.stderr
    result = pgolf("quantize", "ckpt.safetensors", "--set", "bitz=3", "--params", "none.yaml", cwd=tmp_path, ok=False)
    assert result.returncode == 2 and "bitz" in result.stderr


def dvc(*args: str, cwd: Path) -> str:
    result = subprocess.run(["dvc", *args], cwd=cwd, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout + result.stderr


@pytest.mark.slow
def test_dvc_repro_reruns_only_what_a_param_change_touches(tmp_path):
    """The project's own dvc.yaml on generated text (the corpus stage is frozen so nothing is fetched)."""
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "dvc.yaml", project)
    shutil.copytree(REPO / "stages", project / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    from pgolf.config.params_file import render

    params = yaml.safe_load(render("tiny"))  # never the working tree's params.yaml: a user's experiment may edit it
    params["tokenize"].update(vocab_size=512, val_docs=20, max_sentence_length=4192)
    params["train"].update(iterations=15, train_seq_len=64, train_batch_tokens=2048, val_tokens=1024)
    params["model"].update(num_layers=2, model_dim=64)
    params["calibrate"].update(n_batches=2, seq_len=64, batch_seqs=4)
    params["ttt_eval"].update(seq_len=64)
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    raw = project / "data" / "raw"
    raw.mkdir(parents=True)
    for i, doc in enumerate(make_docs()):
        (raw / f"doc_{i:04d}.txt").write_text(doc, encoding="utf-8")
    env_git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    dvc("init", "-q", cwd=project)
    dvc("config", "core.analytics", "false", cwd=project)
    dvc("freeze", "corpus", cwd=project)

    first = dvc("repro", cwd=project)
    for stage in ["tokenize", "train", "calibrate", "quantize", "pack", "ttt-eval", "verify"]:
        assert f"Running stage '{stage}'" in first, stage
    # metrics files are rows of one table: it fits a 120-column terminal; the charts are images beside the data
    table = subprocess.run(["dvc", "metrics", "show"], cwd=project, capture_output=True, text=True, check=True).stdout
    assert "val_bpb" in table and max(map(len, table.splitlines())) <= 120, table
    assert_png(project / "artifacts" / "train_log.png")
    assert_png(project / "artifacts" / "quantize_bits.png")
    ckpt = project / "artifacts" / "ckpt.safetensors"
    ckpt_stat = ckpt.stat().st_mtime_ns
    assert "Running stage" not in dvc("repro", cwd=project)  # up to date

    params["quantize"]["bits"] = 6
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = dvc("repro", cwd=project)
    assert [s for s in STAGES if f"Running stage '{s}'" in second] == ["quantize", "pack", "ttt-eval", "verify"]
    assert ckpt.stat().st_mtime_ns == ckpt_stat

    subprocess.run([*env_git, "add", "-A"], cwd=project, check=True, capture_output=True)
    subprocess.run([*env_git, "commit", "-qm", "pipeline"], cwd=project, check=True, capture_output=True)
    exp = dvc("exp", "run", "-S", "quantize.bits=5", cwd=project)
    assert "Running stage 'train'" not in exp and "Running stage 'quantize'" in exp
    shown = dvc("metrics", "show", "--json", cwd=project)
    assert "val_bpb" in shown
