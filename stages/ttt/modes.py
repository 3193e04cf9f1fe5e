"""What ttt-eval and verify score: a model built from plain (dequantized) weights, with or without
test-time training, through the one scoring path.

Each mode is a function (model, ledger, eval config, device, deadline) → what it did; the ledger holds
the scores. `none` scores every window with the model as it is; `score_first` adapts the whole model on
each chunk once it is scored; `lora` adapts per-document adapters on each chunk of a document once it is
scored; `phased_lora` also trains the base model on documents already scored, at a few pauses; and
`train_then_score` reproduces PR #398's protocol, flagged non-compliant by the ledger. Every mode runs on
the weights of the blob, never a checkpoint, and through the model's own forward, so every model option is
applied as in training. With `ngram_mix` (none and score_first) the ledger scores the model's softmax mixed
with an n-gram model of the targets already scored (pgolf.ttt.ngram_mix).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import torch

from pgolf.config.sections import EvalConfig, ModelConfig
from pgolf.errors import PgolfError
from pgolf.nn.distributed import Dist
from pgolf.nn.model import GPT, autocast_for, build_model, resolve_device, scoring_logits
from pgolf.text.bpb import plan_record_segments, plan_windows, scored_targets
from pgolf.text.evaluate import EvalData
from pgolf.text.ledger import Ledger, score_windows
from pgolf.ttt.flagged import train_then_score
from pgolf.ttt.lora import document_lora
from pgolf.ttt.ngram_mix import NgramMixer
from pgolf.ttt.phased import phased_lora
from pgolf.ttt.score_first import score_first


def no_adaptation(model: GPT, ledger: Ledger, cfg: EvalConfig, device: torch.device, deadline: float | None) -> dict:
    """Every window scored by the model as it is."""
    if cfg.windows == "record":
        windows = plan_record_segments(ledger.n_tokens, ledger.document_starts(model.cfg.bos_id), cfg.seq_len,
                                       cfg.record_batch_seqs, cfg.record_ranks)
    else:
        windows = plan_windows(ledger.n_tokens, cfg.seq_len, cfg.stride, cfg.val_tokens)
    model.eval()
    score_windows(ledger, windows, scoring_logits(model, device), cfg.batch_seqs, progress=True,
                  same_length=cfg.windows == "fixed")
    return {"expected_targets": scored_targets(windows), "windows": len(windows)}


Mode = Callable[[GPT, Ledger, EvalConfig, torch.device, "float | None"], dict]
MODES: dict[str, Mode] = {"none": no_adaptation, "score_first": score_first, "lora": document_lora,
                          "phased_lora": phased_lora, "train_then_score": train_then_score}


def warm_up(model: GPT, cfg: EvalConfig, device: torch.device) -> float:
    """One scoring forward and, for a TTT mode, one training forward and backward, on random tokens — never
    validation tokens (the challenge's PR #1530 dispute) — so kernels compile and caches fill before the
    clock starts. Nothing is updated: the gradients are dropped. Returns the seconds it took."""
    started = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, model.cfg.vocab_size, (cfg.batch_seqs, cfg.seq_len + 1), generator=g).to(device)
    model.eval()
    with torch.inference_mode():  # as the ledger scores
        scoring_logits(model, device)(x[:, :-1])
    if cfg.ttt != "none":
        model.train()
        rows = x[:cfg.ttt_batch_seqs]
        with autocast_for(device):
            model(rows[:, :-1], rows[:, 1:]).backward()
        model.zero_grad(set_to_none=True)
        model.eval()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def score_weights(state_dict: dict[str, torch.Tensor], model_cfg: ModelConfig, data: str | Path,
                  cfg: EvalConfig, ranks: Dist | None = None) -> dict:
    """Build the model from plain weights and score it as `cfg` says (the numbers ttt-eval and verify report).
    With TTT, the same weights are also scored without it first (`val_bpb_before_ttt`). Under torchrun
    (`ranks`) every rank scores its share and every rank gets the whole result. With `ngram_mix` every run
    scores the mixture (pgolf.ttt.ngram_mix), and `ngram_mix` in the result says which mixer ran."""
    device = ranks.device if ranks is not None else torch.device(resolve_device(cfg.device))
    eval_data = EvalData.load(data)
    if model_cfg.vocab_size != int(eval_data.manifest["vocab_size"]):
        raise PgolfError(f"model vocab {model_cfg.vocab_size} != the data's {eval_data.manifest['vocab_size']} "
                         f"({eval_data.data_dir}); evaluate on the data the model was trained for")

    def run(mode: str) -> tuple[dict, dict, dict]:
        try:
            model = build_model(model_cfg, state_dict, device)
        except ValueError as exc:
            raise PgolfError(f"the weights do not match their model config: {exc}") from None
        warmup = warm_up(model, cfg, device) if cfg.warmup else 0.0
        started = time.perf_counter()
        deadline = started + cfg.ttt_time_budget if cfg.ttt_time_budget > 0 else None
        mixer = NgramMixer.from_config(cfg, model_cfg.vocab_size)  # a fresh one: counts from this run's scores
        ledger = Ledger(eval_data.tokens, eval_data.sidecar, eval_data.luts, device, ranks=ranks, mixer=mixer)
        info = MODES[mode](model, ledger, cfg, device, deadline)
        result = ledger.result(info.pop("expected_targets"))
        if mixer is not None:
            result["ngram_mix"] = mixer.report()
        seconds = time.perf_counter() - started
        clock = {"seconds": round(seconds, 2), "warmup_seconds": round(warmup, 2),
                 "seconds_with_warmup": round(seconds + warmup, 2)}
        return result, {**info, "compliant": ledger.violation is None, "noncompliance": ledger.violation}, clock

    world = {"world_size": ranks.world if ranks is not None else 1}
    if cfg.ttt == "none":
        result, info, clock = run("none")
        return {**result, "windows": info["windows"], "seq_len": cfg.seq_len, "stride": cfg.stride,
                "eval_seconds": clock["seconds"], "eval_clock": clock, **world, "compliant": True}
    before, info_before, clock_before = run("none")
    result, info, clock = run(cfg.ttt)
    return {**result, "windows": info_before["windows"], "seq_len": cfg.seq_len, "stride": cfg.stride,
            "eval_seconds": clock["seconds"], "eval_clock": clock, **world, "compliant": info["compliant"],
            "val_bpb_before_ttt": before["val_bpb"], "eval_seconds_before_ttt": clock_before["seconds"],
            "ttt": {"mode": cfg.ttt, **info}}
