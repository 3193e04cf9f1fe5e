"""The claim a submission is held to: a BPB, and the evaluation settings it was measured with.

A claim comes from `--claim X`, from a JSON file (pgolf's ttt_eval_metrics.json, or any file with a
positive `val_bpb`), or from a challenge submission's logs and submission.json (pgolf.audit.challenge_claims).
It is re-scored the way it was measured unless the user says otherwise: eval
settings are params < the claim's own (windows and test-time training, from the file or the report
beside it) < the command line.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from pgolf.audit.challenge_claims import Claims, Run, is_submission_json, load_challenge_claims, read_claims_json
from pgolf.config.build import build
from pgolf.config.sections import EvalConfig
from pgolf.errors import PgolfError
from pgolf.report.metrics import companion

# What a claim is re-scored with: every evaluation setting, TTT's included, but where it runs and how
# many windows share a forward.
CLAIM_EVAL_KEYS = tuple(f.name for f in fields(EvalConfig) if f.name not in ("device", "batch_seqs"))


def load_claim(claim: float | None, claims: list[Path] | None
               ) -> tuple[float | None, dict[str, Any], str | None, Claims | None]:
    """(claimed val_bpb, eval settings the claim was measured with, where it came from, and — for a
    challenge submission's logs or submission.json — every run they claim)."""
    claims = [Path(c) for c in claims or []]
    if claim is not None and claims:
        raise PgolfError("give either --claim or --claims, not both")
    if claim is not None:
        if not math.isfinite(claim) or claim <= 0:
            raise PgolfError(f"--claim {claim}: expected a positive BPB")
        return float(claim), {}, "--claim", None
    if not claims:
        return None, {}, None, None
    if len(claims) == 1 and claims[0].suffix == ".json":
        obj = read_claims_json(claims[0])
        if not is_submission_json(obj):
            value, settings = _pgolf_claim(claims[0], obj)
            return value, settings, str(claims[0]), None
    found = load_challenge_claims(claims)
    return found.val_bpb, _record_settings(found), ", ".join(map(str, claims)), found


# The record scripts' phased TTT (PR #1855) in pgolf's phased_lora keys: its log's names → EvalConfig's.
RECORD_TTT = {"ttt_eval_seq_len": "seq_len", "ttt_lora_rank": "ttt_lora_rank", "ttt_lora_lr": "ttt_lora_lr",
              "ttt_chunk_size": "ttt_lora_chunk_tokens", "ttt_batch_size": "ttt_lora_batch_docs",
              "ttt_weight_decay": "ttt_weight_decay", "ttt_beta2": "ttt_beta2",
              "phased_ttt_prefix_docs": "ttt_prefix_docs", "phased_ttt_num_phases": "ttt_phases",
              "global_ttt_lr": "ttt_global_lr", "global_ttt_momentum": "ttt_global_momentum",
              "global_ttt_epochs": "ttt_global_epochs", "global_ttt_chunk_tokens": "ttt_chunk_tokens",
              "global_ttt_batch_seqs": "ttt_batch_seqs", "global_ttt_grad_clip": "ttt_grad_clip"}
# Its adapters: q, v and the LM head always; k, the MLP and the attention output by these flags.
RECORD_LORA_FLAGS = {"ttt_k_lora": "k", "ttt_mlp_lora": "mlp", "ttt_o_lora": "o"}


def _record_run_settings(run: Run) -> dict[str, Any] | None:
    """How a record log's score was measured, in pgolf's eval keys; None when the log does not say."""
    record = run.record_eval()
    if record is not None:  # a diagnostic line: its eval_val
        ranks, batch_seqs, seq_len = record
        return {"seq_len": seq_len, "stride": 0, "val_tokens": 0, "windows": "record",
                "record_batch_seqs": batch_seqs, "record_ranks": ranks}
    h = run.hyperparameters
    if not run.metric.startswith("quantized_ttt") or not all(k in h for k in (*RECORD_TTT, *RECORD_LORA_FLAGS)):
        return None
    targets = ["q", "v", "head"] + [t for flag, t in RECORD_LORA_FLAGS.items() if h[flag] == "True"]
    return {"ttt": "phased_lora", "stride": 0, "val_tokens": 0, "ttt_lora_targets": ",".join(targets),
            **{ours: h[theirs] for theirs, ours in RECORD_TTT.items()}}


def _record_settings(found: Claims) -> dict[str, Any]:
    """A record script's scores are re-scored as they were measured: a diagnostic line with windows=record
    (its eval_val), a phased-TTT line with phased_lora in its logged settings — when every run states the
    same settings. Other claims carry none."""
    settings = [_record_run_settings(r) for r in found.runs]
    if not settings or any(s is None or s != settings[0] for s in settings):
        return {}
    return settings[0]


def _pgolf_claim(claims: Path, obj: Any) -> tuple[float, dict[str, Any]]:
    """pgolf's ttt_eval_metrics.json (or any JSON with a positive val_bpb, read as `obj`) and the settings
    beside it."""
    value = obj.get("val_bpb") if isinstance(obj, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise PgolfError(f"{claims}: needs a positive number under 'val_bpb' (e.g. a ttt_eval_metrics.json)")
    # ttt-eval records every setting under "eval" in its report beside the metrics row (which holds the
    # window settings at the top level); take them from wherever they are.
    nested = obj.get("eval") if isinstance(obj.get("eval"), dict) else {}
    report = companion(claims, "report", ".json")
    if not nested and report.is_file():
        full = read_claims_json(report, "claims report")
        nested = full.get("eval") if isinstance(full, dict) and isinstance(full.get("eval"), dict) else {}
    settings = {key: nested.get(key, obj.get(key)) for key in CLAIM_EVAL_KEYS
                if nested.get(key, obj.get(key)) is not None}
    return float(value), settings


def eval_settings(eval_cfg: EvalConfig, claimed: dict[str, Any], from_command_line: dict[str, Any]
                  ) -> tuple[EvalConfig, dict[str, str]]:
    """(the settings to re-score with, {key: "params" | "claim" | "command line"})."""
    cfg, _ = build(EvalConfig, [(asdict(eval_cfg), "params"), (claimed, "claims file"),
                                (from_command_line, "command line")], "ttt_eval")
    sources = {f.name: "command line" if f.name in from_command_line else "claim" if f.name in claimed else "params"
               for f in fields(EvalConfig)}
    return cfg, sources
