"""Line up the challenge baseline script's train loss with pgolf's `baseline`, step by step (issue 15).

baseline_steps.py REFERENCE_LOG PGOLF_LOSS_CSV PGOLF_TRAIN_REPORT --out JSON: the per-step losses
side by side, the first step where they differ by more than the reference log's rounding (4 decimals),
the largest gap, and both runs' final validation BPB (pgolf's on the tokenizer LUT, as the script's).
"""

import argparse
import csv
import json
import re
from pathlib import Path

ap = argparse.ArgumentParser()
ap.add_argument("reference_log", type=Path)
ap.add_argument("pgolf_csv", type=Path)
ap.add_argument("pgolf_report", type=Path, help="train's *_report.json (the metrics file's companion)")
ap.add_argument("--out", type=Path, required=True)
args = ap.parse_args()

text = args.reference_log.read_text()
ref = {int(s): float(v) for s, v in re.findall(r"step:(\d+)/\d+ train_loss:([\d.]+)", text)}
ours = {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(args.pgolf_csv.open())}
steps = sorted(set(ref) & set(ours))
gaps = {s: ours[s] - ref[s] for s in steps}
first = next((s for s in steps if abs(gaps[s]) > 1e-4 + 5e-5), None)  # beyond the log's 4-decimal rounding


def final(pattern: str) -> float | None:
    found = re.findall(pattern + r" val_loss:[\d.]+ val_bpb:([\d.]+)", text)
    return float(found[-1]) if found else None


metrics = json.loads(args.pgolf_report.read_text())
report = {
    "steps_compared": len(steps),
    "first_step_differing": first,
    "max_abs_gap": max(map(abs, gaps.values())) if gaps else None,
    "gap_at": {s: round(gaps[s], 4) for s in steps if s in (1, 2, 3, 5, 10, 20, 50, 100, 200, 400, steps[-1])},
    "mean_gap_last_50": sum(gaps[s] for s in steps[-50:]) / min(50, len(steps)) if steps else None,
    "reference_val_bpb": final(r"step:\d+/\d+"),
    "reference_int8_zlib_val_bpb": final("final_int8_zlib_roundtrip"),
    "pgolf_val_bpb_lut": metrics.get("val_bpb_lut"),
    "pgolf_ms_per_step": metrics.get("ms_per_step"),
    "reference_step_avg_ms": float(re.findall(r"step_avg:([\d.]+)ms", text)[-1]) if "step_avg" in text else None,
    "losses": {s: [ref[s], ours[s]] for s in steps},
}
args.out.write_text(json.dumps(report, indent=1) + "\n")
print(json.dumps({k: v for k, v in report.items() if k != "losses"}, indent=1))
