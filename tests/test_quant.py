"""Quantization: error bounds, exact reproduction of the challenge's int8 export, the official format."""

from __future__ import annotations

import io
import zlib

import pytest
import torch

from conftest import assert_flat_metrics, assert_png
from pgolf.config.build import build
from pgolf.config.sections import CHALLENGE_LIMIT, PackConfig, QuantizeConfig
from pgolf.errors import PgolfError
from pgolf.formats import dequant
from pgolf.formats.files import save_tensors
from pgolf.formats.blob import read_capped
from pgolf.formats.official_int8 import official_int8_state_dict, read_official_int8
from pgolf.quant import grid
from pgolf.quant.recipe import quantize_state_dict


def dequantize(tensors, schema):
    return dequant.dequantize(tensors, schema, "test")


def official_int8_to_state_dict(path):
    return official_int8_state_dict(read_official_int8(read_capped(path, CHALLENGE_LIMIT), path, CHALLENGE_LIMIT),
                                    str(path))


def quantize_rtn_tensor(w, bits, clip="percentile", sdclip_k=12.85):
    return grid.quantize_rtn_tensor(w, bits, clip, 99.99984, sdclip_k)


def run_quantize(ckpt, out, cfg, hessians, metrics):
    from pgolf import quantize as stage

    stage.run(ckpt, out, cfg, PackConfig(), hessians, metrics, None)

CONTROL = ("attn_scale", "attn_scales", "mlp_scale", "mlp_scales", "resid_mix", "resid_mixes", "q_gain",
           "skip_weight", "skip_weights")
CLIP_Q = 0.9999984


def baseline_like_state_dict(seed: int = 0, dim: int = 256, vocab: int = 300, layers: int = 2) -> dict[str, torch.Tensor]:
    """Baseline parameter names at a small width, sized so that every rule fires: c_q is exactly 65,536
    elements (kept), MLP matrices and the bf16 embedding are quantized, and a few rows are large enough
    that the reference's 1/127 scale floor does not apply."""
    g = torch.Generator().manual_seed(seed)
    kv = dim // 2

    def w(*shape: int, std: float = 0.02) -> torch.Tensor:
        t = torch.randn(*shape, generator=g) * std
        if t.ndim == 2:
            t[::7] *= 80.0  # rows with clip > 1
            t[1, 3] = 5.0  # an outlier that the percentile clips
        return t

    sd: dict[str, torch.Tensor] = {"tok_emb.weight": w(vocab, dim, std=0.005).to(torch.bfloat16),
                                   "skip_weights": torch.ones(layers // 2, dim) + 0.1 * torch.randn(layers // 2, dim, generator=g)}
    for i in range(layers):
        p = f"blocks.{i}."
        sd.update({
            p + "attn.c_q.weight": w(dim, dim), p + "attn.c_k.weight": w(kv, dim), p + "attn.c_v.weight": w(kv, dim),
            p + "attn.proj.weight": w(dim, dim), p + "attn.q_gain": torch.full((8,), 1.5) + 0.01 * torch.randn(8, generator=g),
            p + "mlp.fc.weight": w(2 * dim, dim), p + "mlp.proj.weight": w(dim, 2 * dim),
            p + "attn_scale": torch.rand(dim, generator=g).to(torch.bfloat16), p + "mlp_scale": torch.rand(dim, generator=g),
            p + "resid_mix": torch.stack([torch.ones(dim), torch.zeros(dim)]) + 0.01 * torch.randn(2, dim, generator=g),
        })
    # Less common shapes the reference also handles: a long vector and a 3-D tensor (per-tensor scale),
    # a small fp16 tensor (kept as is), a small non-control fp32 matrix (fp16), an integer buffer.
    sd["extra.long_vector"] = torch.randn(70_000, generator=g) * 0.3
    sd["extra.cube"] = torch.randn(3, 150, 200, generator=g)
    sd["extra.small_half"] = torch.randn(10, 10, generator=g).half()
    sd["extra.small_matrix"] = torch.randn(16, 16, generator=g)
    sd["extra.counter"] = torch.arange(5, dtype=torch.int64)
    return sd


def reference_int8_export(sd: dict[str, torch.Tensor]) -> dict:
    """The challenge's export, written out from its stated formulas one row at a time (independent of pgolf.quant)."""
    obj = {"__quant_format__": "int8_clean_per_row_v1", "quantized": {}, "scales": {}, "dtypes": {},
           "passthrough": {}, "qmeta": {}, "passthrough_orig_dtypes": {}}
    for name, t in sd.items():
        if not t.is_floating_point():
            obj["passthrough"][name] = t
        elif t.numel() <= 65_536:
            if any(p in name for p in CONTROL):
                obj["passthrough"][name] = t.float()
            elif t.dtype in (torch.float32, torch.bfloat16):
                obj["passthrough_orig_dtypes"][name] = str(t.dtype)[len("torch."):]
                obj["passthrough"][name] = t.half()
            else:
                obj["passthrough"][name] = t
        else:
            x = t.float()
            obj["dtypes"][name] = str(t.dtype)[len("torch."):]
            if x.ndim == 2:
                codes, scales = [], []
                for row in x:
                    c = torch.quantile(row.abs(), CLIP_Q)
                    s = torch.maximum(c / 127.0, torch.tensor(1.0 / 127.0))
                    codes.append(torch.clamp(torch.round(torch.clamp(row, -c, c) / s), -127, 127).to(torch.int8))
                    scales.append(s)
                obj["quantized"][name] = torch.stack(codes)
                obj["scales"][name] = torch.stack(scales).half()
                obj["qmeta"][name] = {"scheme": "per_row", "axis": 0}
            else:
                c = float(torch.quantile(x.abs().flatten(), CLIP_Q))
                s = torch.tensor(c / 127.0 if c > 0 else 1.0, dtype=torch.float32)
                obj["quantized"][name] = torch.clamp(torch.round(torch.clamp(x, -c, c) / s), -127, 127).to(torch.int8)
                obj["scales"][name] = s
    return obj


def reference_dequantize(obj: dict) -> dict[str, torch.Tensor]:
    out = {}
    for name, q in obj["quantized"].items():
        s = obj["scales"][name].float()
        x = q.float() * (s[:, None] if s.ndim else s)
        out[name] = x.to(getattr(torch, obj["dtypes"][name]))
    for name, t in obj["passthrough"].items():
        orig = obj["passthrough_orig_dtypes"].get(name)
        out[name] = t.to(getattr(torch, orig)) if orig else t
    return out


def write_ptz(path, obj: dict) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    path.write_bytes(zlib.compress(buf.getvalue(), 9))


def assert_identical(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    assert a.dtype == b.dtype, f"{what}: dtype {a.dtype} != {b.dtype}"
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.equal(a, b), f"{what}: values differ (max {float((a.double() - b.double()).abs().max())})"


def assert_same_values(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Equal values, dtypes aside: the reference hands bf16 control tensors back as fp32 (it records no
    dtype for them), pgolf restores their own dtype; the fp32 → bf16 cast of a value that was bf16 is exact."""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    assert torch.equal(a.double(), b.double()), f"{what}: values differ"


# ---------------------------------------------------------------------------------------------------

def test_int8_reproduces_reference_export_exactly():
    sd = baseline_like_state_dict()
    ref = reference_int8_export(sd)
    tensors, schema, report = quantize_state_dict(sd, QuantizeConfig())

    assert set(schema) == set(sd)
    for name, q in ref["quantized"].items():
        assert_identical(tensors[f"{name}#codes"], q, f"{name} codes")
        assert_identical(tensors[f"{name}#scales"], ref["scales"][name], f"{name} scales")
        assert schema[name]["scheme"] == ("per_row" if q.ndim == 2 else "per_tensor")
    for name, kept in ref["passthrough"].items():
        assert_identical(tensors[name], kept, f"{name} kept")
    # The rules all fired: c_q (exactly 65,536 elements) kept fp16, controls fp32, embedding quantized.
    assert tensors["blocks.0.attn.c_q.weight"].dtype == torch.float16
    assert tensors["blocks.0.attn_scale"].dtype == torch.float32
    assert tensors["skip_weights"].dtype == torch.float32
    assert tensors["tok_emb.weight#scales"].dtype == torch.float16
    assert tensors["extra.cube#scales"].dtype == torch.float32 and tensors["extra.cube#scales"].numel() == 1

    restored = dequantize(tensors, schema)
    expected = reference_dequantize(ref)
    for name in sd:
        assert_same_values(restored[name], expected[name], f"{name} dequantized")
        assert restored[name].dtype == sd[name].dtype, name  # every tensor comes back in its own dtype
    assert restored["tok_emb.weight"].dtype == torch.bfloat16  # the embedding trained on CUDA comes back bf16
    assert restored["extra.small_matrix"].dtype == torch.float32  # stored fp16, restored to its fp32
    assert report["totals"]["quantized_tensors"] == len(ref["quantized"])


def test_int8_error_bounds():
    sd = baseline_like_state_dict(seed=1)
    tensors, schema, report = quantize_state_dict(sd, QuantizeConfig())
    restored = dequantize(tensors, schema)
    checked = 0
    for name, entry in schema.items():
        if entry["scheme"] != "per_row":
            continue
        w, w_hat = sd[name].float(), restored[name].float()
        s = tensors[f"{name}#scales"].float()[:, None]
        clip = torch.quantile(w.abs(), CLIP_Q, dim=1)[:, None]
        inside = w.abs() <= clip
        # Codes are rounded with the fp32 scale and stored with the fp16 one: up to 127 codes × one
        # fp16 rounding (2^-11 relative) on top of the half step.
        # Plus the rounding of the cast back to the original dtype (bf16 for the embedding).
        bound = s * (0.5 + 127 * 2.0 ** -10) + torch.finfo(sd[name].dtype).eps * w_hat.abs()
        err = (w - w_hat).abs()
        assert bool((err[inside] <= bound.expand_as(w)[inside]).all()), name
        assert bool((w_hat.abs() <= (clip * (1 + 2.0 ** -7) + s / 2)).all()), name
        if bool((~inside).any()):
            assert bool((err[~inside] >= (w.abs() - clip)[~inside] - bound.expand_as(w)[~inside]).all())
        checked += 1
    assert checked >= 5
    assert report["totals"]["max_abs_err"] > 0
    row = next(r for r in report["tensors"] if r["name"] == "blocks.0.mlp.fc.weight")
    diff = (sd["blocks.0.mlp.fc.weight"] - restored["blocks.0.mlp.fc.weight"]).double()
    assert row["max_abs_err"] == pytest.approx(float(diff.abs().max()))
    assert row["rmse"] == pytest.approx(float(diff.pow(2).mean().sqrt()))


@pytest.mark.parametrize("bits", [2, 4, 6, 7])
def test_lower_bits_half_step_bound(bits):
    w = torch.randn(64, 2048) * 0.02
    q, s, scheme = quantize_rtn_tensor(w, bits)
    assert scheme == "per_row" and s.dtype == torch.float16
    R = 2 ** (bits - 1) - 1
    assert int(q.abs().max()) <= R
    clip = torch.quantile(w.abs(), CLIP_Q, dim=1)[:, None]
    w_hat = q.float() * s.float()[:, None]
    inside = w.abs() <= clip
    err = (w - w_hat).abs()
    assert bool((err[inside] <= (s.float()[:, None] / 2 * (1 + 1e-6)).expand_as(w)[inside]).all())


def test_lower_bits_have_larger_error():
    sd = {"m.weight": torch.randn(256, 512)}
    for clip in ("percentile", "sdclip"):
        errors = []
        for bits in range(2, 9):
            _, _, report = quantize_state_dict(sd, QuantizeConfig(bits=bits, clip=clip))
            errors.append(report["totals"]["quantized_rmse"])
        assert all(a > b for a, b in zip(errors, errors[1:])), (clip, errors)


def test_zero_rows_and_tiny_rows_survive_low_bits():
    w = torch.randn(8, 20_000) * 1e-3
    w[0] = 0.0
    q, s, _ = quantize_rtn_tensor(w, 3)
    assert bool(torch.isfinite(s.float()).all()) and float(s.float().min()) > 0
    w_hat = q.float() * s.float()[:, None]
    assert bool((w_hat[0] == 0).all())
    # No 1/R floor below 8 bits: small weights keep their resolution.
    assert float((w - w_hat)[1:].abs().max()) < 1e-3


def test_sdclip_saturates_beyond_k_std():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(32, 4096, generator=g)
    w[:, :8] = 40.0  # far beyond k·std
    k, bits = 3.0, 6
    q, s, _ = quantize_rtn_tensor(w, bits, clip="sdclip", sdclip_k=k)
    R = 2 ** (bits - 1) - 1
    c = k * w.std(dim=1)
    assert torch.allclose(s.float(), (c / R).half().float())
    assert bool((q[:, :8] == R).all())  # saturated at the top code
    w_hat = q.float() * s.float()[:, None]
    assert bool((w_hat.abs() <= c[:, None] * (1 + 2.0 ** -10)).all())
    inside = w.abs() <= c[:, None]
    assert bool(((w - w_hat).abs()[inside] <= (s.float()[:, None] / 2 * (1 + 1e-6)).expand_as(w)[inside]).all())


def test_schema_makes_file_self_describing(tmp_path):
    from safetensors.torch import load_file

    sd = baseline_like_state_dict(seed=4, layers=2)
    tensors, schema, _ = quantize_state_dict(sd, QuantizeConfig(bits=6))
    path = tmp_path / "q.safetensors"
    save_tensors(path, tensors, "quantized", {"schema": schema})
    from pgolf.formats.files import read_meta

    restored = dequantize(load_file(str(path)), read_meta(path, "quantized")["schema"])
    direct = dequantize(tensors, schema)
    for name in sd:
        assert_identical(restored[name], direct[name], name)
        assert restored[name].shape == sd[name].shape and restored[name].dtype == sd[name].dtype
    entry = schema["blocks.0.mlp.fc.weight"]
    assert entry["method"] == "rtn" and entry["bits"] == 6 and entry["clip"]["kind"] == "percentile"


def test_dequantize_rejects_bad_schema():
    sd = {"m.weight": torch.randn(300, 300)}
    tensors, schema, _ = quantize_state_dict(sd, QuantizeConfig())
    with pytest.raises(PgolfError, match="unknown encoding"):
        dequantize(tensors, {"m.weight": {**schema["m.weight"], "encoding": "magic"}})
    with pytest.raises(PgolfError, match="missing"):
        dequantize({}, schema)
    with pytest.raises(PgolfError, match="dtype"):
        dequantize(tensors, {"m.weight": {**schema["m.weight"], "dtype": "os.system"}})
    with pytest.raises(PgolfError, match="do not fit"):
        dequantize({**tensors, "m.weight#scales": tensors["m.weight#scales"][:5]}, schema)


@pytest.mark.parametrize("bad", [{"bits": 1}, {"bits": 9}, {"method": "magic"}, {"clip": "max"},
                                 {"clip_percentile": 0.0}, {"sdclip_k": -1.0}])
def test_bad_params_rejected(bad):
    with pytest.raises(PgolfError, match=f"quantize.{next(iter(bad))}="):
        build(QuantizeConfig, [(bad, "params.yaml")], "quantize")


def test_quantize_stage_rejects_nan_checkpoint(tmp_path):
    sd = baseline_like_state_dict(seed=5, layers=2)
    sd["blocks.1.mlp.fc.weight"][3, 3] = float("nan")
    ckpt = tmp_path / "ckpt.safetensors"
    save_tensors(ckpt, sd, "checkpoint", {"model_config": {}, "tokenizer_sha256": "x"})
    out = tmp_path / "quantized.safetensors"
    with pytest.raises(PgolfError, match="NaN"):
        run_quantize(ckpt, out, QuantizeConfig(), None, tmp_path / "m.json")
    assert not out.exists()


def test_quantize_stage_and_hessian_check(tmp_path, capsys):
    from pgolf.formats.files import read_json, read_meta, sha256_file

    sd = baseline_like_state_dict(seed=6, layers=2)
    ckpt = tmp_path / "ckpt.safetensors"
    save_tensors(ckpt, sd, "checkpoint", {"model_config": {"vocab_size": 300}, "tokenizer_sha256": "abc"})
    out, metrics = tmp_path / "quantized.safetensors", tmp_path / "quantize_metrics.json"
    hess = tmp_path / "hessians.safetensors"
    save_tensors(hess, {"h": torch.eye(4)}, "hessians", {"inputs": {"checkpoint": sha256_file(ckpt)}})
    run_quantize(ckpt, out, QuantizeConfig(bits=6), hess, metrics)
    meta = read_meta(out, "quantized")
    assert meta["inputs"] == {"checkpoint": sha256_file(ckpt), "hessians": sha256_file(hess)}
    assert meta["tokenizer_sha256"] == "abc" and meta["model_config"] == {"vocab_size": 300}
    assert meta["params"]["bits"] == 6 and set(meta["schema"]) == set(sd)
    assert "does not use Hessians" in capsys.readouterr().out
    rep = read_json(tmp_path / "quantize_report.json")  # the full record: params, per-tensor rows, totals
    assert rep["totals"]["quantized_tensors"] == sum(1 for e in meta["schema"].values() if e["method"] == "rtn")
    assert rep["params"]["bits"] == 6 and len(rep["tensors"]) == len(sd)
    row = assert_flat_metrics(metrics)  # the metrics file: a table row
    assert row["bytes"] == rep["totals"]["stored_bytes"] and row["seconds"] >= 0
    assert_png(tmp_path / "quantize_bits.png")  # bits and bytes per tensor

    other = tmp_path / "other.safetensors"
    save_tensors(other, {"h": torch.eye(4)}, "hessians", {"inputs": {"checkpoint": "0" * 64}})
    with pytest.raises(PgolfError, match="calibrated on checkpoint"):
        run_quantize(ckpt, tmp_path / "q2.safetensors", QuantizeConfig(), other, metrics)
    with pytest.raises(PgolfError, match="expected a 'hessians'"):
        run_quantize(ckpt, tmp_path / "q2.safetensors", QuantizeConfig(), ckpt, metrics)
    with pytest.raises(PgolfError, match="not found"):
        run_quantize(ckpt, tmp_path / "q2.safetensors", QuantizeConfig(), tmp_path / "missing.safetensors", metrics)
    assert not (tmp_path / "q2.safetensors").exists()


# ---------------------------------------------------------------------------------------------------
# The challenge's final_model.int8.ptz

def test_official_int8_roundtrip(tmp_path):
    sd = baseline_like_state_dict(seed=7)
    ref = reference_int8_export(sd)
    path = tmp_path / "final_model.int8.ptz"
    write_ptz(path, ref)
    loaded = official_int8_to_state_dict(path)
    expected = reference_dequantize(ref)
    ours = dequantize(*quantize_state_dict(sd, QuantizeConfig())[:2])
    assert set(loaded) == set(sd)
    for name in sd:
        assert_identical(loaded[name], expected[name], name)
        assert_same_values(loaded[name], ours[name], name)


def test_official_int8_without_optional_keys(tmp_path):
    sd = {"tok_emb.weight": torch.randn(300, 256), "blocks.0.attn_scale": torch.rand(256)}
    ref = reference_int8_export(sd)
    del ref["qmeta"], ref["passthrough_orig_dtypes"]
    path = tmp_path / "final_model.int8.ptz"
    write_ptz(path, ref)
    loaded = official_int8_to_state_dict(path)
    assert_identical(loaded["tok_emb.weight"], reference_dequantize({**ref, "passthrough_orig_dtypes": {}})["tok_emb.weight"], "emb")


def test_official_int8_rejects_foreign_files(tmp_path):
    not_zlib = tmp_path / "a.ptz"
    not_zlib.write_bytes(b"definitely not zlib data" * 10)
    with pytest.raises(PgolfError, match="not a challenge int8 artifact"):
        official_int8_to_state_dict(not_zlib)

    plain = tmp_path / "b.ptz"
    buf = io.BytesIO()
    torch.save({"weights": torch.zeros(3)}, buf)
    plain.write_bytes(zlib.compress(buf.getvalue()))
    with pytest.raises(PgolfError, match="__quant_format__"):
        official_int8_to_state_dict(plain)

    other = tmp_path / "c.ptz"
    write_ptz(other, {"__quant_format__": "int4_magic_v9", "quantized": {}, "scales": {}, "dtypes": {}, "passthrough": {}})
    with pytest.raises(PgolfError, match="int4_magic_v9"):
        official_int8_to_state_dict(other)

    class Evil:  # a pickle that would run code; weights_only must refuse it
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "d.ptz"
    buf = io.BytesIO()
    torch.save({"__quant_format__": "int8_clean_per_row_v1", "x": Evil()}, buf)
    evil.write_bytes(zlib.compress(buf.getvalue()))
    with pytest.raises(PgolfError, match="weights_only"):
        official_int8_to_state_dict(evil)

    text = tmp_path / "e.ptz"
    text.write_bytes(zlib.compress(b"hello world"))
    with pytest.raises(PgolfError, match="weights_only"):
        official_int8_to_state_dict(text)
