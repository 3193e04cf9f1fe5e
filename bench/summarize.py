"""Markdown tables for bench/README.md from the committed result JSONs (issue 3 and 4 runs):
    python bench/summarize.py
MFU = model FLOPs per token × tokens/s ÷ 989 TFLOP/s (H100 SXM dense bf16). Model FLOPs per token:
6 × (matrix params run per token, counting looped layers once per pass and the tied head once)
+ 6 × layers run × seq_len × d_model (causal attention, forward + backward). Runs whose depth
recurrence switches on part-way are averaged over the steps with and without it.
"""

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PEAK = 989e12
RUNS = {  # label: (file, tokenizer)
    "baseline": ("2026-11-23_h100_baseline_cap240_quant.json", "SP1024"),
    "record": ("2026-11-23_h100_record_cap240.json", "SP8192 CaseOps"),
    "pr2071": ("2026-11-23_h100_pr2071_cap240.json", "SP8192 CaseOps"),
    "pr2071 on SP1024": ("2026-11-23_h100_pr2071_sp1024_cap240.json", "SP1024"),
    "pr2071, num_loops 0": ("2026-11-23_h100_pr2071_noloops_cap240.json", "SP8192 CaseOps"),
    # Later runs of the same commands (issue 4's remaining schemes), on fresh machines:
    "pr2071 run 2": ("2026-11-23_h100_pr2071_cap240_run2_quant.json", "SP8192 CaseOps"),
    "pr2071 run 3": ("2026-11-23_h100_pr2071_cap240_run3_budget_zstd.json", "SP8192 CaseOps"),
    "baseline run 2": ("2026-11-23_h100_baseline_cap240_run2_calib.json", "SP1024"),
    # Issue 5's run on 2×H200 under torchrun, 600 s (MFU per GPU; the H200's dense bf16 peak is the H100's):
    "record 2×H200 600 s": ("2026-11-23_2xh200_challenge_record_cap600.json", "SP8192 CaseOps"),
}
# Depth recurrence's switch step where the metrics lack it: a run resumed after the switch did not report
# it before the fix that came with that run (its log says "step 486: depth recurrence on").
LOOP_SWITCH = {"record 2×H200 600 s": 486}
SCHEMES = ("int8_rtn", "int6_rtn", "int6_gptq", "int6_gptq_h1m", "int6_gptq_lqer", "recipe", "budget16m",
           "budget16m_zstd")
ATTENTION = ("2026-11-23_h100_attention_b12.json", "2026-11-23_h100_attention_b48.json")


def detail(run: dict, stage: str) -> dict | None:
    """A stage's full record: its report in newer runs (the metrics file is a short row), its metrics in older."""
    return run.get(f"{stage}_report") or run.get(f"{stage}_metrics")


def flops_per_token(cfg: dict, looped: bool, seq_len: int) -> float:
    d, L = cfg["model_dim"], cfg["num_layers"]
    head_dim = d // cfg["num_heads"]
    kv = cfg["num_kv_heads"] * head_dim
    hidden = int(cfg["mlp_mult"] * d)
    per_layer = d * (d + cfg.get("gated_attn_dim", 0)) + 2 * d * kv + d * d + 2 * d * hidden
    passes = L + (cfg["num_loops"] * (cfg["loop_end"] - cfg["loop_start"] + 1) if looped and cfg["num_loops"] else 0)
    bigram = cfg.get("bigram_dim", 0) * d if cfg.get("bigram_buckets") else 0
    matmul = passes * per_layer + cfg["vocab_size"] * d + bigram
    return 6 * matmul + 6 * passes * seq_len * d


def mfu(run: dict) -> float:
    t = detail(run, "train")
    cfg, steps = run["_model_config"], t["steps"]
    switch = t.get("looping_enabled_at_step") or run.get("_loop_switch")
    on = steps - switch if switch is not None else (steps if cfg["num_loops"] else 0)
    f = ((steps - on) * flops_per_token(cfg, False, run["_seq_len"]) + on * flops_per_token(cfg, True, run["_seq_len"])) / steps
    return f * t["tokens_per_s"] / t.get("world_size", 1) / PEAK


def main() -> None:
    from pgolf.config.resolve import resolve

    print("| preset | tokenizer | steps | ms/step | tokens/s | MFU | peak GiB | val_bpb (sidecar) | LUT | live weights |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    loaded = {}
    for label, (name, tok) in RUNS.items():
        run = json.loads((RESULTS / name).read_text())
        preset = label.split()[0].rstrip(",")
        sets = {"model.num_loops": 0} if "num_loops 0" in label else {}
        params = resolve("train", None, {"preset": preset, **sets})
        model, train = params.model, params.train
        tokenized = detail(run, "tokenize")
        run["_model_config"] = {**model.__dict__, "vocab_size": tokenized["vocab_size"]
                                if tokenized else (8192 if "8192" in tok else 1024)}
        run["_seq_len"] = train.train_seq_len
        run["_loop_switch"] = LOOP_SWITCH.get(label)
        loaded[label] = run
        t = detail(run, "train")
        live = t.get("val_bpb_live_weights")
        print(f"| {label} | {tok} | {t['steps']} | {t['ms_per_step']:.1f} | {t['tokens_per_s'] / 1e6:.2f} M | "
              f"{100 * mfu(run):.0f} % | {t['peak_memory_bytes'] / 2**30:.1f} | {t['val_bpb_sidecar']:.4f} | "
              f"{t['val_bpb_lut']:.4f} | {'–' if live is None else f'{live:.4f}'} |")
    print()
    print("| checkpoint | scheme | val_bpb | gap | packed bytes (model + code) | codec | quantize s |")
    print("|---|---|---|---|---|---|---|")
    for label in ("baseline", "baseline run 2", "pr2071", "pr2071 run 2", "pr2071 run 3"):
        run = loaded[label]
        pre = detail(run, "train")["val_bpb"]
        for s in SCHEMES:
            ev = run.get(f"ttt_eval_{s}_metrics")
            if not ev:
                continue
            pack = detail(run, f"pack_{s}")
            print(f"| {label} ({pre:.4f}) | {s} | {ev['val_bpb']:.4f} | {ev['val_bpb'] - pre:+.4f} | "
                  f"{pack['total_bytes']:,} | {pack['codec']} | {run['stage_ms'][f'quantize_{s}'] / 1000:.1f} |")
    print()
    runs = [json.loads((RESULTS / name).read_text()) for name in ATTENTION]
    print("| kernel | " + " | ".join(f"B={r['shape']['batch']} fwd+bwd ms | fwd ms" for r in runs) + " | max abs diff vs dense |")
    print("|---|" + "---|---|" * len(runs) + "---|")
    for kernel in runs[0]["kernels"]:
        cells = [f"{r['kernels'][kernel]['fwd_bwd_ms']:.2f} | {r['kernels'][kernel]['fwd_ms']:.2f}" for r in runs]
        print(f"| {kernel} | " + " | ".join(cells) + f" | {runs[0]['kernels'][kernel]['max_abs_diff_vs_dense']:.3g} |")
    print("| create_block_mask, eager (per forward) | " + " | ".join(f"{r['create_block_mask_ms']:.1f} | –" for r in runs)
          + " | – |")


if __name__ == "__main__":
    main()
