"""The claim a submission is held to: a BPB, and the evaluation settings it was measured with.

A claim comes from `--claim X` or from a JSON file (pgolf's ttt_eval_metrics.json, or any file with a
positive `val_bpb`). It is re-scored the way it was measured unless the user says otherwise: eval
settings are params < the claim's own (seq_len, stride, val_tokens) < the command line.
"""

from __future__ import annotations

import math
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from pgolf.config.build import build
from pgolf.config.sections import EvalConfig
from pgolf.errors import PgolfError
from pgolf.formats.files import read_json

CLAIM_EVAL_KEYS = ("seq_len", "stride", "val_tokens")


def load_claim(claim: float | None, claims: Path | None) -> tuple[float | None, dict[str, Any], str | None]:
    """(claimed val_bpb, eval settings the claim was measured with, where it came from)."""
    if claim is not None and claims is not None:
        raise PgolfError("give either --claim or --claims, not both")
    if claim is not None:
        if not math.isfinite(claim) or claim <= 0:
            raise PgolfError(f"--claim {claim}: expected a positive BPB")
        return float(claim), {}, "--claim"
    if claims is None:
        return None, {}, None
    obj = read_json(claims, "claims file")
    value = obj.get("val_bpb") if isinstance(obj, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise PgolfError(f"{claims}: needs a positive number under 'val_bpb' (e.g. a ttt_eval_metrics.json)")
    # ttt-eval records its settings under "eval"; accept them at the top level too.
    nested = obj.get("eval") if isinstance(obj.get("eval"), dict) else {}
    settings = {}
    for key in CLAIM_EVAL_KEYS:
        v = nested.get(key, obj.get(key))
        if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
            settings[key] = v
    return float(value), settings, str(claims)


def eval_settings(eval_cfg: EvalConfig, claimed: dict[str, Any], from_command_line: dict[str, Any]
                  ) -> tuple[EvalConfig, dict[str, str]]:
    """(the settings to re-score with, {key: "params" | "claim" | "command line"})."""
    cfg, _ = build(EvalConfig, [(asdict(eval_cfg), "params"), (claimed, "claims file"),
                                (from_command_line, "command line")], "ttt_eval")
    sources = {f.name: "command line" if f.name in from_command_line else "claim" if f.name in claimed else "params"
               for f in fields(EvalConfig)}
    return cfg, sources
