"""Scoring a model on the validation stream: the data it needs, and the BPB of a model as it is.

Windows are planned by pgolf.text.bpb (each target scored exactly once, causally, over the full
softmax); bytes are the canonical sidecar's when present, and the tokenizer-LUT bytes are reported beside
them. CaseOps data (case-transformed text) must have the sidecar: its LUT bytes are not the original
text's bytes, so without one it is refused rather than scored with a wrong denominator. Scoring with
test-time training is pgolf.ttt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pgolf.config.sections import EvalConfig
from pgolf.errors import PgolfError
from pgolf.formats.files import read_json
from pgolf.formats.shards import load_val
from pgolf.nn.model import GPT, scoring_logits
from pgolf.text import bpb, ledger
from pgolf.text.tokenizer import load_tokenizer


@dataclass
class EvalData:
    """Validation tokens, their canonical byte counts (if any), and the tokenizer's byte LUTs."""

    tokens: np.ndarray
    sidecar: np.ndarray | None
    luts: bpb.ByteLUTs
    manifest: dict
    data_dir: Path

    @classmethod
    def load(cls, data_dir: str | Path) -> "EvalData":
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


def evaluate_model(model: GPT, data: EvalData, cfg: EvalConfig, progress: bool) -> dict:
    """Score `model` on the validation stream as `cfg` says; returns the BPB accounting."""
    device = next(model.parameters()).device
    if model.cfg.vocab_size != int(data.manifest["vocab_size"]):
        raise PgolfError(f"model vocab {model.cfg.vocab_size} != the data's {data.manifest['vocab_size']} "
                         f"({data.data_dir}); evaluate on the data the model was trained for")
    was_training = model.training
    model.eval()

    try:
        with torch.inference_mode():
            return ledger.score(scoring_logits(model, device), data.tokens, data.sidecar, data.luts,
                                seq_len=cfg.seq_len, stride=cfg.stride, val_tokens=cfg.val_tokens,
                                batch_seqs=cfg.batch_seqs, device=device, progress=progress)
    finally:
        model.train(was_training)
