"""The speed side-by-side's figures (issue 16) from the runs of bench/speed_sidebyside.sh:
    python bench/speed_summary.py RESULTS_DIR... [--out FILE.json]
Per run: ms/step before and after depth recurrence switches on (from the times logged every 10 steps, the
first 10 steps left out as warm-up), tokens/s, peak memory, the train loss at the end, and MFU.

MFU counts FLOPs the same way for both sides (bench/summarize.py's flops_per_token, on the `record` preset's
config, which is the record script's architecture): 6 × matrix parameters run per token (looped layers once
per pass, the tied head once) + 6 × layers run × seq_len × d_model for attention, ÷ the H100/H200 dense bf16
peak of 989 TFLOP/s, per GPU.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from summarize import PEAK, flops_per_token

SKIP = 10  # the first logged interval holds the first steps' allocator and cache warm-up


def model_config(preset: str) -> dict:
    from pgolf.config.resolve import resolve
    return {**resolve("train", None, {"preset": preset}).model.__dict__, "vocab_size": 8192}


def rates(rows: list[tuple[int, float]], switch: int | None) -> dict:
    """ms/step over logged intervals: plain (SKIP..switch), looped (switch+SKIP..end), all (SKIP..end)."""
    t = dict(rows)
    end = max(t)

    def per_step(a: int, b: int) -> float | None:
        return (t[b] - t[a]) / (b - a) if a in t and b in t and b > a else None

    plain_end = max((s for s in t if switch is None or s <= switch), default=None)
    looped_start = min((s for s in t if switch is not None and s >= switch + SKIP), default=None)
    return {"ms_per_step": per_step(SKIP, end), "ms_per_step_plain": per_step(SKIP, plain_end),
            "ms_per_step_looped": per_step(looped_start, end) if looped_start else None}


def summarize_run(path: Path) -> dict | None:
    if path.name == "speed_record.json":
        run = json.loads(path.read_text())
        rows = [(r["step"], r["elapsed_ms"]) for r in run["rows"]]
        out = {"side": "record script", "preset": "record", "world_size": 1, "switch": run["loop_switch_step"],
               "loss": run["rows"][-1]["loss"], "peak_gib": run["peak_memory_bytes"] / 2**30,
               "batch_tokens": run["batch_tokens"], "seq_len": run["seq_len"], "prime_s": run["prime_s"]}
    elif path.name.startswith("speed_pgolf_") and path.name.endswith("_report.json"):
        name = path.name[len("speed_pgolf_"):-len("_report.json")]
        report = json.loads(path.read_text())
        log = path.parent / f"{name}_loss.csv"
        if not log.exists():
            return None
        table = list(csv.DictReader(open(log)))
        rows = [(int(r["step"]), float(r["elapsed_ms"])) for r in table]
        job = path.parent / f"speed_job_{name}.json"  # written by speed_sidebyside.sh since 2026-11-30 23:00
        preset = json.loads(job.read_text())["preset"] if job.exists() else name.split("_")[0]  # older: NAME's head
        batch = int(table[-1]["tokens"]) // int(table[-1]["step"])
        out = {"side": f"pgolf {name}", "preset": preset, "world_size": report.get("world_size", 1),
               "switch": report.get("looping_enabled_at_step"), "loss": float(table[-1]["train_loss"]),
               "peak_gib": (report.get("peak_memory_bytes") or 0) / 2**30, "batch_tokens": batch, "seq_len": 2048}
        variant = path.parent / f"variant_{name}.json"  # another commit's pgolf (bench/variant.sh)
        if variant.exists():
            out["variant"] = json.loads(variant.read_text())["variant"]
    else:
        return None
    out.update(rates(rows, out["switch"]))
    cfg = model_config(out["preset"])
    for key, looped in (("ms_per_step", None), ("ms_per_step_plain", False), ("ms_per_step_looped", True)):
        ms = out[key]
        if ms is None:
            continue
        tokens_per_s = out["batch_tokens"] / (ms / 1000)
        if looped is None:  # the whole run: half the steps each way
            f = 0.5 * (flops_per_token(cfg, False, out["seq_len"]) + flops_per_token(cfg, True, out["seq_len"]))
            out["tokens_per_s"] = round(tokens_per_s)
        else:
            f = flops_per_token(cfg, looped, out["seq_len"])
        out["mfu" + key[len("ms_per_step"):]] = f * tokens_per_s / out["world_size"] / PEAK
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    runs = [r for d in args.dirs for p in sorted(d.glob("speed_*.json")) if (r := summarize_run(p))]
    print("| run | GPUs | ms/step | before loop | after loop | tokens/s | MFU | peak GiB | loss at end |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        def ms(k):
            return f"{r[k]:.1f}" if r.get(k) else "–"
        print(f"| {r['side']} | {r['world_size']} | {ms('ms_per_step')} | {ms('ms_per_step_plain')} | "
              f"{ms('ms_per_step_looped')} | {r.get('tokens_per_s', 0):,} | {100 * r.get('mfu', 0):.1f} % | "
              f"{r['peak_gib']:.1f} | {r['loss']:.4f} |")
    if args.out:
        args.out.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
