"""calibrate: ckpt.safetensors (+ training shards) → hessians.safetensors, calibrate_metrics.json.

For every linear weight W (out × in) it stores H = E[x xᵀ] (in × in, float32) of the inputs x that W
multiplies, and (calibrate.output_grads) G = E[(∂L/∂y)²] (out, float32) of its outputs y = W x, as
`name#out_grad_sq` (pgolf.quant.calibration). GPTQ reads H to weigh quantization error; `quantize
--budget` reads both to weigh it by the loss it costs.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

from pgolf.config.build import build_section
from pgolf.config.sections import CalibrateConfig, ModelConfig
from pgolf.errors import PgolfError
from pgolf.formats.files import load_tensors, save_tensors, sha256_file
from pgolf.formats.submission import check_data_matches
from pgolf.nn.distributed import Dist
from pgolf.nn.model import build_model
from pgolf.quant.calibration import GRAD_SUFFIX, calibration_batches, collect_statistics
from pgolf.report.metrics import write_metrics
from pgolf.report.progress import Bar


def run(ckpt: Path, data: Path, out: Path, cfg: CalibrateConfig, metrics: Path) -> None:
    t0 = time.perf_counter()
    state, meta = load_tensors(ckpt, "checkpoint")
    model_cfg = build_section(ModelConfig, meta.get("model_config"), f"{ckpt}: model config")
    if cfg.source == "train":  # self-generated text reads no data
        check_data_matches(Path(data), meta.get("tokenizer_sha256"), model_cfg.vocab_size, str(ckpt))
    d = Dist(cfg.device)
    try:
        if cfg.n_batches < d.world:
            raise PgolfError(f"calibrate params: n_batches={cfg.n_batches} is fewer than the {d.world} ranks; "
                             "give every rank at least one batch")
        model = build_model(model_cfg, state, d.device)
        share = (cfg.n_batches - d.rank + d.world - 1) // d.world
        with Bar(f"calibrate ({cfg.source})", share, "batches", enabled=d.main) as bar:
            stats, n_tokens = collect_statistics(model, bar.track(calibration_batches(cfg, model, Path(data), d)), d,
                                                 cfg.output_grads)
    finally:
        d.close()
    if not d.main:
        return
    save_tensors(out, stats, "hessians", {
        "model_config": asdict(model_cfg),
        "params": asdict(cfg),
        "inputs": {"checkpoint": sha256_file(ckpt)},
        "tokenizer_sha256": meta.get("tokenizer_sha256"),
        "tokens": n_tokens,
        "world_size": d.world,
    })
    seconds = time.perf_counter() - t0
    n_grads = sum(k.endswith(GRAD_SUFFIX) for k in stats)
    write_metrics(metrics, {"tokens": n_tokens, "seconds": round(seconds, 1)},
                  {"source": cfg.source, "tensors": len(stats) - n_grads, "output_grads": n_grads, "tokens": n_tokens,
                   "seconds": round(seconds, 2), "world_size": d.world})
    grads = f" and {n_grads} output-gradient moments" if n_grads else ""
    print(f"calibrate: {len(stats) - n_grads} Hessians{grads} from {n_tokens:,} {cfg.source} tokens in {seconds:.1f}s, "
          f"wrote {out}")
