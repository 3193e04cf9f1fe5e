"""Issue 18's ablation table from bench/seed_studies.sh results: one row a technique, against its base.

    python bench/seed_studies_summary.py RESULTS.json [MORE.json ...] --out TABLE.json [--markdown]

Each RESULTS file is one group: the calls of one held machine, whose rows share one training of each base
(a machine given back means new base runs, hence a new file). A row's BPB is its quantized blob's over all
validation docs (train and quantize rows) or, for an eval row, its score and the base blob's on the same first
EVAL_TOKENS tokens; bytes are the packed blob's; ms/step is train's. Δ is against the base row of the same
preset in the same group, never against another group's base run; a row measured in several groups is taken
from the last. The study's own claim is quoted from bench/seed_studies.tsv.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

TABLE = Path(__file__).with_name("seed_studies.tsv")


def rows() -> list[dict]:
    with TABLE.open() as f:
        return list(csv.DictReader((line for line in f if not line.startswith("#")), delimiter="\t"))


def measured(row: dict, r: dict) -> dict | None:
    """The row's figures from the merged metrics, or None when it did not run (or did not finish)."""
    name, stage = row["row"], row["stage"]
    if stage == "eval":
        mixed, plain = r.get(f"{name}_eval_metrics"), r.get(f"{name}_plain_eval_metrics")
        if not (mixed and plain):
            return None
        return {"val_bpb": mixed["val_bpb"], "base_val_bpb_same_tokens": plain["val_bpb"],
                "val_tokens": mixed.get("val_tokens"), "eval_seconds": mixed.get("seconds")}
    ev, pack = r.get(f"{name}_eval_metrics"), r.get(f"{name}_pack_metrics")
    if not (ev and pack):
        return None
    out = {"val_bpb": ev["val_bpb"], "bytes": pack["bytes"]}
    train = r.get(f"{name}_train_report")  # the report holds steps, ms/step and peak memory
    if train:
        out.update(steps=train.get("steps"), ms_per_step=train.get("ms_per_step"),
                   peak_gib=round(train["peak_memory_bytes"] / 2**30, 1) if train.get("peak_memory_bytes") else None,
                   schedule_factor=(train.get("schedule") or {}).get("factor"))
        # a Reptile step reads one micro-batch per inner step, not a batch: ms/step mixes the two kinds
        if (train.get("reptile") or {}).get("steps"):
            out["reptile_steps"] = train["reptile"]["steps"]
    return out


def not_comparable(m: dict, base: dict) -> str | None:
    """Why a train row cannot be read against its base run, or None. A row must train on its base's schedule:
    pr398's base rescales its 3,000-step warmdown to a 240 s run, and on 2026-11-30 three rows that trained
    without it scored 1.85-1.88 BPB against the base's 1.29."""
    if "schedule_factor" not in m or "schedule_factor" not in base:
        return None
    if (m["schedule_factor"] is None) != (base["schedule_factor"] is None):
        return "its schedule was scaled and its base's not" if base["schedule_factor"] is None else \
            "trained without its base's schedule_scale"
    return None


def table(results: dict, group: str | None = None) -> list[dict]:
    """The rows of one group's merged metrics, with their deltas against that group's base rows."""
    out, base = [], {}
    for row in rows():
        m = measured(row, results)
        entry = {k: row[k] for k in ("row", "study", "base", "stage", "overrides", "claim")}
        entry["measured"] = m
        if m and group:
            entry["group"] = group
        if row["row"].endswith("_base") and m:
            base[row["base"]] = m
        out.append(entry)
    for entry in out:
        m, b = entry["measured"], base.get(entry["base"])
        if not m or entry["row"].endswith("_base"):
            continue
        why = not_comparable(m, b) if b and entry["stage"] == "train" else None
        if why:  # kept, for the record, but never measured against the base
            entry.update(measured=None, not_comparable=why, measured_not_comparable=m)
            continue
        if entry["stage"] == "eval":
            entry["delta_bpb"] = round(m["val_bpb"] - m["base_val_bpb_same_tokens"], 4)
        elif b:
            entry["delta_bpb"] = round(m["val_bpb"] - b["val_bpb"], 4)
            entry["delta_bytes"] = m["bytes"] - b["bytes"]
            if entry["stage"] == "train" and m.get("ms_per_step") and b.get("ms_per_step"):
                entry["ms_per_step_ratio"] = round(m["ms_per_step"] / b["ms_per_step"], 3)
    return out


def grouped_table(groups: list[tuple[str, dict]]) -> list[dict]:
    """One table from several groups, in order: every group's base rows (each the reference of its group's
    rows), then each other row as the last group that measured it has it; a row no group measured stays
    unmeasured."""
    tables = [table(results, name) for name, results in groups] or [table({})]
    bases = [e for t in tables for e in t if e["row"].endswith("_base") and e["measured"]]
    rows = tables[0]
    for later in tables[1:]:
        rows = [new if new["measured"] or not (old["measured"] or old.get("not_comparable")) else old
                for old, new in zip(rows, later)]
    return bases + [e for e in rows if not (e["row"].endswith("_base") and e["measured"])]


def steps_cell(m: dict) -> str:
    steps = str(m.get("steps") or "")
    return f"{steps} ({m['reptile_steps']} Reptile)" if m.get("reptile_steps") else steps


def markdown(entries: list[dict]) -> str:
    grouped = any(e.get("group") for e in entries)
    lines = ["| row | study | base | change | BPB | Δ BPB | bytes | Δ bytes | steps | ms/step | study's claim |"
             + (" run |" if grouped else ""), "|---" * (12 if grouped else 11) + "|"]
    for e in entries:
        m = e["measured"]
        if not m:
            continue
        change = "–" if e["overrides"] == "-" else f"`{e['overrides']}`"
        bpb = f"{m['val_bpb']:.4f}"
        if e["stage"] == "eval":
            bpb += f" (base {m['base_val_bpb_same_tokens']:.4f}, first {m['val_tokens']:,} tokens)"
        cells = [e["row"], e["study"], e["base"], change, bpb, f"{e.get('delta_bpb', 0):+.4f}" if "delta_bpb" in e else "",
                 f"{m['bytes']:,}" if m.get("bytes") else "", f"{e['delta_bytes']:+,}" if "delta_bytes" in e else "",
                 steps_cell(m), f"{m['ms_per_step']:.1f}" if m.get("ms_per_step") else "", e["claim"]]
        if grouped:
            cells.append(e.get("group", ""))
        lines.append("| " + " | ".join(cells) + " |")
    missing = [e["row"] for e in entries if not e["measured"] and not e.get("not_comparable")]
    if missing:
        lines.append(f"\nNot run yet: {', '.join(missing)}.")
    excluded = [f"{e['row']} ({e['not_comparable']}, {e['measured_not_comparable']['val_bpb']:.4f})"
                for e in entries if e.get("not_comparable")]
    if excluded:
        lines.append(f"\nRan, but not comparable with their base: {'; '.join(excluded)}.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("results", type=Path, nargs="+", help="one file per group (held machine), oldest first")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--markdown", action="store_true", help="also print the table as Markdown")
    args = ap.parse_args()
    groups = [(path.name, json.loads(path.read_text())) for path in args.results]
    entries = grouped_table(groups)
    args.out.write_text(json.dumps({"rows": entries, "groups": {name: {"env": r.get("env"), "notes": r.get("notes")}
                                                                for name, r in groups}}, indent=1))
    if args.markdown:
        print(markdown(entries))


if __name__ == "__main__":
    main()
