"""Blob compression as one stream vs in independent chunks (pack.chunk_bytes), on a 36 M-param payload:
    python bench/chunk_bench.py [--out results.json]
The `pr2071` model at its random initialisation (seed 0, vocab 8192), int6 RTN with SDClip k 12.85, packed
with brotli-11 whole and in 2 and 4 MiB chunks. Random-init codes stand in for a trained checkpoint's
(none is at hand off the GPU machines), so the size difference is indicative only; times are the
machine's own (chunks run on all its cores).
"""

import argparse
import json
import os
import time

import torch

from pgolf.config.resolve import resolve
from pgolf.config.sections import ModelConfig, QuantizeConfig
from pgolf.formats.blob_writer import build_blob, encode_payload
from pgolf.nn.model import GPT
from pgolf.quant.recipe import quantize_state_dict


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = resolve("train", None, {"preset": "pr2071"}).model
    state = GPT(ModelConfig(**{**cfg.__dict__, "vocab_size": 8192})).state_dict()
    tensors, schema, _ = quantize_state_dict(state, QuantizeConfig(bits=6, clip="sdclip", sdclip_k=12.85, device="cpu"))
    raw, _ = encode_payload(tensors)
    out = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu_count": os.cpu_count(),
           "params": sum(v.numel() for v in state.values()), "raw_bytes": len(raw), "codec": "brotli", "runs": {}}
    for chunk_bytes in (0, 1 << 21, 1 << 22):
        t0 = time.perf_counter()
        _, header, _ = build_blob(tensors, {"schema": schema}, "brotli", chunk_bytes, "single", False)
        run = {"payload_bytes": header["payload"]["compressed_bytes"],
               "chunks": len(header["payload"].get("chunks") or [None]), "seconds": round(time.perf_counter() - t0, 1)}
        out["runs"][str(chunk_bytes)] = run
        print(f"chunk_bytes {chunk_bytes:>9,}: {run}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
