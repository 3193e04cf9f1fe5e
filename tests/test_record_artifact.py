"""The record family's `final_model.int6.ptz`, read without its script: artifacts written here from the
format's description (both containers; every kind of weight), read back by `pgolf verify`, which must
find exactly the weights they hold and score them as pgolf scores those weights; and malformed ones
(a pickle that would run code, truncated streams, lying tables) refused with one clear error."""

from __future__ import annotations

import io
import os
import shutil
import struct
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from pgolf import verify
from pgolf.audit.checks import RECORD, detect_format
from pgolf.config.presets import PRESETS
from pgolf.config.sections import EvalConfig, ModelConfig, VerifyConfig
from pgolf.errors import PgolfError, Rejected
from pgolf.formats import record_int6
from pgolf.formats.files import read_json
from pgolf.ttt.modes import score_weights
from test_verify import tokenize_into, write_corpus

brotli = pytest.importorskip("brotli")
EVAL = EvalConfig(seq_len=64, device="cpu")
# A small model of the record's architecture, sized as its log's hyperparameters say.
HYPER = {"num_layers": "4", "model_dim": "64", "num_heads": "4", "num_kv_heads": "2", "mlp_mult": "2.0",
         "loop_start": "1", "loop_end": "2", "num_loops": "1", "parallel_start_layer": "3", "xsa_last_n": "4",
         "vocab_size": "300"}


def pgolf_config() -> ModelConfig:
    values = {**PRESETS["record"]["model"], **record_int6.model_overrides(HYPER, "test")}
    return ModelConfig(**{**asdict(ModelConfig(vocab_size=300)), **values})


def record_names(state: dict[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """pgolf's names → the script's flat names (smear gate; model-level parallel-lane tables)."""
    flat = {k: v for k, v in state.items() if "parallel_" not in k and not k.startswith("smear.")}
    flat["smear_gate.weight"], flat["smear_lambda"] = state["smear.smear_w"], state["smear.smear_lambda"]
    post, resid = torch.ones(layers, 2, 2), torch.full((layers, 2), 1.1)
    for i in range(layers):
        if f"blocks.{i}.parallel_post_lambdas" in state:
            post[i], resid[i] = state[f"blocks.{i}.parallel_post_lambdas"], state[f"blocks.{i}.parallel_resid_lambdas"]
    flat["parallel_post_lambdas"], flat["parallel_resid_lambdas"] = post, resid
    return flat


def quantize_like_the_record(flat: dict[str, torch.Tensor]) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(result, kinds, the weights they decode to), by the format's rules: per-row int6 codes with fp16 scales
    for matrices (here above 1,024 weights), int7 for the embedding, int8 rows for the sparse gates, an
    asymmetric LQER correction on tok_emb and a symmetric one on an MLP, fp16 for the rest."""
    result, kinds, expect = {}, {}, {}
    for name, t in flat.items():
        if name.endswith(".attn_gate_w"):
            s = (t.abs().amax(1).clamp_min(1e-10) / 127).half()
            q = torch.clamp(torch.round(t / s.float().view(-1, 1)), -127, 127).to(torch.int8)
            result[name + ".gq"], result[name + ".gs"], kinds[name] = q, s, "gate_int8_row"
            expect[name] = q.float() * s.float().view(-1, 1)
        elif t.ndim == 2 and t.numel() > 1024:
            bits = 7 if name == "tok_emb.weight" else 6
            r = 2 ** (bits - 1) - 1
            s = (12.0 * t.std(dim=1) / r).clamp_min(1e-10).half()
            q = torch.clamp(torch.round(t / s.float().view(-1, 1)), -r, r).to(torch.int8)
            result[name + ".q"], result[name + ".scale"], kinds[name] = q, s, f"gptq (int{bits})"
            w = q.float() * s.float().view(-1, 1)
            e = t - w
            u, sv, vh = torch.linalg.svd(e, full_matrices=False)
            a, b = (u[:, :4] * sv[:4]).contiguous(), vh[:4].contiguous()
            if name == "tok_emb.weight":  # INT2 A with one scale, INT4 B in groups of 64
                sa = (a.abs().amax() / 1.5).half()
                qa = torch.clamp(torch.round(a / sa.float()), -2, 1).to(torch.int8)
                sb = (b.reshape(-1, 64).abs().amax(-1) / 7.5).half()
                qb = torch.clamp(torch.round(b.reshape(-1, 64) / sb.float().view(-1, 1)), -8, 7).to(torch.int8)
                qb = qb.reshape(b.shape)
                result.update({name + ".lqA_a": qa, name + ".lqAs_a": sa, name + ".lqB_a": qb, name + ".lqBs_a": sb})
                kinds[name] += "+lqer_asym"
                w = w + (qa.float() * float(sa)) @ (qb.reshape(-1, 64).float() * sb.float().view(-1, 1)).reshape(b.shape)
            elif name == "blocks.1.mlp.fc.weight":  # INT4 factors with per-row scales
                sa, sb = (a.abs().amax(1) / 7).half(), (b.abs().amax(1) / 7).half()
                qa = torch.clamp(torch.round(a / sa.float().view(-1, 1)), -7, 7).to(torch.int8)
                qb = torch.clamp(torch.round(b / sb.float().view(-1, 1)), -7, 7).to(torch.int8)
                result.update({name + ".lqA": qa, name + ".lqAs": sa, name + ".lqB": qb, name + ".lqBs": sb})
                kinds[name] += "+lqer"
                w = w + (qa.float() * sa.float().view(-1, 1)) @ (qb.float() * sb.float().view(-1, 1))
            expect[name] = w
        else:
            result[name], kinds[name] = t.half(), "passthrough (float16)"
            expect[name] = t.half().float()
    return result, kinds, expect


def torch_save(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def pack_pgrp(streams: list[bytes]) -> bytes:
    return record_int6.PGRP + struct.pack("<I", len(streams)) + b"".join(struct.pack("<I", len(s)) for s in streams) \
        + b"".join(streams)


def lrzip(data: bytes, tmp: Path) -> bytes:
    import subprocess

    (tmp / "s").write_bytes(data)
    subprocess.run(["lrzip", "-z", "-L", "9", "-q", "-f", str(tmp / "s")], check=True, capture_output=True)
    return (tmp / "s.lrz").read_bytes()


def write_pergroup(result: dict, kinds: dict, tmp: Path, seed: int = 0) -> bytes:
    """The PGRP container: int8 codes by role, column-major, three roles row-permuted (random orders here)."""
    rng = np.random.default_rng(seed)
    remainder, shapes, perms, streams = {}, {}, b"", []
    grouped: dict[str, list] = {g: [] for g in record_int6.GROUPS}
    for name, t in result.items():
        parts = name.split(".")
        key = ".".join(parts[2:]) if parts[0] == "blocks" else "_" + name
        if t.dtype == torch.int8 and key in grouped:
            grouped[key].append((int(parts[1]) if parts[0] == "blocks" else 0, t))
        else:
            remainder[name] = t
    for group in record_int6.GROUPS:
        raw = b""
        shapes[group] = []
        for _, t in sorted(grouped[group], key=lambda x: x[0]):
            arr = t.numpy()
            if group in record_int6.SORTED_GROUPS:
                order = rng.permutation(arr.shape[0]).astype(np.uint16)
                perms += order.tobytes()
                arr = arr[order]
            raw += np.ascontiguousarray(arr.T).tobytes()
            shapes[group].append(tuple(t.shape))
        streams.append(lrzip(raw, tmp) if raw else b"")
    streams.append(brotli.compress(torch_save({"r": remainder, "m": kinds, "s": shapes}), quality=11))
    streams.append(brotli.compress(perms, quality=11))
    return pack_pgrp(streams)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("record")
    data = tokenize_into(tmp, "data", write_corpus(tmp / "a.jsonl", seed=0))
    cfg = pgolf_config()
    torch.manual_seed(0)
    from pgolf.nn.model import GPT

    model = GPT(cfg)
    state = {k: v.detach().clone() + 0.05 * torch.randn_like(v) for k, v in model.state_dict().items()}
    result, kinds, expect_flat = quantize_like_the_record(record_names(state, cfg.num_layers))
    expected = record_int6.to_pgolf_names(expect_flat, {k: v.shape for k, v in state.items()}, "test")
    measured = score_weights(expected, cfg, data, EVAL)["val_bpb"]
    log = tmp / "train_seed42.log"
    log.write_text("Hyperparameters:\n" + "".join(f"  {k}: {v}\n" for k, v in HYPER.items())
                   + f"diagnostic quantized val_loss:2.00000000 val_bpb:{measured:.8f} eval_time:1ms\n")
    return {"tmp": tmp, "data": data, "cfg": cfg, "result": result, "kinds": kinds, "expected": expected,
            "measured": measured, "log": log}


def verify_record(world, artifact: Path, fmt: str = "auto") -> tuple[dict, bool]:
    report = world["tmp"] / "verify.json"
    try:
        verify.run(artifact, world["data"], VerifyConfig(), EVAL, {}, None, [world["log"]], fmt, report)
        passed = True
    except Rejected:
        passed = False
    return read_json(world["tmp"] / "verify_report.json"), passed


def test_brotli_container_is_read_renamed_and_scored(world):
    path = world["tmp"] / "final_model.int6.ptz"
    path.write_bytes(brotli.compress(torch_save({"w": world["result"], "m": world["kinds"]}), quality=11))
    assert detect_format(path.read_bytes()) == RECORD
    obj = record_int6.read_record_int6(path.read_bytes(), path, 16_000_000)
    flat = record_int6.dequantize_record(obj, str(path))
    got = record_int6.to_pgolf_names(flat, {k: v.shape for k, v in world["expected"].items()}, str(path))
    assert all(torch.equal(got[k], world["expected"][k]) for k in world["expected"])
    rep, passed = verify_record(world, path)
    checks = {c["name"]: c for c in rep["checks"]}
    assert passed, rep["checks"]
    assert checks["header"]["detail"].startswith("record int6 artifact, brotli container")
    assert "logged hyperparameters" in checks["decode"]["detail"] and rep["model_config"]["num_layers"] == 4
    assert rep["measured"]["val_bpb"] == pytest.approx(world["measured"], abs=1e-9)
    assert checks["tokenizer"]["status"] == "SKIP" and checks["deterministic decode"]["status"] == "PASS"


@pytest.mark.skipif(shutil.which("lrzip") is None, reason="the PGRP container's code streams need the lrzip program")
def test_pergroup_container_is_read_with_its_permutations(world):
    path = world["tmp"] / "pgrp.int6.ptz"
    path.write_bytes(write_pergroup(world["result"], world["kinds"], world["tmp"]))
    obj = record_int6.read_record_int6(path.read_bytes(), path, 16_000_000)
    assert obj["container"] == "pergroup"
    assert all(torch.equal(obj["w"][k], world["result"][k]) for k in world["result"])
    rep, passed = verify_record(world, path)
    assert passed and rep["measured"]["val_bpb"] == pytest.approx(world["measured"], abs=1e-9)


def test_pergroup_needs_lrzip_and_says_so(world, monkeypatch):
    """Without the program, the container is refused naming it (streams made here with zlib stand-ins: the
    reader stops at the first code stream, before looking inside it)."""
    monkeypatch.setenv("PATH", str(world["tmp"] / "no-such-dir"))
    rest = brotli.compress(torch_save({"r": {}, "m": {}, "s": {g: [(2, 2)] for g in record_int6.GROUPS}}))
    data = pack_pgrp([b"LRZI" + bytes(20)] + [b""] * 6 + [rest, b""])
    with pytest.raises(PgolfError, match="needs the `lrzip` program, which is not on PATH"):
        record_int6.read_record_int6(data, "x.ptz", 16_000_000)


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/pgolf-record-pwned",))


def test_malformed_artifacts_are_refused(world, tmp_path):
    marker = Path("/tmp/pgolf-record-pwned")
    marker.unlink(missing_ok=True)
    hostile = brotli.compress(torch_save({"w": {"x": Boom()}, "m": {}}))
    with pytest.raises(PgolfError, match="refusing to unpickle it"):
        record_int6.read_record_int6(hostile, "evil.ptz", 16_000_000)
    assert not marker.exists()

    good = pack_pgrp([b""] * 7 + [brotli.compress(torch_save({"r": {}, "m": {}, "s": {}})), b""])
    for bad, match in ((good[:-5], "length table does not match"),
                       (good[:8] + struct.pack("<I", 10**6) + good[12:], "length table does not match"),
                       (record_int6.PGRP + struct.pack("<I", 3) + bytes(12), "with 3 streams"),
                       (b"PGRP\x09", "truncated before its stream count")):
        with pytest.raises(PgolfError, match=match):
            record_int6.read_record_int6(bad, "bad.ptz", 16_000_000)
    not_a_dict = brotli.compress(torch_save([1, 2, 3]))
    with pytest.raises(PgolfError, match="no 'w' and 'm' dicts"):
        record_int6.read_record_int6(not_a_dict, "list.ptz", 16_000_000)
    lying = dict(world["result"])
    lying["blocks.0.mlp.proj.weight.scale"] = lying["blocks.0.mlp.proj.weight.scale"][:-1]
    with pytest.raises(PgolfError, match="do not fit; corrupt"):
        record_int6.dequantize_record({"w": lying, "m": world["kinds"]}, "lying.ptz")
    # A vocabulary the data does not have is a mismatch, named.
    flat = record_int6.dequantize_record({"w": world["result"], "m": world["kinds"]}, "x")
    with pytest.raises(PgolfError, match="vocab/tokenizer mismatch"):
        record_int6.record_model_config(flat, 1024, HYPER, "x")


def test_hyperparameters_come_from_the_log():
    from pgolf.audit.challenge_claims import parse_log

    text = "noise\nHyperparameters:\n  num_layers: 11\n  mlp_mult: 4.0\n  tie_embeddings: True\ntrain_shards: 80\n" \
           "diagnostic quantized val_loss:2.1 val_bpb:1.2 eval_time:1ms\n"
    run = parse_log(text, "log")
    assert run.hyperparameters == {"num_layers": "11", "mlp_mult": "4.0", "tie_embeddings": "True"}
    assert record_int6.model_overrides(run.hyperparameters, "log") == {"num_layers": 11, "mlp_mult": 4.0,
                                                                       "tie_embeddings": True}
