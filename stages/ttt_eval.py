"""ttt-eval: model.pgolf + validation shards → BPB (ttt_eval_metrics.json).

Scores the decoded blob, never the checkpoint, so the number is the artifact's. Windows are planned
by bpb.plan_windows (each target scored exactly once, causally, over the full softmax); bytes are the
canonical sidecar's when present, and the tokenizer-LUT bytes are reported beside them. CaseOps data
(case-transformed text, stages.caseops) must have the sidecar: its LUT bytes are not the original
text's bytes, so without one it is refused rather than scored with a wrong denominator.
Test-time training will plug in here: score a chunk first, then adapt on it.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from . import bpb
from .artifacts import PgolfError, read_json, sha256_file, write_json
from .config import EvalConfig, ModelConfig, resolve_device
from .model import GPT, build_model
from .shards import load_val


@dataclass
class EvalData:
    """Validation tokens, their canonical byte counts (if any), and the tokenizer's byte LUTs."""

    tokens: np.ndarray
    sidecar: np.ndarray | None
    luts: tuple
    manifest: dict
    data_dir: Path

    @classmethod
    def load(cls, data_dir: str | Path) -> "EvalData":
        from .tokenizer import load_tokenizer

        data_dir = Path(data_dir)
        manifest = read_json(data_dir / "manifest.json", "tokenized-data manifest")
        sp = load_tokenizer(data_dir / manifest.get("tokenizer", "tokenizer.model"))
        tokens, sidecar = load_val(data_dir)
        # Tokens of transformed text (CaseOps): the LUT counts transformed bytes, not the original's.
        if sidecar is None and (manifest.get("caseops") or manifest.get("text_transform")):
            raise PgolfError(f"{data_dir}: CaseOps data without the byte sidecar (fineweb_val_bytes_*.bin); its BPB "
                             "can only be measured in original bytes, which the tokenizer LUT does not give: "
                             "re-run `pgolf tokenize --caseops` to write the sidecar")
        return cls(tokens, sidecar, bpb.build_luts(sp, int(manifest["vocab_size"])), manifest, data_dir)


def evaluate_model(model: GPT, data: EvalData, cfg: EvalConfig, progress: bool = True) -> dict:
    """Score `model` on the validation stream as `cfg` says; returns the BPB accounting."""
    device = next(model.parameters()).device
    if model.cfg.vocab_size != int(data.manifest["vocab_size"]):
        raise PgolfError(f"model vocab {model.cfg.vocab_size} != the data's {data.manifest['vocab_size']} "
                         f"({data.data_dir}); evaluate on the data the model was trained for")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    was_training = model.training
    model.eval()

    def logits_fn(x: torch.Tensor) -> torch.Tensor:
        with autocast():
            return model.logits(x)

    try:
        with torch.inference_mode():
            return bpb.score(logits_fn, data.tokens, data.sidecar, data.luts, seq_len=cfg.seq_len,
                             stride=cfg.stride, val_tokens=cfg.val_tokens, batch_seqs=cfg.batch_seqs,
                             device=device, progress=progress)
    finally:
        model.train(was_training)


TTT_MODES = ("none", "score_first", "phased_lora")


def check_ttt(cfg: EvalConfig) -> None:
    """Refuse a TTT mode this version cannot run, rather than report a score made without it."""
    if cfg.ttt not in TTT_MODES:
        raise PgolfError(f"ttt_eval.ttt={cfg.ttt!r}; choose one of {', '.join(TTT_MODES)}")
    if cfg.ttt != "none":
        raise PgolfError(f"ttt_eval.ttt={cfg.ttt!r}: test-time training is not implemented in this version of pgolf "
                         "(its settings are recorded for when it is); score without it with --set ttt=none")


def evaluate_state_dict(state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, data: str | Path,
                        eval_cfg: EvalConfig, progress: bool = True) -> dict:
    """Build the model from plain weights and score it (used by verify and ttt-eval)."""
    check_ttt(eval_cfg)
    device = resolve_device(eval_cfg.device)
    try:
        model = build_model(model_cfg, state_dict, device)
    except ValueError as exc:
        raise PgolfError(f"the weights do not match their model config: {exc}") from None
    return evaluate_model(model, EvalData.load(data), eval_cfg, progress=progress)


def run(blob: Path, data: Path, cfg: EvalConfig, metrics: Path) -> None:
    from .blob import read_blob
    from .quant import dequantize

    t0 = time.perf_counter()
    header, tensors = read_blob(blob)
    manifest_path = Path(data) / "manifest.json"
    manifest = read_json(manifest_path, "tokenized-data manifest")
    if header.get("tokenizer_sha256") != manifest.get("tokenizer_sha256"):
        raise PgolfError(f"{blob} was made for tokenizer {str(header.get('tokenizer_sha256'))[:12]}…, but {manifest_path} "
                         f"uses {str(manifest.get('tokenizer_sha256'))[:12]}…; evaluate on the data it was trained for")
    state_dict = dequantize(tensors, header["schema"])
    model_cfg = ModelConfig(**header["model_config"])
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
