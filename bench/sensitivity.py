"""Does --budget's error proxy rank tensors by what they cost? Single-tensor downgrades, measured.

    python bench/sensitivity.py CKPT HESSIANS QUANTIZED DATA OUT.json [--bits 4] [--val-seqs 128]

Starts from the quantized recipe (QUANTIZED, dequantized), and for each quantized tensor in turn puts
that tensor alone at --bits (GPTQ, the recipe's clip, no LQER), then measures the mean validation loss
on the first --val-seqs sequences of 2,048 tokens (the same tokens for every tensor). The measured
increase over the recipe is compared with each proxy's predicted increase:
  layer: trace(δ H δᵀ) (the old --budget objective), loss: ½ Σ_r G_r δ_r H δ_rᵀ (the new one),
by Spearman rank correlation over the tensors. ΔBPB is Δloss / ln 2 × tokens per byte of the slice.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pgolf.config.build import build_section
from pgolf.config.sections import ModelConfig, QuantizeConfig
from pgolf.formats.dequant import decode_entry, dequantize
from pgolf.formats.files import load_tensors
from pgolf.formats.shards import load_val
from pgolf.nn.model import autocast_for, build_model, prepare_for_device
from pgolf.quant.calibration import split_statistics
from pgolf.quant.encode import encode_tensor, store_encoded
from pgolf.quant.gptq import loss_error, weighted_error


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser()
    for name in ("ckpt", "hessians", "quantized", "data", "out"):
        ap.add_argument(name, type=Path)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--val-seqs", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=2048)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state, meta = load_tensors(args.ckpt, "checkpoint")
    hessians, grads = split_statistics(load_tensors(args.hessians, "hessians")[0])
    qtensors, qmeta = load_tensors(args.quantized, "quantized")
    schema = qmeta["schema"]
    cfg = build_section(QuantizeConfig, qmeta["params"], "quantized params")
    recipe = dequantize(qtensors, schema, str(args.quantized))
    model_cfg = build_section(ModelConfig, meta["model_config"], "model config")
    model = prepare_for_device(build_model(model_cfg, recipe, "cpu"), device).eval()
    tokens, byte_counts = load_val(args.data)
    seq = args.seq_len
    n = min(args.val_seqs, (len(tokens) - 1) // seq)
    x = torch.from_numpy(tokens[:n * seq].astype(np.int64)).view(n, seq).to(device)
    y = torch.from_numpy(tokens[1:n * seq + 1].astype(np.int64)).view(n, seq).to(device)
    n_bytes = int(byte_counts[1:n * seq + 1].sum()) if byte_counts is not None else None

    @torch.no_grad()
    def mean_loss() -> float:
        total = 0.0
        for i in range(0, n, 16):
            with autocast_for(device):
                logits = model.logits(x[i:i + 16])
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                                             y[i:i + 16].reshape(-1), reduction="sum"))
        return total / (n * seq)

    params = dict(model.named_parameters())
    base = mean_loss()
    free = replace(cfg, embed_bits=0, attn_bits=0, mlp_bits=0, lqer_top_k=0, bits=args.bits)
    rows = []
    t0 = time.time()
    for name, entry in schema.items():
        if entry["encoding"] == "float" or name not in hessians or name not in params:
            continue
        w, h, g = state[name].float(), hessians[name], grads.get(name)
        enc = encode_tensor(name, state[name], free, h)
        tensors, sch = store_encoded({name: enc}, {name: state[name]})
        low = decode_entry(name, sch[name], tensors, "sensitivity").float()
        kept = recipe[name].float()
        param = params[name]
        old = param.data.clone()
        param.data.copy_(low.to(param.dtype))
        measured = mean_loss() - base
        param.data.copy_(old)
        rows.append({"tensor": name, "recipe_bits": entry.get("bits"), "measured_dloss": measured,
                     "layer_dproxy": weighted_error(w, low, h) - weighted_error(w, kept, h),
                     "loss_dproxy": (loss_error(w, low, h, g) - loss_error(w, kept, h, g)) if g is not None else None})
        print(f"{name}: Δloss {measured:+.5f} nats, predicted layer {rows[-1]['layer_dproxy']:.4g} "
              f"loss {rows[-1]['loss_dproxy']:.4g}", flush=True)
    measured = [r["measured_dloss"] for r in rows]
    to_bpb = (n * seq) / (math.log(2) * n_bytes) if n_bytes else None
    result = {
        "bits": args.bits, "val_tokens": n * seq, "val_bytes": n_bytes, "recipe_loss": base,
        "tensors": len(rows), "seconds": round(time.time() - t0, 1),
        "spearman_layer": spearman([r["layer_dproxy"] for r in rows], measured),
        "spearman_loss": spearman([r["loss_dproxy"] for r in rows], measured) if all(
            r["loss_dproxy"] is not None for r in rows) else None,
        "nats_to_bpb": to_bpb, "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))


if __name__ == "__main__":
    main()
