"""ttt-eval: model.pgolf + validation shards → BPB (ttt_eval_metrics.json).

Scores the decoded blob, never the checkpoint, so the number is the artifact's. Reading is
pgolf.formats (blob, dequant), scoring pgolf.text.evaluate. This module's import closure is the decode
path whose bytes a submission counts (pgolf.formats.code), so it imports nothing it does not need.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from pgolf.config.build import build_section
from pgolf.config.sections import EvalConfig, ModelConfig
from pgolf.errors import PgolfError
from pgolf.formats.blob import read_blob
from pgolf.formats.dequant import dequantize
from pgolf.formats.files import read_json, sha256_file, write_json
from pgolf.text.evaluate import evaluate_state_dict


def run(blob: Path, data: Path, cfg: EvalConfig, metrics: Path) -> None:
    t0 = time.perf_counter()
    header, tensors = read_blob(blob)
    manifest_path = Path(data) / "manifest.json"
    manifest = read_json(manifest_path, "tokenized-data manifest")
    if header.get("tokenizer_sha256") != manifest.get("tokenizer_sha256"):
        raise PgolfError(f"{blob} was made for tokenizer {str(header.get('tokenizer_sha256'))[:12]}…, but {manifest_path} "
                         f"uses {str(manifest.get('tokenizer_sha256'))[:12]}…; evaluate on the data it was trained for")
    state_dict = dequantize(tensors, header.get("schema"), str(blob))
    model_cfg = build_section(ModelConfig, header.get("model_config"), f"{blob}: model config")
    decode_s = time.perf_counter() - t0
    result = evaluate_state_dict(state_dict, model_cfg, data, cfg)
    result.update({
        "blob": str(blob),
        "blob_sha256": sha256_file(blob),
        "eval": asdict(cfg),
        "ttt": None,  # test-time training arrives with its own issue
        "decode_seconds": round(decode_s, 2),
        "eval_seconds": round(time.perf_counter() - t0 - decode_s, 2),
    })
    write_json(metrics, result)
    sidecar = result.get("val_bpb_sidecar")
    print(f"ttt-eval: val_bpb {result['val_bpb']:.4f} (LUT {result['val_bpb_lut']:.4f}"
          + (f", sidecar {sidecar:.4f}" if sidecar is not None else "") + f") over {result['tokens_scored']:,} tokens")
