"""Issue 14's figures in one JSON: the GPU calls' results (bench/gpu_fit16mb.sh train, then budget) and the
CPU codec table (bench/codec_bench.py) on the same recipe codes.

    python bench/fit16mb_summary.py TRAIN.json BUDGET.json CODECS.json QUICK.json OUT.json

QUICK is the one-call run (`gpu_fit16mb.sh quick`): a 200 s checkpoint, its recipe and the loss-objective
budget measured with per-tensor ans, both packed with ans.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pgolf.formats.code import measure_code


def main() -> None:
    train, budget, table, quick = (json.loads(Path(p).read_text()) for p in sys.argv[1:5])
    live = train["train_metrics"]["val_bpb"]
    code = measure_code("auto")["bytes"]  # this checkout's decode path, as pack counts it
    rows = table["rows"]
    pgolf_rows = [r for r in rows if r["codec"] != "lrzip"]
    best = min(pgolf_rows, key=lambda r: r["blob_bytes"])
    lrzip = [r for r in rows if r["codec"] == "lrzip" and r["container"] == "pergroup"]
    lrzip_best = min(lrzip, key=lambda r: r["blob_bytes"]) if lrzip else None

    def gap(name: str, source: dict) -> float:
        return round(source[f"ttt_eval_{name}_metrics"]["val_bpb"] - live, 5)

    out = {
        "date": train["env"][0], "device": train["env"][1], "software": train["env"][2],
        "commands": ["bash bench/gpu_fit16mb.sh train", "bash bench/gpu_fit16mb.sh budget",
                     "PATH=$LRZIP_DIR:$PATH python bench/codec_bench.py recipe.pgolf codecs.json "
                     "--budget-report quantize_budget_loss_report.json",
                     "bash bench/gpu_fit16mb.sh quick",
                     "python bench/fit16mb_summary.py train.json budget.json codecs.json quick.json OUT.json"],
        "checkpoint": {"preset": "pr2071", "cap_s": 240, "steps": train["train_report"]["steps"], "val_bpb": live},
        "recipe_total_bytes_as_run": train["pack_recipe_metrics"]["bytes"],
        "recipe_total_bytes": best["blob_bytes"] + code,
        "code_bytes": code,
        "lrzip_pergroup_bytes": lrzip_best["blob_bytes"] if lrzip_best else None,
        "lrzip_pergroup_row": lrzip_best,
        "best_pgolf_bytes": best["blob_bytes"],
        "best_pgolf_row": {k: v for k, v in best.items() if k != "streams"},
        "best_vs_lrzip": round(best["blob_bytes"] / lrzip_best["blob_bytes"] - 1, 5) if lrzip_best else None,
        "unpack_s": best["unpack_s"],
        "recipe_bpb_gap": gap("recipe", train),
        "budget_old_bpb_gap": gap("budget_layer", budget),
        "budget_old_total_bytes": budget["pack_budget_layer_metrics"]["bytes"],
        "budget_new_bpb_gap": gap("budget_loss", budget),
        "budget_new_total_bytes": budget["pack_budget_loss_metrics"]["bytes"],
        "budget_measured_bytes": {k: budget[f"quantize_budget_{k}_report"]["budget"]["measured_bytes"]
                                  for k in ("layer", "loss")},
        "sensitivity": {k: v for k, v in budget["sensitivity"].items() if k != "rows"},
        "codec_rows": [{k: v for k, v in r.items() if k != "streams"} for r in rows],
        "code_bounds": table["code_bounds"],
        "mixed_widths_emulated": table.get("mixed_widths_emulated"),
        "stage_ms": {**train["stage_ms"], **budget["stage_ms"]},
        "quick_200s": {
            "env": quick["env"],
            "recipe_bpb": quick["ttt_eval_recipe_metrics"]["val_bpb"],
            "recipe_ans_bytes": quick["pack_recipe_metrics"]["bytes"],
            "budget_new_bpb": quick["ttt_eval_budget_loss_metrics"]["val_bpb"],
            "budget_new_ans_bytes": quick["pack_budget_loss_metrics"]["bytes"],
            "budget_new_vs_recipe_bpb": round(quick["ttt_eval_budget_loss_metrics"]["val_bpb"]
                                              - quick["ttt_eval_recipe_metrics"]["val_bpb"], 5),
            "budget_measured_bytes": quick["quantize_budget_loss_report"]["budget"]["measured_bytes"],
            "budget_real_builds": quick["quantize_budget_loss_report"]["budget"]["real_builds"],
            "stage_ms": quick["stage_ms"],
        },
    }
    Path(sys.argv[5]).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, (list, dict))}, indent=1))


if __name__ == "__main__":
    main()
