"""tokenize: documents (or existing challenge shards) → shards, byte sidecar, tokenizer, manifest, metrics.

The building blocks are pgolf.text.dataset (documents mode and ingest mode); this stage picks the mode,
reports and writes the metrics (a row for `dvc metrics show`, the split counts in the report beside it).
"""

from __future__ import annotations

import time
from pathlib import Path

from pgolf.config.sections import TokenizeConfig
from pgolf.report.metrics import write_metrics
from pgolf.text.dataset import ingest, is_shard_directory, tokenize_documents


def run(inputs: list[Path], out: Path, cfg: TokenizeConfig, tokenizer: Path | None, metrics: Path) -> None:
    t0 = time.time()
    inputs = [Path(p) for p in inputs]
    out = Path(out)
    if is_shard_directory(inputs):
        manifest = ingest(inputs[0], out, tokenizer, cfg.caseops)
    else:
        manifest = tokenize_documents(inputs, out, cfg, tokenizer)
    train, val = manifest["splits"]["train"], manifest["splits"]["val"]
    print(f"tokenize: {out}: vocab {manifest['vocab_size']}, train {train['docs']:,} docs / {train['tokens']:,} "
          f"tokens, val {val['docs']:,} docs / {val['tokens']:,} tokens")
    val_bytes = val["sidecar_bytes"] if val["sidecar_bytes"] is not None else val["lut_bytes"]
    detail = {
        "mode": manifest["mode"],
        "caseops": manifest["caseops"],
        "vocab_size": manifest["vocab_size"],
        "train_docs": train["docs"], "train_tokens": train["tokens"],
        "val_docs": val["docs"], "val_tokens": val["tokens"],
        "val_bytes": val_bytes,
        "val_bytes_per_token": val_bytes / max(val["tokens"], 1),  # BOS included: every target is scored
        "val_lut_bytes": val["lut_bytes"],
        "seconds": round(time.time() - t0, 3),
    }
    row = {"tokens": train["tokens"], "val_tokens": val["tokens"], "seconds": round(detail["seconds"], 1)}
    write_metrics(metrics, row, detail)  # the row: training tokens, validation tokens, time
