"""verify re-scores an artifact and catches oversize blobs, flipped bytes, the wrong data and false claims.

The data is a generated corpus run through `pgolf tokenize`; the model is a randomly perturbed GPT
(training is not what is under test), quantized to 6 bits and packed by the real stages.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from conftest import filled_gpt
from typer.testing import CliRunner

from pgolf import pack, quantize, tokenize, ttt_eval, verify
from pgolf.errors import PgolfError, Rejected
from pgolf.formats.files import read_json, save_tensors, sha256_file
from pgolf.formats.blob import PREFIX
from pgolf.config.sections import (CHALLENGE_LIMIT, EvalConfig, ModelConfig, PackConfig, QuantizeConfig, TokenizeConfig,
                                   VerifyConfig)
from pgolf.quant.grid import quantize_rtn_tensor

WORDS = ("the quick brown fox jumps over lazy dog alpha beta gamma delta golf parameter model byte token "
         "shard river mountain castle window stride claim verify blob header").split()
EVAL = EvalConfig(seq_len=64, device="cpu")


def write_corpus(path: Path, seed: int, docs: int = 90) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(docs):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 70)))
            f.write(json.dumps({"text": text}) + "\n")
    return path


def tokenize_into(tmp: Path, name: str, corpus: Path, tokenizer: Path | None = None) -> Path:
    out = tmp / name
    tokenize.run([corpus], out, TokenizeConfig(vocab_size=300, val_docs=8, workers=1), tokenizer, tmp / f"{name}.json")
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("verify")
    data = tokenize_into(tmp, "data", write_corpus(tmp / "a.jsonl", seed=0))
    # Same tokenizer, other validation documents: a different val set.
    other_val = tokenize_into(tmp, "other_val", write_corpus(tmp / "b.jsonl", seed=1), data / "tokenizer.model")
    # A tokenizer trained on other text: same vocabulary size, different pieces.
    rng = random.Random(2)
    shuffled = tmp / "c.jsonl"
    with open(shuffled, "w") as f:
        for _ in range(90):
            f.write(json.dumps({"text": " ".join("".join(rng.sample(w, len(w))) for w in rng.sample(WORDS, 12))}) + "\n")
    other_tok = tokenize_into(tmp, "other_tok", shuffled)

    cfg = ModelConfig(vocab_size=300, num_layers=2, model_dim=256, num_heads=4, num_kv_heads=2)
    model = filled_gpt(cfg, scale=0.05)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    state["tok_emb.weight"] = state["tok_emb.weight"].to(torch.bfloat16)  # as trained on CUDA
    ckpt = tmp / "ckpt.safetensors"
    save_tensors(ckpt, state, "checkpoint", {"model_config": asdict(cfg), "params": {},
                                             "tokenizer_sha256": read_json(data / "manifest.json")["tokenizer_sha256"]})
    quantized = tmp / "quantized.safetensors"
    quantize.run(ckpt, quantized, QuantizeConfig(bits=6), PackConfig(codec="zlib"), None, tmp / "quantize.json", None)
    blob = tmp / "model.pgolf"
    pack.run(quantized, data, blob, PackConfig(codec="zlib"), tmp / "pack.json")
    claims = tmp / "ttt_eval_metrics.json"
    ttt_eval.run(blob, data, EVAL, claims)
    return {"tmp": tmp, "data": data, "other_val": other_val, "other_tok": other_tok, "blob": blob,
            "claims": claims, "state": state, "cfg": cfg, "pack": read_json(tmp / "pack_report.json")}


def run_verify(world, blob=None, data=None, cfg=VerifyConfig(), claim=None, claims=None, fmt="auto",
               eval_cfg=EvalConfig(device="cpu")) -> tuple[dict, bool]:
    """(report, passed): passed is False when verify exited 1."""
    report = world["tmp"] / "verify.json"
    if report.exists():
        report.unlink()
    try:
        verify.run(blob or world["blob"], data or world["data"], cfg, eval_cfg, {}, claim, claims, fmt, report)
        passed = True
    except Rejected as exc:
        assert exc.exit_code == 1
        passed = False
    rep = read_json(world["tmp"] / "verify_report.json")  # written whatever the outcome, with every check row
    assert rep["passed"] is passed and read_json(report)["passed"] is passed
    return rep, passed


def status(rep: dict) -> dict[str, str]:
    return {c["name"]: c["status"] for c in rep["checks"]}


def copy_with_flip(world, offset_in: str) -> Path:
    data = bytearray(world["blob"].read_bytes())
    _, _, header_len, _ = PREFIX.unpack_from(data)
    start = PREFIX.size + header_len
    i = PREFIX.size + header_len // 2 if offset_in == "header" else start + (len(data) - start) // 2
    data[i] ^= 0x10
    path = world["tmp"] / f"flipped_{offset_in}.pgolf"
    path.write_bytes(bytes(data))
    return path


# ---------------------------------------------------------------------------------------------------

def test_passes_on_correct_claim(world):
    rep, passed = run_verify(world, claims=world["claims"])
    skipped = {name for name, st in status(rep).items() if st != "PASS"}
    assert passed and skipped == {"document isolation"}, rep["checks"]  # the baseline-style model: no doc mask
    claimed = read_json(world["claims"])
    assert rep["measured"]["val_bpb"] == pytest.approx(claimed["val_bpb"], abs=1e-9)
    # The claim's eval settings were used (the default seq_len would be 1024).
    assert rep["eval"]["seq_len"] == 64 and rep["eval_sources"]["seq_len"] == "claim"
    assert rep["sizes"]["model_bytes"] == world["pack"]["model_bytes"]
    assert rep["sizes"]["code_bytes_recorded"] == world["pack"]["code_bytes"]
    header = next(c["detail"] for c in rep["checks"] if c["name"] == "header")  # pack's default: format 3
    assert header.startswith(f"blob v3, {len(world['pack']['streams'])} streams (") and "codec pergroup" in header


def test_catches_false_claim(world):
    measured = read_json(world["claims"])["val_bpb"]
    rep, passed = run_verify(world, claim=measured + 0.05, eval_cfg=EVAL)
    st = status(rep)
    assert not passed and st["bpb"] == "FAIL"
    assert all(v == "PASS" for k, v in st.items() if k not in ("bpb", "document isolation"))
    # Within tolerance passes.
    rep, passed = run_verify(world, claim=measured + 0.001, eval_cfg=EVAL)
    assert passed and status(rep)["bpb"] == "PASS"


def test_catches_oversize_blob(world):
    total = world["pack"]["total_bytes"]
    rep, passed = run_verify(world, cfg=VerifyConfig(limit=total - 1), claims=world["claims"])
    st = status(rep)
    assert not passed and st["size"] == "FAIL" and "OVER by 1" in next(c["detail"] for c in rep["checks"] if c["name"] == "size")
    assert st["bpb"] == "PASS"  # still scored: the numbers are informative
    rep, passed = run_verify(world, cfg=VerifyConfig(limit=total), claims=world["claims"])
    assert passed


@pytest.mark.parametrize("where, failing", [("header", "header"), ("payload", "payload hash")])
def test_catches_flipped_byte(world, where, failing):
    rep, passed = run_verify(world, blob=copy_with_flip(world, where), claims=world["claims"])
    st = status(rep)
    assert not passed and st[failing] == "FAIL"
    assert st["decode"] == "SKIP" and st["bpb"] == "SKIP"  # nothing decoded from a damaged file


def test_catches_truncated_and_foreign_files(world):
    truncated = world["tmp"] / "truncated.pgolf"
    truncated.write_bytes(world["blob"].read_bytes()[:-100])
    rep, passed = run_verify(world, blob=truncated)
    assert not passed and status(rep)["payload hash"] == "FAIL"
    foreign = world["tmp"] / "foreign.bin"
    foreign.write_bytes(b"GIF89a" + bytes(500))
    rep, passed = run_verify(world, blob=foreign)
    assert not passed and status(rep)["header"] == "FAIL" and "bad magic" in rep["checks"][0]["detail"]


def test_catches_wrong_val_set(world):
    rep, passed = run_verify(world, data=world["other_val"], claims=world["claims"])
    st = status(rep)
    assert not passed and st["val shards"] == "FAIL"
    assert st["tokenizer"] == "PASS" and st["bpb"] == "SKIP"


def test_catches_wrong_tokenizer(world):
    rep, passed = run_verify(world, data=world["other_tok"], claims=world["claims"])
    st = status(rep)
    assert not passed and st["tokenizer"] == "FAIL" and st["val shards"] == "FAIL"


def test_official_int8_artifact(world):
    """The challenge's own export format, auto-detected, scored with the baseline architecture."""
    from test_quant import reference_dequantize, reference_int8_export, write_ptz

    obj = reference_int8_export(world["state"])
    assert "tok_emb.weight" in obj["quantized"] and "blocks.0.mlp.fc.weight" in obj["quantized"]
    ptz = world["tmp"] / "final_model.int8.ptz"
    write_ptz(ptz, obj)
    # The expected score: the independently dequantized weights in the known architecture.
    from pgolf.ttt.modes import score_weights

    expected = score_weights(reference_dequantize(obj), world["cfg"], world["data"], EVAL)
    rep, passed = run_verify(world, blob=ptz, claim=expected["val_bpb"], eval_cfg=EVAL)
    st = status(rep)
    assert passed and rep["format"] == "official-int8", rep["checks"]
    assert st["bpb"] == "PASS" and st["tokenizer"] == "SKIP" and st["val shards"] == "SKIP"
    assert rep["measured"]["val_bpb"] == pytest.approx(expected["val_bpb"], abs=1e-9)
    assert rep["model_config"]["num_layers"] == 2 and rep["model_config"]["model_dim"] == 256
    # The int8 export scores differently from the 6-bit blob: different weights really were evaluated.
    assert rep["measured"]["val_bpb"] != read_json(world["claims"])["val_bpb"]

    rep, passed = run_verify(world, blob=ptz, fmt="pgolf")
    assert not passed and status(rep)["header"] == "FAIL"


def test_official_int8_vocab_mismatch(world):
    from test_quant import reference_int8_export, write_ptz

    state = dict(world["state"])
    state["tok_emb.weight"] = torch.cat([state["tok_emb.weight"], state["tok_emb.weight"][:20]])
    ptz = world["tmp"] / "wrong_vocab.int8.ptz"
    write_ptz(ptz, reference_int8_export(state))
    rep, passed = run_verify(world, blob=ptz, eval_cfg=EVAL)
    assert not passed and status(rep)["decode"] == "FAIL" and "vocab" in rep["checks"][3]["detail"]


def test_claim_inputs_validated(world, tmp_path):
    bad = tmp_path / "claims.json"
    bad.write_text(json.dumps({"loss": 1.0}))
    with pytest.raises(PgolfError, match="val_bpb"):
        run_verify(world, claims=bad)
    with pytest.raises(PgolfError, match="not both"):
        run_verify(world, claim=1.0, claims=world["claims"])
    with pytest.raises(PgolfError, match="manifest"):
        run_verify(world, data=tmp_path)


def test_cli_exit_codes(world):
    from pgolf.cli import app

    runner = CliRunner()
    report = world["tmp"] / "cli_verify.json"
    base = ["verify", str(world["blob"]), "--data", str(world["data"]), "--report", str(report),
            "--params", str(world["tmp"] / "no_params.yaml"), "--set", "device=cpu"]
    ok = runner.invoke(app, base + ["--claims", str(world["claims"])])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, base + ["--claim", "0.5", "--set", "seq_len=64"])
    assert bad.exit_code == 1 and read_json(report)["passed"] is False
    missing = runner.invoke(app, ["verify", str(world["tmp"] / "nope.pgolf"), "--data", str(world["data"])])
    assert missing.exit_code == 2


def test_pack_over_limit_writes_no_blob_and_keeps_a_good_one(world, tmp_path):
    quantized = world["tmp"] / "quantized.safetensors"
    out = tmp_path / "model.pgolf"
    with pytest.raises(Rejected, match="exceeds the limit"):
        pack.run(quantized, world["data"], out, PackConfig(codec="zlib", limit=100_000), tmp_path / "pack.json")
    assert not out.exists()
    good = world["blob"].read_bytes()  # an earlier, good blob under the same name is not lost
    out.write_bytes(good)
    with pytest.raises(Rejected, match="left as it was") as exc:
        pack.run(quantized, world["data"], out, PackConfig(codec="zlib", limit=100_000), tmp_path / "pack.json")
    assert exc.value.exit_code == 1 and out.read_bytes() == good
    rep = read_json(tmp_path / "pack_report.json")
    assert rep["fits"] is False and rep["total_bytes"] == rep["model_bytes"] + rep["code_bytes"] > 100_000


def test_pack_refuses_other_tokenizer(world, tmp_path):
    quantized = world["tmp"] / "quantized.safetensors"
    with pytest.raises(PgolfError, match="tokenizer mismatch"):
        pack.run(quantized, world["other_tok"], tmp_path / "m.pgolf", PackConfig(codec="zlib"), tmp_path / "p.json")
    assert not (tmp_path / "m.pgolf").exists()


def test_blob_matches_quantizer(world):
    """What verify scored is what quantize produced: the blob's codes equal a direct 6-bit RTN."""
    from pgolf.formats.blob import read_blob

    _, tensors = read_blob(world["blob"], CHALLENGE_LIMIT)
    q, s, _ = quantize_rtn_tensor(world["state"]["blocks.1.mlp.fc.weight"], 6, "percentile", 99.99984, 12.85)
    assert torch.equal(tensors["blocks.1.mlp.fc.weight#codes"], q) and torch.equal(tensors["blocks.1.mlp.fc.weight#scales"], s)
    assert sha256_file(world["blob"]) == world["pack"]["blob_sha256"]


def test_eval_settings_follow_the_claim_unless_overridden():
    from pgolf.config.sections import EvalConfig
    from pgolf.audit.claims import eval_settings

    cfg, sources = eval_settings(EvalConfig(seq_len=1024, stride=0), {"seq_len": 64, "stride": 32}, {"stride": 16})
    assert (cfg.seq_len, cfg.stride, cfg.val_tokens) == (64, 16, 0)
    assert sources["seq_len"] == "claim" and sources["stride"] == "command line" and sources["val_tokens"] == "params"


def test_verify_re_runs_the_claimed_ttt_mode(world, tmp_path):
    """A claim made with score-first TTT is re-scored with the same mode and settings, read from the claim."""
    from pgolf.report.metrics import companion

    cfg = replace(EVAL, ttt="score_first", ttt_lr=0.01, ttt_chunk_tokens=256, ttt_epochs=1, ttt_batch_seqs=4)
    claims = tmp_path / "ttt_eval_metrics.json"
    ttt_eval.run(world["blob"], world["data"], cfg, claims)
    report = read_json(companion(claims, "report", ".json"))
    assert report["ttt"]["mode"] == "score_first" and report["ttt"]["steps"] > 0 and report["ttt"]["compliant"]
    assert report["val_bpb"] != report["val_bpb_before_ttt"]  # the adaptation changed the score
    rep, passed = run_verify(world, claims=claims, cfg=VerifyConfig(tolerance=1e-6))
    assert passed and rep["eval"]["ttt"] == "score_first", rep["checks"]
    assert rep["measured"]["val_bpb"] == pytest.approx(report["val_bpb"], abs=1e-9)


def test_verify_refuses_a_claim_made_with_train_then_score(world, tmp_path):
    """PR #398's protocol runs when asked by name, says it is not a valid score, and verify refuses it."""
    from pgolf.report.metrics import companion

    cfg = replace(EVAL, ttt="train_then_score", ttt_lr=0.01, ttt_epochs=2, ttt_batch_seqs=4)
    claims = tmp_path / "ttt_eval_metrics.json"
    ttt_eval.run(world["blob"], world["data"], cfg, claims)
    row, report = read_json(claims), read_json(companion(claims, "report", ".json"))
    assert row["compliant"] is False and report["ttt"]["steps"] > 0
    assert "before scoring" in report["ttt"]["noncompliance"]
    rep, passed = run_verify(world, claims=claims, cfg=VerifyConfig(tolerance=1.0))  # any number: refused
    assert not passed and status(rep)["ttt compliance"] == "FAIL" and status(rep)["bpb"] == "SKIP"


def test_the_warm_up_changes_the_clock_not_the_score(world, tmp_path):
    cfg = replace(EVAL, ttt="score_first", ttt_lr=0.01, ttt_chunk_tokens=256, ttt_epochs=1, ttt_batch_seqs=4)
    results = {}
    for warm in (True, False):
        ttt_eval.run(world["blob"], world["data"], replace(cfg, warmup=warm), tmp_path / f"{warm}.json")
        results[warm] = read_json(tmp_path / f"{warm}_report.json")
    assert results[True]["val_bpb"] == results[False]["val_bpb"]
    assert results[True]["eval_clock"]["warmup_seconds"] > 0 == results[False]["eval_clock"]["warmup_seconds"]


@pytest.mark.slow
def test_torchrun_ttt_eval_matches_one_process(world, tmp_path):
    """Two ranks (gloo) share the windows, chunks or documents: the score equals one process's up to float
    rounding, for plain sliding windows, score-first SGD (gradients summed across ranks) and phased LoRA."""
    import subprocess
    import sys

    (tmp_path / "none.yaml").write_text("{}\n")
    modes = {"none": ["--stride", "16"],
             "score_first": ["--set", "ttt=score_first", "--set", "ttt_lr=0.02", "--set", "ttt_chunk_tokens=256",
                             "--set", "ttt_epochs=2", "--set", "ttt_batch_seqs=3"],
             # AdamW with β1 = 0 moves every entry by ±lr on its first step, whatever the gradient's size, so
             # rounding-level differences in the pauses' SGD grow with the LoRA lr: the record's 1e-4 here
             "phased_lora": ["--set", "ttt=phased_lora", "--set", "ttt_lora_rank=4", "--set", "ttt_lora_lr=0.0001",
                             "--set", "ttt_lora_chunk_tokens=16", "--set", "ttt_lora_batch_docs=2",
                             "--set", "ttt_lora_warm_a=false",  # warm A follows a rank's own batches
                             "--set", "ttt_prefix_docs=4", "--set", "ttt_phases=2", "--set", "ttt_global_lr=0.02",
                             "--set", "ttt_chunk_tokens=128", "--set", "ttt_batch_seqs=3"]}

    def launch(prefix: list[str], name: str) -> dict:
        out = tmp_path / f"{name}.json"
        cmd = prefix + ["-m", "pgolf.cli", "ttt-eval", str(world["blob"]), "--data", str(world["data"]), "--device",
                        "cpu", "--seq-len", "64", "--params", str(tmp_path / "none.yaml"), "--metrics", str(out),
                        *modes[name.split(".")[0]]]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
        return read_json(tmp_path / f"{name}_report.json")

    for mode in modes:
        one = launch([sys.executable], f"{mode}.one")
        two = launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], f"{mode}.two")
        assert two["world_size"] == 2 and two["tokens_scored"] == one["tokens_scored"]
        assert two["sidecar_bytes"] == one["sidecar_bytes"]
        assert two["val_bpb"] == pytest.approx(one["val_bpb"], abs=1e-5), mode
        if mode != "none":
            assert one["ttt"]["steps"] > 0 and one["val_bpb"] != one["val_bpb_before_ttt"], mode
    assert [p["documents"] for p in one["ttt"]["phases"]] == [2, 4]
