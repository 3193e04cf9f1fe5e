"""What ttt-eval and verify score: a model built from plain (dequantized) weights, with or without
test-time training, through the one scoring path.

Each mode is a function (model, ledger, eval config, device, deadline) → what it did; the ledger holds
the scores. `none` scores every window with the model as it is; `score_first` adapts the whole model on
each chunk once it is scored; `lora` adapts per-document adapters on each chunk of a document once it is
scored. Every mode runs on the weights of the blob, never a checkpoint, and through the model's own
forward, so every model option is applied as in training. A mode this version cannot run is refused,
never replaced by a score made without it.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from pgolf.config.sections import EvalConfig, ModelConfig
from pgolf.errors import PgolfError
from pgolf.nn.model import GPT, build_model, resolve_device, scoring_logits
from pgolf.text.bpb import plan_windows, scored_targets
from pgolf.text.evaluate import EvalData
from pgolf.text.ledger import Ledger, score_windows
from pgolf.ttt.lora import document_lora
from pgolf.ttt.score_first import score_first


def no_adaptation(model: GPT, ledger: Ledger, cfg: EvalConfig, device: torch.device, deadline: float | None) -> dict:
    """Every window scored by the model as it is."""
    windows = plan_windows(ledger.n_tokens, cfg.seq_len, cfg.stride, cfg.val_tokens)
    model.eval()
    score_windows(ledger, windows, scoring_logits(model, device), cfg.batch_seqs, progress=True)
    return {"expected_targets": scored_targets(windows), "windows": len(windows)}


Mode = Callable[[GPT, Ledger, EvalConfig, torch.device, "float | None"], dict]
MODES: dict[str, Mode] = {"none": no_adaptation, "score_first": score_first, "lora": document_lora}


def check_ttt(cfg: EvalConfig) -> None:
    """Refuse a TTT mode this version cannot run, rather than report a score made without it."""
    if cfg.ttt not in MODES:
        raise PgolfError(f"ttt_eval.ttt={cfg.ttt!r}: this test-time training mode is not implemented in this version "
                         f"of pgolf (its settings are recorded for when it is; implemented: {', '.join(MODES)}); "
                         "score without it with --set ttt=none")


def score_weights(state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, data: str | Path,
                  cfg: EvalConfig) -> dict:
    """Build the model from plain weights and score it as `cfg` says (the numbers ttt-eval and verify report).
    With TTT, the same weights are also scored without it first (`val_bpb_before_ttt`)."""
    check_ttt(cfg)
    device = torch.device(resolve_device(cfg.device))
    eval_data = EvalData.load(data)
    if model_cfg.vocab_size != int(eval_data.manifest["vocab_size"]):
        raise PgolfError(f"model vocab {model_cfg.vocab_size} != the data's {eval_data.manifest['vocab_size']} "
                         f"({eval_data.data_dir}); evaluate on the data the model was trained for")

    def run(mode: str) -> tuple[dict, dict, float]:
        try:
            model = build_model(model_cfg, state_dict, device)
        except ValueError as exc:
            raise PgolfError(f"the weights do not match their model config: {exc}") from None
        started = time.perf_counter()
        deadline = started + cfg.ttt_time_budget if cfg.ttt_time_budget > 0 else None
        ledger = Ledger(eval_data.tokens, eval_data.sidecar, eval_data.luts, device)
        info = MODES[mode](model, ledger, cfg, device, deadline)
        result = ledger.result(info.pop("expected_targets"))
        return result, info, time.perf_counter() - started

    if cfg.ttt == "none":
        result, info, seconds = run("none")
        return {**result, "windows": info["windows"], "seq_len": cfg.seq_len, "stride": cfg.stride,
                "eval_seconds": round(seconds, 2)}
    before, info_before, seconds_before = run("none")
    result, info, seconds = run(cfg.ttt)
    return {**result, "windows": info_before["windows"], "seq_len": cfg.seq_len, "stride": cfg.stride,
            "eval_seconds": round(seconds, 2), "val_bpb_before_ttt": before["val_bpb"],
            "eval_seconds_before_ttt": round(seconds_before, 2),
            "ttt": {"mode": cfg.ttt, "compliant": True, **info}}
