"""Merge a benchmark run's metrics files (and times.txt, env.txt) into one JSON: merge_results.py DIR OUT."""

import json
import sys
from pathlib import Path

src, out = Path(sys.argv[1]), Path(sys.argv[2])
merged: dict = {}
for path in sorted(src.glob("*.json")):
    merged[path.stem] = json.loads(path.read_text())
if (src / "times.txt").exists():
    merged["stage_ms"] = {k: int(v) for k, v in (line.split() for line in (src / "times.txt").read_text().splitlines())}
if (src / "env.txt").exists():
    merged["env"] = (src / "env.txt").read_text().splitlines()
for quantize in [k for k in merged if k.startswith("quantize_")]:
    merged[quantize].pop("tensors", None)  # the per-tensor table is long; totals stay
out.write_text(json.dumps(merged, indent=1))
print(f"merged {len(merged)} entries into {out}")
