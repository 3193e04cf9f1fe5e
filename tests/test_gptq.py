"""GPTQ, per-group bit widths and LQER on a small trained model with its calibrated Hessians."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pgolf.config.build import build
from pgolf.config.sections import PackConfig, QuantizeConfig
from pgolf.errors import PgolfError
from pgolf.formats import dequant
from pgolf.formats.files import load_tensors, save_tensors, sha256_file
from pgolf.nn.names import tensor_group
from pgolf.quant import gptq
from pgolf.quant.gptq import weighted_error
from pgolf.quant.recipe import quantize_state_dict


def dequantize(tensors, schema):
    return dequant.dequantize(tensors, schema, "test")


def gptq_quantize(w, h, scale, bits, act_order=False, name="weight"):
    return gptq.gptq_quantize(w, h, scale, bits, 0.01, 128, act_order, name)


def run_quantize(ckpt, out, cfg, hessians, metrics):
    from pgolf import quantize as stage

    stage.run(ckpt, out, cfg, PackConfig(), hessians, metrics, None)

# The tiny model's matrices are far below the default keep-float threshold; quantize them all, while the
# control tensors (at most 2×64 values here) stay float.
BASE = QuantizeConfig(keep_float_max_numel=256, device="cpu")


@pytest.fixture(scope="module")
def trained(calibrated_model, tmp_path_factory) -> dict:
    """The session's trained + calibrated GPT (conftest), with this module's own output directory."""
    return {**calibrated_model, "root": tmp_path_factory.mktemp("gptq")}


def quantized_rows(report: dict) -> dict[str, dict]:
    return {r["name"]: r for r in report["tensors"] if r["method"] in ("rtn", "gptq")}


def test_every_matrix_has_a_hessian_and_is_quantized(trained):
    state, hessians = trained["state"], trained["hessians"]
    matrices = [n for n, t in state.items() if t.ndim == 2 and t.numel() > BASE.keep_float_max_numel]
    assert "tok_emb.weight" in matrices and len(matrices) == 1 + 6 * trained["model"].num_layers
    assert set(matrices) <= set(hessians)
    _, schema, report = quantize_state_dict(state, replace(BASE, method="gptq", bits=4), hessians)
    assert {n for n, e in schema.items() if e["method"] == "gptq"} == set(matrices)
    assert report["totals"]["fallback_tensors"] == [] and report["totals"]["weighted_tensors"] == len(matrices)


@pytest.mark.parametrize("bits,clip", [(3, "sdclip"), (4, "percentile"), (6, "sdclip")])
def test_gptq_weighted_error_below_rtn_for_every_tensor(trained, bits, clip):
    cfg = replace(BASE, bits=bits, clip=clip, sdclip_k=4.0)
    _, _, rtn = quantize_state_dict(trained["state"], replace(cfg, method="rtn"), trained["hessians"])
    for act_order in (False, True):
        _, _, gptq = quantize_state_dict(trained["state"], replace(cfg, method="gptq", gptq_act_order=act_order),
                                               trained["hessians"])
        rows_rtn, rows_gptq = quantized_rows(rtn), quantized_rows(gptq)
        assert set(rows_rtn) == set(rows_gptq) and len(rows_gptq) == 13
        for name, r in rows_gptq.items():
            assert r["method"] == "gptq" and r["bits"] == bits
            assert r["weighted_err"] < rows_rtn[name]["weighted_err"], (name, act_order, r["weighted_err"],
                                                                         rows_rtn[name]["weighted_err"])
        assert gptq["totals"]["weighted_err"] < 0.9 * rtn["totals"]["weighted_err"]


def test_gptq_uses_the_stored_grid_and_int8_is_near_lossless(trained):
    state, hessians = trained["state"], trained["hessians"]
    tensors, schema, report = quantize_state_dict(state, replace(BASE, method="gptq", bits=8), hessians)
    restored = dequantize(tensors, schema)
    for name, r in quantized_rows(report).items():
        assert int(tensors[f"{name}#codes"].abs().max()) <= 127
        w = state[name].float()
        # GPTQ moves error into directions H weighs little, so the plain error may exceed RTN's half
        # step; it stays small, and the output error relative to the output energy trace(W H Wᵀ) tiny.
        assert r["rel_err"] < 0.03, (name, r["rel_err"])
        energy = weighted_error(w, torch.zeros_like(w), hessians[name])
        assert weighted_error(w, restored[name], hessians[name]) < 2e-5 * energy, name


def test_act_order_permutation_returns_codes_in_original_order():
    """A Hessian whose dominant inputs sit in the last columns: act-order must visit them first yet
    return codes in the original order (so they decode with the same per-row scales)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 32, generator=g) * torch.linspace(0.1, 3.0, 32)
    h = x.T @ x / x.shape[0]
    w = torch.randn(16, 32, generator=g)
    scale = (w.abs().amax(dim=1) / 7).half().float()
    plain = gptq_quantize(w, h, scale, 4)
    ordered = gptq_quantize(w, h, scale, 4, act_order=True)
    rtn = torch.clamp(torch.round(w / scale[:, None]), -7, 7)
    for q in (plain, ordered):
        err = weighted_error(w, q.float() * scale[:, None], h)
        assert err < weighted_error(w, rtn * scale[:, None], h)
    # A dead input column: quantized to 0 whatever the weight.
    h_dead = h.clone()
    h_dead[5, :] = 0
    h_dead[:, 5] = 0
    assert bool((gptq_quantize(w, h_dead, scale, 4, act_order=True)[:, 5] == 0).all())


def test_bad_hessians_are_clear_errors(trained):
    w = torch.randn(8, 16)
    scale = torch.full((8,), 0.1)
    with pytest.raises(PgolfError, match="expected 16×16"):
        gptq_quantize(w, torch.eye(12), scale, 4, name="m.weight")
    bad = torch.eye(16)
    bad[2, 2] = float("nan")
    with pytest.raises(PgolfError, match="NaN"):
        gptq_quantize(w, bad, scale, 4)

    # Through the stage: a Hessian file from this checkpoint whose H does not fit the weight.
    root, ckpt = trained["root"], trained["ckpt"]
    wrong = dict(trained["hessians"])
    wrong["blocks.1.mlp.proj.weight"] = torch.eye(7)
    path = root / "wrong_hessians.safetensors"
    save_tensors(path, wrong, "hessians", {"inputs": {"checkpoint": sha256_file(ckpt)}})
    out = root / "never.safetensors"
    with pytest.raises(PgolfError, match=r"wrong_hessians.safetensors.*blocks\.1\.mlp\.proj\.weight"):
        run_quantize(ckpt, out, replace(BASE, method="gptq"), path, root / "never.json")
    assert not out.exists()


def test_missing_hessians_fall_back_to_rtn_with_a_notice(trained, capsys):
    root, ckpt = trained["root"], trained["ckpt"]
    out = root / "fallback.safetensors"
    run_quantize(ckpt, out, replace(BASE, method="gptq", bits=6), None, root / "fallback.json")
    printed = capsys.readouterr().out
    assert "no --hessians given" in printed and "fell back to rtn" in printed
    schema = load_tensors(out, "quantized")[1]["schema"]
    quantized = {n: e for n, e in schema.items() if e["bits"]}
    assert quantized and all(e["method"] == "rtn" and e["fallback"] == "no Hessian for this tensor"
                             for e in quantized.values())

    # One tensor missing from the file: only that one falls back, and the report says so.
    partial = {k: v for k, v in trained["hessians"].items() if k != "blocks.0.attn.c_k.weight"}
    _, schema, report = quantize_state_dict(trained["state"], replace(BASE, method="gptq", bits=6), partial)
    assert "blocks.0.attn.c_k.weight" in capsys.readouterr().out
    assert report["totals"]["fallback_tensors"] == ["blocks.0.attn.c_k.weight"]
    assert schema["blocks.0.attn.c_k.weight"]["method"] == "rtn" and schema["blocks.1.attn.c_k.weight"]["method"] == "gptq"


def test_per_group_bits_and_k_land_on_the_right_tensors(trained):
    cfg = replace(BASE, method="gptq", bits=6, clip="sdclip", embed_bits=7, mlp_bits=5, attn_k=9.0)
    tensors, schema, _ = quantize_state_dict(trained["state"], cfg, trained["hessians"])
    seen = set()
    for name, e in schema.items():
        if e["bits"] is None:
            assert tensor_group(name) is None or trained["state"][name].numel() <= 256
            continue
        group = tensor_group(name)
        seen.add(group)
        expect_bits = {"embed": 7, "mlp": 5, "attn": 6}[group]
        assert e["bits"] == expect_bits, name
        assert e["clip"]["k"] == (9.0 if group == "attn" else cfg.sdclip_k), name
        assert int(tensors[f"{name}#codes"].abs().max()) <= 2 ** (expect_bits - 1) - 1
    assert seen == {"embed", "attn", "mlp"}
    assert tensor_group("blocks.3.attn.proj.weight") == "attn"
    assert tensor_group("blocks.3.mlp.proj.weight") == "mlp"
    assert tensor_group("lm_head.weight") == "embed" and tensor_group("blocks.0.attn.q_gain") is None
    with pytest.raises(PgolfError, match="embed_bits"):
        build(QuantizeConfig, [({"embed_bits": 9}, "params.yaml")], "quantize")


def lqer_runs(trained, cfg: QuantizeConfig) -> tuple[dict, dict, dict, dict, set[str]]:
    """(rows without LQER, rows with, stored tensors, schema, the top-3 tensors by ‖W − Ŵ‖_F)."""
    _, _, plain = quantize_state_dict(trained["state"], cfg, trained["hessians"])
    tensors, schema, corrected = quantize_state_dict(trained["state"], replace(cfg, lqer_top_k=3, lqer_rank=4),
                                                           trained["hessians"])
    by_error = sorted(quantized_rows(plain).values(), key=lambda r: r["rmse"] ** 2 * r["numel"], reverse=True)
    return quantized_rows(plain), quantized_rows(corrected), tensors, schema, {r["name"] for r in by_error[:3]}


def test_lqer_reduces_the_error_it_targets(trained):
    """Reference LQER (SVD of E) on RTN's error: the top-3 tensors by ‖E‖_F all get a correction that
    lowers both their Frobenius and their H-weighted error; the others are untouched."""
    before, after, tensors, schema, targets = lqer_runs(trained, replace(BASE, method="rtn", bits=4, clip="sdclip",
                                                                         sdclip_k=4.0))
    assert {n for n, e in schema.items() if "lqer" in e} == targets
    for name in targets:
        entry = schema[name]
        assert entry["encoding"] == "int_per_row+lqer" and entry["lqer"]["rank"] == 4 and not entry["lqer"]["weighted"]
        assert after[name]["rmse"] < before[name]["rmse"], name
        assert after[name]["weighted_err"] < before[name]["weighted_err"], name
        # 64-wide B: the asymmetric packing, int2 A with one scale, int4 B with a scale per 64 values.
        assert entry["lqer"]["packing"] == "asym"
        assert set(tensors[f"{name}#lqer_a"].unique().tolist()) <= {-2, -1, 0, 1}
        assert tensors[f"{name}#lqer_a_scales"].numel() == 1
        assert tensors[f"{name}#lqer_b_scales"].numel() == tensors[f"{name}#lqer_b"].numel() // 64
        assert int(tensors[f"{name}#lqer_b"].abs().max()) <= 8
    for name in set(before) - targets:
        assert after[name]["rmse"] == before[name]["rmse"] and "lqer" not in schema[name]


def test_lqer_after_gptq_never_raises_the_weighted_error(trained, capsys):
    """GPTQ leaves its error where H is small, so the reference fit of E may raise trace(E H Eᵀ): such
    corrections are left out with a notice. The H-weighted fit (lqer_weighted) lowers it on every target."""
    cfg = replace(BASE, method="gptq", bits=4, clip="sdclip", sdclip_k=4.0)
    kept = {}
    for weighted in (False, True):
        before, after, _, schema, targets = lqer_runs(trained, replace(cfg, lqer_weighted=weighted))
        printed = capsys.readouterr().out
        kept[weighted] = {n for n in targets if "lqer" in schema[n]}
        for name in targets:
            if name in kept[weighted]:
                assert schema[name]["lqer"]["weighted"] == weighted
                assert after[name]["weighted_err"] < before[name]["weighted_err"], name
            else:
                assert f"LQER left out for {name}" in printed and after[name]["rmse"] == before[name]["rmse"]
    # The rounded factors (int2 A) can still spoil a fit, but the weighted one survives on most targets.
    assert len(kept[True]) >= 2 and len(kept[True]) >= len(kept[False])


def test_lqer_symmetric_fallback_packing():
    from pgolf.quant.lqer import error_factors, lowrank_term, quantize_factors

    g = torch.Generator().manual_seed(1)
    e = torch.randn(40, 3, generator=g) @ torch.randn(3, 30, generator=g)  # B = 4×30: not a multiple of 64
    parts, meta = quantize_factors(*error_factors(e, 4))
    assert meta["packing"] == "sym" and parts["lqer_a_scales"].numel() == 40 and parts["lqer_b_scales"].numel() == 4
    assert int(parts["lqer_a"].abs().max()) <= 7 and int(parts["lqer_b"].abs().max()) <= 7
    assert float((e - lowrank_term(parts, meta)).norm()) < 0.3 * float(e.norm())


def test_lqer_file_round_trips_through_the_stage_and_dequantize(trained):
    from safetensors.torch import load_file

    from pgolf.formats.files import read_json, read_meta

    root, ckpt = trained["root"], trained["ckpt"]
    out, metrics = root / "lqer.safetensors", root / "lqer.json"
    # RTN's error: LQER keeps both corrections (see above), so the file holds the lqer encoding.
    cfg = replace(BASE, method="rtn", bits=5, clip="sdclip", embed_bits=6, lqer_top_k=2)
    run_quantize(ckpt, out, cfg, trained["hess"], metrics)
    schema = read_meta(out, "quantized")["schema"]
    from_file = dequantize(load_file(str(out)), schema)  # the file alone
    tensors, schema_direct, _ = quantize_state_dict(trained["state"], cfg, trained["hessians"])
    direct = dequantize(tensors, schema_direct)
    assert sum("lqer" in e for e in schema.values()) == 2
    for name, w in trained["state"].items():
        assert torch.equal(from_file[name], direct[name]) and from_file[name].dtype == w.dtype, name
    report = read_json(root / "lqer_report.json")
    assert len(report["totals"]["lqer_tensors"]) == 2 and report["totals"]["weighted_err"] > 0
    emb = next(r for r in report["tensors"] if r["name"] == "tok_emb.weight")
    assert emb["bits"] == 6 and emb["method"] == "rtn" and emb["weighted_err"] is not None
    # Tampered factors are caught by shape checks, not silently mis-decoded.
    bad = load_file(str(out))
    name = report["totals"]["lqer_tensors"][0]
    bad[f"{name}#lqer_b_scales"] = bad[f"{name}#lqer_b_scales"][:-1]
    with pytest.raises(PgolfError, match="LQER scales do not fit"):
        dequantize(bad, schema)


def test_lqer_blob_scores_through_ttt_eval(trained, tokenized_dir):
    """quantize (GPTQ + LQER) → pack → ttt-eval: the packed blob decodes and scores."""
    from pgolf import pack, ttt_eval
    from pgolf.formats.files import read_json
    from pgolf.config.sections import EvalConfig

    root = trained["root"]
    q, blob = root / "blob_q.safetensors", root / "model.pgolf"
    run_quantize(trained["ckpt"], q, replace(BASE, method="gptq", bits=6, lqer_top_k=3, lqer_weighted=True),
                 trained["hess"], root / "blob_q.json")
    assert read_json(root / "blob_q_report.json")["totals"]["lqer_tensors"]
    pack.run(q, tokenized_dir, blob, PackConfig(), root / "pack.json")
    ttt_eval.run(blob, tokenized_dir, EvalConfig(seq_len=64, val_tokens=1024, batch_seqs=4, device="cpu"),
                 root / "eval.json")
    result = read_json(root / "eval.json")
    assert 0 < result["val_bpb"] < 20
