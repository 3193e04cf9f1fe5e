"""verify audits a challenge submission's own files: claims read from logs and submission.json, the
claimed size, and the byte denominator, each planted mistake caught with its cause named and the honest
claim passed. The claims derive from a real pgolf evaluation of CaseOps data generated here."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import filled_gpt, make_docs, tokenize_config, write_jsonl
from typer.testing import CliRunner

from pgolf import tokenize, verify
from pgolf.audit.challenge_claims import load_challenge_claims, parse_log
from pgolf.cli import app
from pgolf.config.sections import EvalConfig, ModelConfig, VerifyConfig
from pgolf.errors import PgolfError, Rejected
from pgolf.formats.files import read_json
from pgolf.nn.model import GPT
from pgolf.text.evaluate import EvalData
from pgolf.text.tokenizer import load_tokenizer
from pgolf.ttt.modes import score_weights

LN2 = math.log(2)


def recased(docs: list[str], seed: int = 0) -> list[str]:
    """Capitals in several patterns, so the CaseOps text differs from the original and its LUT bytes too."""
    rng = random.Random(seed)
    cases = (str.capitalize, str.upper, lambda w: w, lambda w: w)
    return [" ".join(rng.choice(cases)(w) for w in d.split(" ")) for d in docs]


@pytest.fixture(scope="module")
def evaluation(tmp_path_factory) -> dict:
    """CaseOps-tokenized generated text, a small model scored on all of it (sliding windows: every target)
    and on a prefix, as a submission's log would report them."""
    root = tmp_path_factory.mktemp("audit")
    corpus = write_jsonl(root / "corpus.jsonl", recased(make_docs(60)))
    data = root / "data"
    tokenize.run([corpus], data, tokenize_config(caseops=True, val_docs=6, workers=1), None, root / "tok.json")
    cfg = ModelConfig(vocab_size=int(read_json(data / "manifest.json")["vocab_size"]), num_layers=2, model_dim=32,
                      num_heads=2, num_kv_heads=1)
    model = GPT(cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    full = score_weights(state, cfg, data, EvalConfig(seq_len=64, stride=32, device="cpu", warmup=False))
    part = score_weights(state, cfg, data, EvalConfig(seq_len=64, val_tokens=640, device="cpu", warmup=False))
    tokens = EvalData.load(data).tokens
    sp = load_tokenizer(data / "tokenizer.model")
    # counted from the tokenizer's pieces here, not through pgolf's byte tables
    leading = sum(sp.id_to_piece(int(t)).startswith("▁") for t in tokens[1:])
    return {"root": root, "data": data, "full": full, "part": part, "n": tokens.size - 1, "leading": leading}


def log(path: Path, loss: float, bpb: float, tokens: int, caseops: bool = True, size: int = 15_900_000) -> Path:
    """A log in the challenge scripts' words (the baseline's loader and round-trip lines, the record's flags)."""
    path.write_text(f"hyperparameters:\n  caseops_enabled: {caseops}\n"
                    f"val_loader:shards pattern=./data/fineweb_val_*.bin tokens:{tokens}\n"
                    "step:100/100 val_loss:9.9 val_bpb:9.9\n"
                    f"Total submission size int8+zlib: {size} bytes\n"
                    f"final_int8_zlib_roundtrip_exact val_loss:{loss:.8f} val_bpb:{bpb:.8f}\n")
    return path


def audit(evaluation, *claims: Path, limit: int = 16_000_000) -> tuple[dict, bool]:
    report = evaluation["root"] / "verify.json"
    try:
        verify.run(None, evaluation["data"], VerifyConfig(limit=limit), EvalConfig(device="cpu"), {}, None,
                   list(claims), "auto", report)
        passed = True
    except Rejected:
        passed = False
    rep = read_json(evaluation["root"] / "verify_report.json")
    return {c["name"]: c for c in rep["checks"]}, passed


def test_the_honest_log_passes_with_its_derivation(evaluation, tmp_path):
    full = evaluation["full"]
    assert full["tokens_scored"] == evaluation["n"]
    checks, passed = audit(evaluation, log(tmp_path / "seed0.log", full["val_loss"], full["val_bpb"], evaluation["n"]))
    assert passed, checks
    detail = checks["byte denominator"]["detail"]
    assert f"= {full['sidecar_bytes']:,}" in detail and "implied bytes = val_loss" in detail
    assert checks["claimed size"]["status"] == "PASS"


def test_caseops_data_scored_with_lut_bytes_is_caught(evaluation, tmp_path):
    full = evaluation["full"]
    assert full["lut_bytes"] != full["sidecar_bytes"]  # the CaseOps text's LUT count is not the original's
    planted = log(tmp_path / "lut.log", full["val_loss"], full["val_bpb_lut"], evaluation["n"], caseops=False)
    checks, passed = audit(evaluation, planted)
    detail = checks["byte denominator"]["detail"]
    assert not passed and "Cause: CaseOps data scored with tokenizer-LUT bytes" in detail
    assert "caseops_enabled: False" in detail and f"{full['val_bpb']:.6f}" in detail  # the real score, recomputed


def test_a_leading_space_counted_twice_is_caught(evaluation, tmp_path):
    full = evaluation["full"]
    inflated = full["lut_bytes"] + evaluation["leading"]
    bpb = full["val_loss"] / LN2 * evaluation["n"] / inflated
    checks, passed = audit(evaluation, log(tmp_path / "space.log", full["val_loss"], bpb, evaluation["n"]))
    assert not passed and "Cause: leading space counted twice" in checks["byte denominator"]["detail"]


def test_a_partial_validation_set_is_caught(evaluation, tmp_path):
    part = evaluation["part"]
    checks, passed = audit(evaluation, log(tmp_path / "part.log", part["val_loss"], part["val_bpb"],
                                           part["tokens_scored"]))
    detail = checks["byte denominator"]["detail"]
    assert not passed and f"partial validation set: {part['tokens_scored']:,} of {evaluation['n']:,}" in detail


def test_another_tokenizer_or_validation_set_is_named(evaluation, tmp_path):
    full = evaluation["full"]
    more = log(tmp_path / "more.log", full["val_loss"], full["val_bpb"], evaluation["n"] + 500)
    checks, passed = audit(evaluation, more)
    assert not passed and "a different tokenizer or validation set" in checks["byte denominator"]["detail"]
    fewer = log(tmp_path / "fewer.log", full["val_loss"], full["val_bpb"] * 0.9, evaluation["n"] - 100)
    checks, passed = audit(evaluation, fewer)
    assert not passed and "a different tokenizer or validation set" in checks["byte denominator"]["detail"]


def test_a_claimed_size_over_the_limit_fails(evaluation, tmp_path):
    full = evaluation["full"]
    over = log(tmp_path / "over.log", full["val_loss"], full["val_bpb"], evaluation["n"], size=16_024_793)
    checks, passed = audit(evaluation, over)
    assert not passed and checks["claimed size"]["status"] == "FAIL" and "16,024,793" in checks["claimed size"]["detail"]
    assert checks["byte denominator"]["status"] == "PASS"


def test_several_seeds_and_the_submission_json_are_held_together(evaluation, tmp_path):
    full, n = evaluation["full"], evaluation["n"]
    logs = [log(tmp_path / f"seed{i}.log", full["val_loss"] + d, (full["val_loss"] + d) / LN2 * n / full["sidecar_bytes"], n)
            for i, d in enumerate((0.0, 0.01, -0.01))]
    runs = load_challenge_claims(logs).runs
    mean = sum(r.val_bpb for r in runs) / 3
    honest = tmp_path / "submission.json"
    honest.write_text(json.dumps({"track": "10min_16mb", "val_bpb": round(mean, 8), "bytes_total": 15_900_000}))
    checks, passed = audit(evaluation, *logs, honest)
    assert passed, checks
    assert "3 run(s)" in checks["claims agree"]["detail"] and "std" in checks["claims agree"]["detail"]
    honest.write_text(json.dumps({"track": "10min_16mb", "val_bpb": round(mean - 0.002, 8)}))
    checks, passed = audit(evaluation, *logs, honest)
    assert not passed and checks["claims agree"]["status"] == "FAIL"


def test_a_submission_json_alone_gives_its_seeds(evaluation, tmp_path):
    path = tmp_path / "submission.json"
    path.write_text(json.dumps({"track": "10min_16mb", "val_bpb": 1.5, "val_loss": 2.5, "seed_results": {
        "1": {"val_bpb": 1.4, "artifact_bytes": 15_000_000}, "2": {"val_bpb": 1.6, "artifact_bytes": 16_000_001}}}))
    claims = load_challenge_claims([path])
    assert [r.val_bpb for r in claims.runs] == [1.4, 1.6] and claims.val_bpb == 1.5
    checks, passed = audit(evaluation, path)
    assert not passed and checks["claimed size"]["status"] == "FAIL" and checks["claims agree"]["status"] == "PASS"
    assert checks["byte denominator"]["status"] == "SKIP"  # no token count in a submission.json


def test_the_parser_reads_each_scripts_words_and_says_what_it_looked_for(tmp_path):
    run = parse_log("diagnostic quantized val_loss:2.34727563 val_bpb:1.07254371 eval_time:49995ms\n"
                    "quantized_ttt_phased val_loss:2.31944212 val_bpb:1.05989454 eval_time:508785ms\n"
                    "val_tokens: 47851520\n", "r.log")
    assert (run.metric, run.val_bpb, run.val_loss, run.tokens) == ("quantized_ttt_phased", 1.05989454, 2.31944212,
                                                                    47_851_520)
    assert run.evidence["score"].startswith("r.log:2:")
    with pytest.raises(PgolfError, match="no score line found; looked for TTT score.*int8 round trip"):
        parse_log("step:1 train_loss:3.0\n", "empty.log")


def test_the_cli_audits_logs_without_an_artifact(evaluation, tmp_path):
    full = evaluation["full"]
    honest = log(tmp_path / "a.log", full["val_loss"], full["val_bpb"], evaluation["n"])
    planted = log(tmp_path / "b.log", full["val_loss"], full["val_bpb_lut"], evaluation["n"], caseops=False)
    common = ["verify", "--data", str(evaluation["data"]), "--params", str(tmp_path / "none.yaml"),
              "--report", str(tmp_path / "v.json")]
    assert CliRunner().invoke(app, common + ["--claims", str(honest)]).exit_code == 0
    review = tmp_path / "review.md"
    result = CliRunner().invoke(app, common + ["--claims", str(planted), "--markdown", str(review)])
    assert result.exit_code == 1 and "byte denominator" in result.output
    text = review.read_text()  # the summary to paste into the pull request
    assert text.startswith("### pgolf verify: FAILED (byte denominator)")
    assert "| byte denominator | **FAIL** | " in text and "Cause: CaseOps data scored with tokenizer-LUT bytes" in text
    result = CliRunner().invoke(app, common)
    assert result.exit_code == 2 and "give an artifact to verify, or --claims" in result.output.replace("\n", " ")


# ---- model-level checks on a decoded artifact

@pytest.fixture(scope="module")
def artifact(evaluation) -> dict:
    """A packed blob of a document-masked model with an active SmearGate (so a BOS leak would show)."""
    from dataclasses import asdict

    from pgolf import pack, quantize
    from pgolf.config.sections import PackConfig, QuantizeConfig
    from pgolf.formats.files import save_tensors

    root, data = evaluation["root"], evaluation["data"]
    cfg = ModelConfig(vocab_size=int(read_json(data / "manifest.json")["vocab_size"]), num_layers=2, model_dim=32,
                      num_heads=2, num_kv_heads=1, doc_mask=True, smear_gate=True)
    model = filled_gpt(cfg)
    with torch.no_grad():
        model.smear.smear_lambda.fill_(1.0)  # the gate mixes the previous token in
    ckpt = root / "ckpt.safetensors"
    save_tensors(ckpt, {k: v.detach().clone() for k, v in model.state_dict().items()}, "checkpoint",
                 {"model_config": asdict(cfg), "params": {},
                  "tokenizer_sha256": read_json(data / "manifest.json")["tokenizer_sha256"]})
    quantize.run(ckpt, root / "q.safetensors", QuantizeConfig(bits=8), PackConfig(codec="zlib"), None, root / "q.json", None)
    blob = root / "model.pgolf"
    pack.run(root / "q.safetensors", data, blob, PackConfig(codec="zlib"), root / "pack.json")
    return {"blob": blob, "data": data, "root": root}


def model_rows(artifact) -> dict:
    report = artifact["root"] / "mv.json"
    try:
        verify.run(artifact["blob"], artifact["data"], VerifyConfig(), EvalConfig(seq_len=64, device="cpu"), {},
                   None, None, "auto", report)
    except Rejected:
        pass
    return {c["name"]: c for c in read_json(artifact["root"] / "mv_report.json")["checks"]}


MODEL_CHECKS = ("causality", "document isolation", "normalised distribution", "deterministic decode")


def test_an_honest_model_passes_the_model_checks(artifact):
    rows = model_rows(artifact)
    assert all(rows[name]["status"] == "PASS" for name in MODEL_CHECKS), rows


def test_a_smeargate_bos_leak_is_caught(artifact, monkeypatch):
    from pgolf.nn import model as model_module

    def leaky(self, e, input_ids):  # the gate without its BOS mask: the previous document leaks in
        gate = torch.sigmoid(torch.nn.functional.linear(e[..., :self.smear_w.size(1)], self.smear_w.to(e.dtype)))
        return torch.cat([e[:, :1], e[:, 1:] + self.smear_lambda.to(e.dtype) * gate[:, 1:] * e[:, :-1]], dim=1)

    monkeypatch.setattr(model_module.SmearGate, "forward", leaky)
    rows = model_rows(artifact)
    assert rows["document isolation"]["status"] == "FAIL" and "leaks across the BOS" in rows["document isolation"]["detail"]
    assert rows["causality"]["status"] == "PASS"


def test_an_unnormalised_score_is_caught(artifact, monkeypatch):
    from pgolf.text import ledger

    real = ledger.F.cross_entropy

    def bonus(*args, **kwargs):  # −log p + 0.1 nats less: a "distribution" summing to e^0.1
        return real(*args, **kwargs) - 0.1

    monkeypatch.setattr(ledger.F, "cross_entropy", bonus)
    rows = model_rows(artifact)
    assert rows["normalised distribution"]["status"] == "FAIL", rows["normalised distribution"]


# ---- validation identity

def identity_row(evaluation, data: Path, expect: Path | None = None) -> dict:
    report = evaluation["root"] / "id.json"
    full = evaluation["full"]
    honest = log(evaluation["root"] / "id.log", full["val_loss"], full["val_bpb"], evaluation["n"])
    try:
        verify.run(None, data, VerifyConfig(), EvalConfig(device="cpu"), {}, None, [honest], "auto", report,
                   expect_manifest=expect)
    except (Rejected, PgolfError):
        pass
    return {c["name"]: c for c in read_json(evaluation["root"] / "id_report.json")["checks"]}["val identity"]


def test_val_identity_gives_both_digests_and_recognises_caseops(evaluation, tmp_path):
    import hashlib
    import shutil

    data = evaluation["data"]
    shard = sorted(data.glob("fineweb_val_0*.bin"))[0]
    md5 = hashlib.md5(shard.read_bytes()).hexdigest()
    row = identity_row(evaluation, data)
    assert row["status"] == "PASS" and md5 in row["detail"] and "CaseOps" in row["detail"]

    good = tmp_path / "expected.json"
    good.write_text(json.dumps({shard.name: md5}))
    assert identity_row(evaluation, data, good)["status"] == "PASS"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({shard.name: {"md5": "0" * 32}, "fineweb_val_000009.bin": "1" * 64}))
    row = identity_row(evaluation, data, bad)
    assert row["status"] == "FAIL" and f"{shard.name}: md5 {md5} ≠ expected" in row["detail"]
    assert "fineweb_val_000009.bin: missing" in row["detail"]

    no_sidecar = tmp_path / "no_sidecar"
    shutil.copytree(data, no_sidecar)
    for sidecar in no_sidecar.glob("fineweb_val_bytes_*.bin"):
        sidecar.unlink()
    row = identity_row(evaluation, no_sidecar)
    assert row["status"] == "FAIL" and "without the original-byte sidecar" in row["detail"]


def test_document_isolation_finds_a_boundary_past_a_long_first_document():
    from types import SimpleNamespace

    from pgolf.audit import model_checks

    n = model_checks.SAMPLE_TOKENS
    stream = np.r_[1, np.full(5 * n, 7), 1, np.full(3 * n, 9)]  # Wikipedia-long documents: no BOS in the first n
    tokens = model_checks.boundary_sample(SimpleNamespace(tokens=stream), bos_id=1)
    assert tokens.size == n + 1 and tokens[n // 2] == 1 and (tokens[:n // 2] == 7).all() and (tokens[n // 2 + 1:] == 9).all()
    assert model_checks.boundary_sample(SimpleNamespace(tokens=stream[:5 * n]), bos_id=1) is None  # one document


def test_the_record_scripts_diagnostic_is_audited_over_the_targets_it_scored(evaluation, tmp_path):
    """The record's eval_val drops, on each rank, the windows that fill no whole batch: its diagnostic line
    divides by the bytes of fewer targets than the val_tokens it prints. A log scored that way must match
    those targets' canonical bytes (and be named a partial set), not fail as a different validation set."""
    from pgolf.nn.model import scoring_logits
    from pgolf.text.bpb import plan_windows
    from pgolf.text.ledger import Ledger, score_windows

    data = EvalData.load(evaluation["data"])
    cfg = ModelConfig(vocab_size=int(read_json(evaluation["data"] / "manifest.json")["vocab_size"]), num_layers=2,
                      model_dim=32, num_heads=2, num_kv_heads=1)
    book = Ledger(data.tokens, data.sidecar, data.luts, "cpu", keep_losses=True)
    score_windows(book, plan_windows(data.tokens.size, 64, 32), scoring_logits(GPT(cfg).eval(), torch.device("cpu")),
                  8, False)
    seq_len, world, accum, batch_tokens = 64, 2, 1, 64 * 3 * 2  # 3 windows a batch on each rank
    loaded = (data.tokens.size - 1) // seq_len * seq_len
    scored = []  # the script's loop, rank by rank: batches of 3 windows while a whole batch fits
    for rank in range(world):
        first, last = loaded // seq_len * rank // world, loaded // seq_len * (rank + 1) // world
        batch = first
        while batch + 3 <= last:
            scored.extend(range(batch * seq_len + 1, (batch + 3) * seq_len + 1))
            batch += 3
    scored = np.array(scored)
    assert 0 < scored.size < loaded  # windows were dropped
    loss = float(book.losses[scored].mean())
    bpb = loss / LN2 * scored.size / int(data.sidecar[scored].sum())
    path = tmp_path / "record.log"
    path.write_text("Hyperparameters:\n" + "".join(f"  {k}: {v}\n" for k, v in dict(
        caseops_enabled=True, eval_seq_len=seq_len, grad_accum_steps=accum, val_batch_tokens=batch_tokens,
        world_size=world).items()) + f"val_tokens: {loaded}\n"
        f"diagnostic quantized val_loss:{loss:.8f} val_bpb:{bpb:.8f} eval_time:1ms\n")
    checks, _ = audit(evaluation, path)
    detail = checks["byte denominator"]["detail"]
    assert f"= {int(data.sidecar[scored].sum()):,}" in detail and "eval_val scores per rank" in detail, detail
    assert f"{scored.size:,} of the {loaded:,} it loaded" in detail and "partial validation set" in detail
    wrong = tmp_path / "wrong.log"  # the same numbers over bytes inflated by 1 %: not a match
    wrong.write_text(path.read_text().replace(f"val_bpb:{bpb:.8f}", f"val_bpb:{bpb / 1.01:.8f}"))
    checks, _ = audit(evaluation, wrong)
    assert "≠ canonical" in checks["byte denominator"]["detail"]


def test_windows_record_scores_each_segment_alone_and_is_what_a_record_log_asks_for(evaluation, tmp_path):
    """windows=record batches segments of different lengths (right-padded): the score must equal each segment
    run through the model on its own. A record diagnostic log makes verify re-score that way."""
    import torch.nn.functional as F

    from pgolf.text.bpb import plan_record_segments

    data = EvalData.load(evaluation["data"])
    cfg = ModelConfig(vocab_size=int(read_json(evaluation["data"] / "manifest.json")["vocab_size"]), num_layers=2,
                      model_dim=32, num_heads=2, num_kv_heads=1)
    torch.manual_seed(0)
    model = GPT(cfg).eval()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    got = score_weights(state, cfg, evaluation["data"], EvalConfig(seq_len=64, windows="record", record_batch_seqs=3,
                                                                   record_ranks=2, batch_seqs=5, device="cpu",
                                                                   warmup=False))
    segments = plan_record_segments(data.tokens.size, np.flatnonzero(data.tokens == cfg.bos_id), 64, 3, 2)
    assert len({w.end - w.start for w in segments}) > 1  # lengths differ: the batches were padded
    nats, n_bytes = 0.0, 0
    with torch.no_grad():
        for w in segments:
            x = torch.from_numpy(data.tokens[w.start:w.end + 1].astype(np.int64))
            nats += float(F.cross_entropy(model.logits(x[None, :-1])[0], x[1:], reduction="sum"))
            n_bytes += int(data.sidecar[w.start + 1:w.end + 1].sum())
    assert got["tokens_scored"] == sum(w.end - w.start for w in segments)
    assert got["val_bpb"] == pytest.approx(nats / LN2 / n_bytes, rel=1e-6)  # float32 noise of other batch shapes

    path = tmp_path / "diag.log"
    path.write_text("Hyperparameters:\n  eval_seq_len: 64\n  grad_accum_steps: 1\n  val_batch_tokens: 384\n"
                    f"  world_size: 2\nval_tokens: {(data.tokens.size - 1) // 64 * 64}\n"
                    f"diagnostic quantized val_loss:{got['val_loss']:.8f} val_bpb:{got['val_bpb']:.8f} eval_time:1ms\n")
    audit(evaluation, path)
    rep = read_json(evaluation["root"] / "verify_report.json")
    assert {k: rep["eval"][k] for k in ("windows", "record_batch_seqs", "record_ranks", "seq_len")} == \
        {"windows": "record", "record_batch_seqs": 3, "record_ranks": 2, "seq_len": 64}
    assert rep["eval_sources"]["windows"] == "claim"


def test_a_record_ttt_claim_is_rescored_with_its_logged_phased_ttt_settings(evaluation, tmp_path):
    """The record's score line is its phased TTT: verify re-scores it with phased_lora in the log's settings
    (its names mapped onto pgolf's), the adapters its flags name; the command line still wins."""
    hyper = dict(ttt_eval_seq_len=64, ttt_lora_rank=8, ttt_lora_lr=0.0003, ttt_chunk_size=16, ttt_batch_size=4,
                 ttt_weight_decay=0.25, ttt_beta2=0.95, phased_ttt_prefix_docs=3, phased_ttt_num_phases=2,
                 global_ttt_lr=0.002, global_ttt_momentum=0.8, global_ttt_epochs=2, global_ttt_chunk_tokens=256,
                 global_ttt_batch_seqs=4, global_ttt_grad_clip=0.5, ttt_k_lora=True, ttt_mlp_lora=False,
                 ttt_o_lora=True)
    path = tmp_path / "ttt.log"
    path.write_text("Hyperparameters:\n" + "".join(f"  {k}: {v}\n" for k, v in hyper.items())
                    + "quantized_ttt_phased val_loss:2.00000000 val_bpb:1.10000000 eval_time:1ms\n")
    audit(evaluation, path)
    rep = read_json(evaluation["root"] / "verify_report.json")
    expect = {"ttt": "phased_lora", "ttt_lora_targets": "q,v,head,k,o", "seq_len": 64, "ttt_lora_rank": 8,
              "ttt_lora_lr": 0.0003, "ttt_lora_chunk_tokens": 16, "ttt_lora_batch_docs": 4, "ttt_weight_decay": 0.25,
              "ttt_beta2": 0.95, "ttt_prefix_docs": 3, "ttt_phases": 2, "ttt_global_lr": 0.002,
              "ttt_global_momentum": 0.8, "ttt_global_epochs": 2, "ttt_chunk_tokens": 256, "ttt_batch_seqs": 4,
              "ttt_grad_clip": 0.5}
    assert {k: rep["eval"][k] for k in expect} == expect
    assert all(rep["eval_sources"][k] == "claim" for k in expect)
