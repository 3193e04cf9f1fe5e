"""ttt-eval: model.pgolf + validation shards → BPB (ttt_eval_metrics.json).

Scores the decoded blob, never the checkpoint, so the number is the artifact's. Reading is
pgolf.formats (blob, dequant), scoring pgolf.ttt.modes (plain, or with test-time training). This module's
import closure is the decode path whose bytes a submission counts (pgolf.formats.code), so it imports
nothing it does not need.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from pgolf.config.sections import CHALLENGE_LIMIT, EvalConfig
from pgolf.formats.blob import decode_payload, open_blob
from pgolf.formats.blob_model import model_config
from pgolf.formats.dequant import dequantize
from pgolf.formats.files import sha256_file
from pgolf.formats.submission import check_data_matches
from pgolf.nn.distributed import Dist
from pgolf.report.metrics import write_metrics
from pgolf.ttt.modes import score_weights


def run(blob: Path, data: Path, cfg: EvalConfig, metrics: Path) -> None:
    t0 = time.perf_counter()
    # Everything the header says is checked, the model config against the schema too, before the payload
    # is decoded; ttt-eval scores any blob its reading bounds allow (the size verdict is pack's and verify's).
    header, payload = open_blob(blob, CHALLENGE_LIMIT)
    model_cfg = model_config(header, blob)
    check_data_matches(Path(data), header["tokenizer_sha256"], model_cfg.vocab_size, str(blob))
    state_dict = dequantize(decode_payload(header, payload, blob), header["schema"], str(blob))
    decode_s = time.perf_counter() - t0
    ranks = Dist(cfg.device)  # under torchrun the ranks share the windows or documents
    try:
        result = score_weights(state_dict, model_cfg, data, cfg, ranks)
    finally:
        ranks.close()
    if not ranks.main:
        return
    result.update({
        "blob": str(blob),
        "blob_sha256": sha256_file(blob),
        "eval": asdict(cfg),  # every setting, TTT's included: `pgolf verify --claims` re-scores with them
        "decode_seconds": round(decode_s, 2),
    })
    # the row holds the window settings too (verify reads them from either file; the TTT mode, its settings
    # and `compliant` are in the report, which keeps `dvc metrics show` to a terminal's width)
    row = {"val_bpb": result["val_bpb"], "seq_len": cfg.seq_len, "stride": cfg.stride, "val_tokens": cfg.val_tokens,
           "seconds": round(time.perf_counter() - t0, 1)}
    if not result["compliant"]:  # shown where `dvc metrics show` puts the score (kept narrow otherwise)
        row["compliant"] = False
    if cfg.ngram_mix != "none":  # the score is the LM's mixture with an n-gram model, not the LM's alone
        row["ngram_mix"] = cfg.ngram_mix
    write_metrics(metrics, row, result)
    sidecar = result.get("val_bpb_sidecar")
    before = f"; {result['val_bpb_before_ttt']:.4f} before {cfg.ttt} TTT" if cfg.ttt != "none" else ""
    print(f"ttt-eval: val_bpb {result['val_bpb']:.4f} (LUT {result['val_bpb_lut']:.4f}"
          + (f", sidecar {sidecar:.4f}" if sidecar is not None else "") + f") over {result['tokens_scored']:,} tokens"
          + before + (f"; LM mixed with an order-{cfg.ngram_order} n-gram ({cfg.ngram_mix})" if cfg.ngram_mix != "none"
                      else ""))
    if not result["compliant"]:
        print(f"ttt-eval: NOT A VALID SCORE: {cfg.ttt}: {result['ttt']['noncompliance']}; verify refuses it")
