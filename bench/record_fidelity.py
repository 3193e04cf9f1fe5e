"""Is pgolf's `record` model the record's (PR #1855)? The same weights in both, compared (issue 15).

Run by bench/record_fidelity.sh after the record's own script has trained and written its artifacts
(ARTIFACT_DIR: final_model.pt, the float weights after EMA; final_model.int6.ptz, its quantized artifact),
with the same environment, so the script's Hyperparameters read the same settings. The script is
imported as a module (its classes are used, nothing is copied) with FlashAttention 3 replaced by
bench/fa3_shim.

Measured, for the float weights and for the quantized artifact:
- max |Δlogit| between the record's GPT and pgolf's on the first windows (bf16 autocast, both), with
  pgolf's own bf16-vs-fp32 difference beside it as the yardstick of bf16 noise;
- BPB under pgolf's protocol (non-overlapping seq_len windows, attention within documents), both models
  scored by pgolf's ledger on the same windows — the like-for-like comparison;
- BPB under the record's protocol (its eval_val: 32-window batches cut into document segments of at
  most seq_len): the record model through its own eval_val, pgolf's through the ledger on the same
  segments — derived here from the script's own _build_cu_seqlens, and checked equal to pgolf's
  `windows: record` plan.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pgolf.formats import record_int6
from pgolf.nn.model import GPT, build_model, scoring_logits
from pgolf.text import ledger as ledgers
from pgolf.text.bpb import Window, plan_record_segments, plan_windows, scored_targets
from pgolf.text.evaluate import EvalData


def load_record_module(path: Path):
    spec = importlib.util.spec_from_file_location("record_train_gpt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record_logits_fn(rec, model, seq_len: int):
    """x[B, T] → logits, each row one window: the record's varlen path with segments at the row's BOSes
    (its attention within documents), one row per call so nothing crosses a window (its smear gate
    would take the previous row's last token otherwise)."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        out = []
        for row in x:
            bos = (row == rec.BOS_ID).nonzero(as_tuple=True)[0].tolist()
            cu, _ = rec._build_cu_seqlens(bos, row.numel(), row.device, seq_len, 64)
            with torch.autocast(row.device.type, dtype=torch.bfloat16):
                out.append(model.forward_logits(row[None], cu_seqlens=cu, max_seqlen=seq_len).float())
        return torch.cat(out)
    return fn


def score(logits_fn, data: EvalData, windows: list[Window], device) -> dict:
    book = ledgers.Ledger(data.tokens, data.sidecar, data.luts, device)
    ledgers.score_windows(book, windows, logits_fn, batch_seqs=8, progress=False)
    return book.result(scored_targets(windows))


def record_segments(rec, h, data: EvalData) -> list[Window]:
    """The record's eval_val as windows: batches of local_batch_seqs windows of eval_seq_len tokens (the
    tail that fills no whole batch dropped), each cut at its BOSes and every eval_seq_len tokens of a
    document."""
    seq_len = h.eval_seq_len
    batch_seqs = h.val_batch_tokens // (h.world_size * h.grad_accum_steps) // seq_len
    total_seqs = (data.tokens.size - 1) // seq_len
    end_seq = total_seqs // batch_seqs * batch_seqs
    tokens = torch.from_numpy(data.tokens.astype("int64"))
    windows = []
    for first in range(0, end_seq, batch_seqs):
        a = first * seq_len
        x = tokens[a:a + batch_seqs * seq_len]
        bos = (x == rec.BOS_ID).nonzero(as_tuple=True)[0].tolist()
        cu, _ = rec._build_cu_seqlens(bos, x.numel(), "cpu", seq_len, 64)
        cu = sorted(set(cu.tolist()))
        windows.extend(Window(a + s, a + e, 0) for s, e in zip(cu[:-1], cu[1:]))
    return windows


def pgolf_model_from(flat: dict[str, torch.Tensor], vocab: int, hyper: dict[str, str], device) -> GPT:
    cfg, _ = record_int6.record_model_config(flat, vocab, hyper, "record weights")
    with torch.device("meta"):
        wanted = {n: t.shape for n, t in GPT(cfg).state_dict().items()}
    return build_model(cfg, record_int6.to_pgolf_names(flat, wanted, "record weights"), device).eval()


def logit_diff(rec_fn, pg_model, data: EvalData, seq_len: int, n_windows: int, device) -> dict:
    x = torch.from_numpy(data.tokens[:n_windows * seq_len].astype("int64")).view(n_windows, seq_len).to(device)
    with torch.no_grad():
        a = rec_fn(x)
        b = scoring_logits(pg_model, device)(x).float()
        exact = copy.deepcopy(pg_model).float().logits(x)  # fp32 throughout, no autocast: the yardstick
    return {"max_abs_logit_diff": (a - b).abs().max().item(), "mean_abs_logit_diff": (a - b).abs().mean().item(),
            "pgolf_bf16_vs_fp32_max_abs": (b - exact).abs().max().item(),
            "record_vs_pgolf_fp32_max_abs": (a - exact).abs().max().item(),
            "logit_abs_max": a.abs().max().item(), "windows": n_windows, "seq_len": seq_len}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--script", type=Path, required=True, help="the record's train_gpt.py")
    ap.add_argument("--run", type=Path, required=True, help="its ARTIFACT_DIR")
    ap.add_argument("--data", type=Path, required=True, help="the same data, pgolf's tokenized layout")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--logit-windows", type=int, default=8)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this harness")
    args = ap.parse_args()
    device = torch.device(args.device)
    rec = load_record_module(args.script)
    rec.BOS_ID = rec.BOS_ID if rec.BOS_ID is not None else 1
    h = rec.Hyperparameters()
    hyper = {k: str(v) for k, v in vars(type(h)).items() if not k.startswith("_")}
    data = EvalData.load(args.data)
    vocab = int(data.manifest["vocab_size"])
    seq_len = h.eval_seq_len
    pg_windows = plan_windows(data.tokens.size, seq_len, 0)
    rec_windows = record_segments(rec, h, data)
    per_batch = h.val_batch_tokens // (h.world_size * h.grad_accum_steps) // seq_len
    if plan_record_segments(data.tokens.size, np.flatnonzero(data.tokens == rec.BOS_ID), seq_len, per_batch,
                            h.world_size) != rec_windows:  # what `pgolf verify` scores a diagnostic claim on
        raise SystemExit("pgolf's windows=record plan differs from the script's own segments")
    report: dict = {"seq_len": seq_len, "pgolf_windows": len(pg_windows), "record_segments": len(rec_windows),
                    "record_segments_equal_pgolf_plan": True, "val_tokens": int(data.tokens.size)}

    def record_model(state: dict[str, torch.Tensor] | None):
        model = rec.deserialize(h, device) if state is None else rec.GPT(h).to(device).bfloat16()
        if state is not None:
            rec.restore_fp32_params(model)
            model.load_state_dict(state, strict=True)
        model.looping_active = h.num_loops > 0  # as the script's evaluation of both
        return model.eval()

    float_state = torch.load(args.run / "final_model.pt", map_location="cpu", weights_only=True)
    artifact = record_int6.read_record_int6((args.run / "final_model.int6.ptz").read_bytes(),
                                            args.run / "final_model.int6.ptz", 10**9)
    weights = {
        "float": {k: v.float() for k, v in rec._unbank_state_dict(float_state, h.num_layers).items()},
        "quantized": record_int6.dequantize_record(artifact, "final_model.int6.ptz"),
    }
    for kind, flat in weights.items():
        t0 = time.perf_counter()
        rec_model = record_model(float_state if kind == "float" else None)
        pg_model = pgolf_model_from(flat, vocab, hyper, device)
        rec_fn = record_logits_fn(rec, rec_model, seq_len)
        pg_fn = scoring_logits(pg_model, device)
        row = logit_diff(rec_fn, pg_model, data, seq_len, args.logit_windows, device)
        with torch.no_grad():
            row["record_bpb_pgolf_protocol"] = score(rec_fn, data, pg_windows, device)["val_bpb"]
            row["pgolf_bpb_pgolf_protocol"] = score(pg_fn, data, pg_windows, device)["val_bpb"]
            row["pgolf_bpb_record_protocol"] = score(pg_fn, data, rec_windows, device)["val_bpb"]
            loss, bpb = rec.eval_val(h, device, rec.ValidationData(h, device), rec_model)
            row["record_bpb_record_protocol"] = bpb
        row["seconds"] = round(time.perf_counter() - t0, 1)
        report[kind] = row
        print(kind, json.dumps(row, indent=1), flush=True)
        del rec_model, pg_model
        torch.cuda.empty_cache()
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
