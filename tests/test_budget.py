"""quantize --budget: per-tensor bit widths chosen so that the packed artifact fits a byte budget."""

from __future__ import annotations

from dataclasses import asdict, replace

import pytest

from pgolf import pack, quantize
from pgolf.config.build import build
from pgolf.config.sections import PackConfig, QuantizeConfig
from pgolf.errors import PgolfError
from pgolf.formats import dequant
from pgolf.formats.files import load_tensors, read_json, read_meta, sha256_file
from pgolf.formats.submission import data_identity
from pgolf.quant.budget import HEADER_SLACK, BudgetSearch
from pgolf.quant.recipe import quantize_state_dict
from pgolf.report.metrics import companion

ZLIB = PackConfig(codec="zlib")


def dequantize(tensors, schema):
    return dequant.dequantize(tensors, schema, "test")

# All 13 matrices quantized (the tiny model's are below the default keep-float threshold); GPTQ with
# SDClip, whose error falls with every added bit, so without LQER options the path's end is uniform 8 bits.
# The search's machinery is tested on the layer objective, whose errors the quantize report also sums.
BASE = QuantizeConfig(keep_float_max_numel=256, device="cpu", method="gptq", clip="sdclip", sdclip_k=4.0,
                      budget_bits="2,3,4,5,6,7,8", budget_lqer=False, budget_objective="layer")


@pytest.fixture(scope="module")
def trained(calibrated_model, tokenized_dir, tmp_path_factory) -> dict:
    """The session's trained + calibrated GPT (conftest), its own output directory, and a budget search."""
    t = {**calibrated_model, "root": tmp_path_factory.mktemp("budget")}
    meta = read_meta(t["ckpt"], "checkpoint")
    # The metadata quantize.run writes (less the schema), so that the predicted header is pack's.
    out_meta = {"model_config": meta["model_config"], "tokenizer_sha256": meta.get("tokenizer_sha256"),
                "params": asdict(BASE), "inputs": {"checkpoint": sha256_file(t["ckpt"]), "hessians": sha256_file(t["hess"])}}
    t["search"] = BudgetSearch(t["state"], BASE, ZLIB, t["hessians"], out_meta, data_identity(tokenized_dir))
    return t


def packed_total(trained, tokenized_dir, quantized, budget: int, codec: str = "zlib") -> int:
    """Bytes of blob + code as the real pack stage measures them (its limit set to the budget)."""
    metrics = trained["root"] / "pack_metrics.json"
    try:
        pack.run(quantized, tokenized_dir, trained["root"] / "model.pgolf", PackConfig(codec=codec, limit=budget),
                 metrics)
    except BaseException:  # typer.Exit(1) when over the limit; the metrics are written either way
        pass
    return read_json(metrics)["bytes"]


@pytest.mark.parametrize("with_data", [True, False])
def test_budget_output_packs_within_the_budget(trained, tokenized_dir, with_data):
    search = trained["search"]
    lo, hi = search.measure(0), search.measure(len(search.path))
    budget = (lo + hi) // 2
    root = trained["root"]
    out, metrics = root / f"budget_{with_data}.safetensors", root / f"budget_{with_data}.json"
    quantize.run(trained["ckpt"], out, replace(BASE, budget=budget), ZLIB, trained["hess"], metrics,
                 tokenized_dir if with_data else None)
    full = read_json(companion(metrics, "report", ".json"))  # the metrics row's report: per-tensor detail
    report = full["budget"]
    total = packed_total(trained, tokenized_dir, out, budget)
    assert total <= budget and report["measured_bytes"] <= budget
    if with_data:  # quantize saw pack's inputs: its measurement is pack's plus the slack held back for the
        # compressed header, give or take the few bytes by which its stand-in hash compresses differently
        assert 0 <= report["measured_bytes"] - total <= 2 * HEADER_SLACK and report["data_identity"] == "exact"
        assert report["header_slack_bytes"] == HEADER_SLACK
    else:  # the val-shard list is unknown: held back as a reserve, never undercounted
        assert report["reserve_bytes"] == BASE.budget_reserve and total <= report["measured_bytes"]
    # The file is self-describing: per-tensor widths in its schema, and dequantize needs nothing else.
    tensors, meta = load_tensors(out, "quantized")
    schema = meta["schema"]
    for name, chosen in report["tensors"].items():
        assert schema[name]["bits"] == chosen["bits"] and chosen["est_bytes"] > 0
    assert set(dequantize(tensors, schema)) == set(trained["state"])
    assert abs(full["totals"]["weighted_err"] - report["error"]) <= 1e-9 * report["error"]


def test_more_budget_never_gives_a_larger_error(trained):
    search = trained["search"]
    lo, hi = search.measure(0), search.measure(len(search.path))
    budgets = [lo + (hi - lo) * i // 9 for i in range(10)]
    fits = [search.fit(b).report for b in budgets]
    errors = [r["error"] for r in fits]
    for budget, r in zip(budgets, fits):
        # The stop is exact among real builds: k upgrades fit, k + 1 do not (or the path ends).
        assert r["measured_bytes"] == search.measure(r["upgrades"]) <= budget
        assert r["upgrades"] == len(search.path) or search.measure(r["upgrades"] + 1) > budget
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 0.1 * errors[0]
    assert len(set(errors)) >= 5  # the budget steers the search across the whole range


def test_mid_budget_mixes_widths_and_a_generous_one_is_uniform_max_bits(trained):
    search = trained["search"]
    lo, hi = search.measure(0), search.measure(len(search.path))
    mid = search.fit((lo + hi) // 2).report
    widths = {t["bits"] for t in mid["tensors"].values()}
    assert len(widths) >= 2, widths
    assert len(mid["tensors"]) == 13 and not mid["fixed_tensors"] and mid["error_kind"] == "hessian"

    generous = search.fit(2 * hi)
    assert all(t["bits"] == 8 for t in generous.report["tensors"].values())
    _, _, uniform = quantize_state_dict(trained["state"], replace(BASE, bits=8), trained["hessians"])
    assert generous.report["error"] == pytest.approx(uniform["totals"]["weighted_err"], rel=1e-9)
    # The chosen encodings are the stage's own: re-assembled, they give the same report numbers.
    _, _, assembled = quantize_state_dict(trained["state"], BASE, trained["hessians"], encoded=generous.encoded)
    assert assembled["totals"]["weighted_err"] == pytest.approx(uniform["totals"]["weighted_err"], rel=1e-12)


def test_impossible_budget_is_a_clear_error_and_writes_nothing(trained):
    search = trained["search"]
    smallest = search.measure(0)
    root = trained["root"]
    out, metrics = root / "impossible.safetensors", root / "impossible.json"
    with pytest.raises(PgolfError, match=rf"--budget {smallest - 1:,} bytes is below the smallest packed size"
                                         rf".*{smallest:,} bytes"):
        search.fit(smallest - 1)
    with pytest.raises(PgolfError, match=r"--budget 1,000 bytes is below"):
        quantize.run(trained["ckpt"], out, replace(BASE, budget=1000), ZLIB, trained["hess"], metrics, None)
    assert not out.exists() and not metrics.exists()


def test_budget_params_are_checked_and_group_bits_pin_tensors(trained, capsys):
    for bad, match in ((dict(budget_bits="4,9"), "budget_bits"), (dict(budget_bits="x"), "budget_bits"),
                       (dict(lqer_top_k=2), "lqer_top_k=0"), (dict(budget=-5), "budget=-5")):
        with pytest.raises(PgolfError, match=match):
            build(QuantizeConfig, [({"budget": 10**6, **bad}, "params.yaml")], "quantize")
    with pytest.raises(PgolfError, match="codec='gzip' must be one of auto, zlib"):
        build(PackConfig, [({"codec": "gzip"}, "params.yaml")], "pack")

    # Without Hessians: the plain squared error, said so; an embed override keeps tok_emb out of the search.
    cfg = replace(BASE, method="rtn", embed_bits=6, budget_bits="3,5,8")
    search = BudgetSearch(trained["state"], cfg, ZLIB, None, {"model_config": {"vocab_size": 512}}, None)
    assert "plain squared error" in capsys.readouterr().out
    fit = search.fit(search.measure(len(search.path))).report
    assert fit["error_kind"] == "plain" and fit["fixed_tensors"] == ["tok_emb.weight"]
    assert "tok_emb.weight" not in fit["tensors"] and search.encoded_at(0)["tok_emb.weight"].entry["bits"] == 6
    assert {t["bits"] for t in fit["tensors"].values()} == {8} and fit["reserve_bytes"] == cfg.budget_reserve


def test_budget_chooses_lqer_per_tensor_and_its_file_decodes(trained, tokenized_dir):
    cfg = replace(BASE, budget_bits="2,4,8", budget_lqer=True, lqer_rank=2, lqer_weighted=True)
    meta = read_meta(trained["ckpt"], "checkpoint")
    out_meta = {"model_config": meta["model_config"], "tokenizer_sha256": meta.get("tokenizer_sha256"),
                "params": asdict(cfg), "inputs": {}}
    search = BudgetSearch(trained["state"], cfg, ZLIB, trained["hessians"], out_meta, data_identity(tokenized_dir))
    corrected = [(name, o) for name, opts in search.options.items() for o in opts if o.lqer]
    assert corrected, "no tensor was offered an LQER correction"
    for name, o in corrected:  # each correction is offered only where it lowers that width's error
        plain = next(p for p in search.options[name] if p.bits == o.bits and not p.lqer)
        assert o.err < plain.err and o.enc.entry["encoding"] == "int_per_row+lqer"
    # The path's end is each tensor's best option: below uniform 8 bits wherever LQER helps at 8 bits.
    generous = search.fit(2 * search.measure(len(search.path))).report
    _, _, uniform = quantize_state_dict(trained["state"], replace(BASE, bits=8), trained["hessians"])
    assert generous["error"] <= uniform["totals"]["weighted_err"] * (1 + 1e-9)

    lo, hi = search.measure(0), search.measure(len(search.path))
    budget = (lo + hi) // 2
    out, metrics = trained["root"] / "budget_lqer.safetensors", trained["root"] / "budget_lqer.json"
    quantize.run(trained["ckpt"], out, replace(cfg, budget=budget), ZLIB, trained["hess"], metrics, tokenized_dir)
    full = read_json(companion(metrics, "report", ".json"))  # the metrics row's report: per-tensor detail
    report = full["budget"]
    assert 0 <= report["measured_bytes"] - packed_total(trained, tokenized_dir, out, budget) <= 2 * HEADER_SLACK
    assert report["measured_bytes"] <= budget
    tensors, qmeta = load_tensors(out, "quantized")
    for name, chosen in report["tensors"].items():
        assert (qmeta["schema"][name]["encoding"] == "int_per_row+lqer") == chosen["lqer"]
    assert set(report["lqer_tensors"]) == {n for n, t in report["tensors"].items() if t["lqer"]}
    assert set(dequantize(tensors, qmeta["schema"])) == set(trained["state"])
    assert abs(full["totals"]["weighted_err"] - report["error"]) <= 1e-9 * report["error"]


def test_budget_with_brotli_estimates_fast_and_measures_with_brotli_itself(trained, tokenized_dir):
    cfg = replace(BASE, budget_bits="4,8")
    meta = read_meta(trained["ckpt"], "checkpoint")
    out_meta = {"model_config": meta["model_config"], "tokenizer_sha256": meta.get("tokenizer_sha256"),
                "params": asdict(cfg), "inputs": {}}
    search = BudgetSearch(trained["state"], cfg, PackConfig(codec="brotli"), trained["hessians"], out_meta,
                          data_identity(tokenized_dir))
    assert search.estimate_codec == "brotli-q5"
    lo, hi = search.measure(0), search.measure(len(search.path))
    fit = search.fit((lo + hi) // 2).report
    assert fit["codec"] == "brotli" and fit["measured_bytes"] <= (lo + hi) // 2 < search.measure(fit["upgrades"] + 1)


def test_budget_measures_chunked_packing_as_pack_does(trained, tokenized_dir):
    """With pack.chunk_bytes the search builds chunked blobs (format 2, the header uncompressed); its measured
    size is pack's, byte for byte."""
    from pgolf.config.sections import MIN_CHUNK_BYTES

    search = trained["search"]
    budget = (search.measure(0) + search.measure(len(search.path))) // 2
    out, metrics = trained["root"] / "budget_chunked.safetensors", trained["root"] / "budget_chunked.json"
    quantize.run(trained["ckpt"], out, replace(BASE, budget=budget),
                 replace(ZLIB, container="single", chunk_bytes=MIN_CHUNK_BYTES), trained["hess"], metrics, tokenized_dir)
    full = read_json(companion(metrics, "report", ".json"))  # the metrics row's report: per-tensor detail
    report = full["budget"]
    assert report["chunk_bytes"] == MIN_CHUNK_BYTES
    pack_metrics = trained["root"] / "pack_chunked.json"
    pack.run(out, tokenized_dir, trained["root"] / "chunked.pgolf",
             PackConfig(codec="zlib", limit=budget, container="single", chunk_bytes=MIN_CHUNK_BYTES), pack_metrics)
    packed = read_json(trained["root"] / "pack_chunked_report.json")
    assert packed["payload_chunks"] > 1 and packed["total_bytes"] == report["measured_bytes"] <= budget


def test_loss_objective_weighs_layer_errors_by_output_gradients(trained, tokenized_dir):
    """The default objective: each option's error is ½ Σ_r G_r δ_r H δ_rᵀ; a calibrate file without G is refused."""
    from pgolf.formats.files import save_tensors
    from pgolf.quant.encode import store_encoded
    from pgolf.quant.gptq import loss_error, weighted_error

    cfg = replace(BASE, budget_bits="3,6", budget_objective="loss")
    search = BudgetSearch(trained["state"], cfg, ZLIB, trained["hessians"], {"model_config": {"vocab_size": 512}},
                          None, trained["out_grads"])
    assert set(search.error_kind.values()) == {"loss"}
    ratios = []
    for name, opts in search.options.items():
        w, h, g = trained["state"][name], trained["hessians"][name], trained["out_grads"][name]
        for o in opts:
            tensors, schema = store_encoded({name: o.enc}, {name: w})
            w_hat = dequant.decode_entry(name, schema[name], tensors, "test")
            assert o.err == pytest.approx(loss_error(w, w_hat, h, g), rel=1e-12)
            ratios.append(o.err / weighted_error(w, w_hat, h))
    assert max(ratios) > 3 * min(ratios)  # G reweighs layers: not the layer error times one constant
    assert search.fit(search.measure(len(search.path))).report["objective"] == "loss"

    no_grads = trained["root"] / "hessians_only.safetensors"
    save_tensors(no_grads, trained["hessians"], "hessians", read_meta(trained["hess"], "hessians"))
    out = trained["root"] / "refused.safetensors"
    with pytest.raises(PgolfError, match=r"hessians_only.safetensors: holds no output-gradient moments.*budget_objective=layer"):
        quantize.run(trained["ckpt"], out, replace(cfg, budget=10**7), ZLIB, no_grads, trained["root"] / "r.json", None)
    assert not out.exists()
