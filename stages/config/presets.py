"""Presets: whole configurations (one mapping per params.yaml section) that a run starts from.

A run starts from one (params.yaml's top-level `preset`, or `--set preset=NAME`); params.yaml's sections,
then `--set`, override it key by key, and `python -m pgolf.config NAME` writes it out as a full
params.yaml. `baseline` is the challenge's naive baseline (the dataclass defaults); `tiny` trains in
minutes on a CPU; `record`, `pr2071` and `pr398` reproduce published leaderboard stacks, sized for the
challenge's 8 GPUs: `train.grad_accum_steps` is divided by the world size, so on fewer GPUs
the same global batch takes more micro-steps. Settings that a stage does not implement yet (test-time
training) are recorded anyway, and that stage says so instead of silently scoring something else.
"""

from __future__ import annotations

from typing import Any

# PR #1855 (1.0611 BPB; its phased LoRA TTT from PR #1530 on): 11 layers with depth recurrence 3–5 ×2 switched on at
# 35 % of the run, two-lane parallel residuals from layer 8, XSA everywhere, BOS-fixed SmearGate, sparse
# head-output gate, partial RoPE 16/64, SP8192 with CaseOps; Muon (Polar Express, MuonEq-R, WD 0.095);
# EMA 0.9965; 786,432-token batches of 2048-token sequences; int6 GPTQ (int7 embedding) + LQER.
_RECORD_MODEL = {
    "num_layers": 11, "model_dim": 512, "num_heads": 8, "num_kv_heads": 4, "mlp_mult": 4.0,
    "activation": "leaky_relu2", "rope_dims": 16, "ln_scale": True, "qk_gain_init": 5.0, "xsa_layers": 11,
    "skip_gates": True, "parallel_from": 8, "loop_start": 3, "loop_end": 5, "num_loops": 2,
    "smear_gate": True, "sparse_attn_gate": True, "sparse_gate_scale": 0.5, "ortho_init": True, "doc_mask": True,
    "fused_ce": True,  # its fused softcapped CE (PR #1787): 2.4× the compiled plain loss on one H200 (issue 16)
}
_RECORD_TRAIN = {
    "iterations": 20000, "max_wallclock_seconds": 600.0, "warmup_steps": 20,
    "train_batch_tokens": 786_432, "train_seq_len": 2048, "grad_accum_steps": 8,
    "matrix_lr": 0.026, "muon_momentum": 0.97, "muon_momentum_warmup_start": 0.92,
    "muon_momentum_warmup_steps": 1500, "muon_ns": "polar_express", "muon_row_norm": True, "muon_wd": 0.095,
    "tied_embed_lr": 0.03, "embed_wd": 0.085, "scalar_lr": 0.02, "scalar_wd": 0.02, "beta2": 0.99,
    "grad_clip_norm": 0.3, "ema_decay": 0.9965, "warmdown_frac": 0.85, "min_lr": 0.10, "loop_enable_frac": 0.35,
    "schedule_steps": 4945,  # its seed-42 log: stopped by the cap at step 4,945 on 8×H100
    # CUDA graphs and one graph a micro-batch under DDP (issue 16, bench/README.md, 2×H200): pr2071 253 against
    # 350 ms/step on one GPU (FlashAttention-4's Python interface costs ~0.57 ms of host a call), and 130.5 on
    # two (97 % scaling, against 57 % before); record 974 against 988. Same losses, same peak memory.
    "compile_mode": "reduce-overhead", "ddp_graph": "whole",
}
_RECORD_QUANTIZE = {
    "method": "gptq", "bits": 6, "clip": "sdclip", "attn_k": 13.0, "mlp_k": 11.5, "embed_bits": 7, "embed_k": 14.0,
    "gptq_act_order": True, "lqer_top_k": 3, "lqer_rank": 4, "control_fp16": True,
}
# Phased LoRA TTT (PR #1855). Its global SGD takes 32 sequences per rank per step (256 on 8 GPUs); pgolf's
# ttt_batch_seqs counts a step's sequences over all ranks, so the default 32 is one GPU's share.
_RECORD_TTT = {
    "seq_len": 2048, "ttt": "phased_lora", "ttt_lora_rank": 80, "ttt_lora_alpha": 144.0, "ttt_lora_lr": 1e-4,
    "ttt_beta2": 0.99, "ttt_weight_decay": 0.5, "ttt_lora_chunk_tokens": 48, "ttt_prefix_docs": 2500, "ttt_phases": 3,
    "ttt_global_lr": 1e-3,
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "baseline": {},
    # Small enough to train on a CPU; for tests and the demo (the README gives the demo's run time).
    "tiny": {
        "model": {"num_layers": 4, "model_dim": 128, "num_heads": 4, "num_kv_heads": 2},
        "train": {
            "iterations": 200, "max_wallclock_seconds": 0.0, "warmdown_iters": 60, "warmup_steps": 0,
            "train_batch_tokens": 8192, "train_seq_len": 256, "grad_accum_steps": 1,
            "muon_momentum_warmup_steps": 50, "log_every": 20,
        },
        "calibrate": {"n_batches": 4, "batch_seqs": 8, "seq_len": 256},
        # The tiny matrices (8,192–131,072 weights) would mostly stay float under the reference's 65,536
        # threshold; quantize every matrix, so the demo shows a quantization gap and --bits changes bytes.
        "quantize": {"keep_float_max_numel": 4096},
        "ttt_eval": {"seq_len": 256},
    },
    "record": {
        "tokenize": {"vocab_size": 8192, "caseops": True},
        "model": _RECORD_MODEL,
        "train": _RECORD_TRAIN,
        "calibrate": {"n_batches": 16, "batch_seqs": 48, "seq_len": 2048},
        "quantize": _RECORD_QUANTIZE,
        "ttt_eval": _RECORD_TTT,
    },
    # PR #2071: the record stack with the headwise gated attention (Q widened by one gate row per head,
    # σ gate per head after attention) in place of the sparse gate, EMA 0.990, 196,608-token batches.
    "pr2071": {
        "tokenize": {"vocab_size": 8192, "caseops": True},
        "model": {**_RECORD_MODEL, "sparse_attn_gate": False, "gated_attn_dim": 8},
        # schedule_steps: its step count at these batches is not known here (the record's 4,945 would be wrong)
        "train": {**_RECORD_TRAIN, "train_batch_tokens": 196_608, "ema_decay": 0.990, "schedule_steps": 0},
        "calibrate": {"n_batches": 16, "batch_seqs": 48, "seq_len": 2048},
        "quantize": _RECORD_QUANTIZE,
        "ttt_eval": _RECORD_TTT,
    },
    # PR #398 (03-20 era, SP1024): 11 layers, MLP 3×, the older per-dim SmearGate with BigramHash(2048, 128),
    # OrthoInit, EMA 0.997, Muon WD 0.04, warmdown 3000 steps; int6 blocks + int8 embedding, zstd-22;
    # sliding-window evaluation (stride 64). Settings the issue does not name keep the baseline's values.
    "pr398": {
        "tokenize": {"vocab_size": 1024},
        "model": {"num_layers": 11, "mlp_mult": 3.0, "smear_gate_perdim": True, "bigram_buckets": 2048,
                  "bigram_dim": 128, "ortho_init": True},
        "train": {"train_seq_len": 2048, "train_batch_tokens": 786_432, "muon_wd": 0.04, "ema_decay": 0.997,
                  "warmdown_iters": 3000,
                  # an estimate: PR #371, the same 11-layer stack that week, made ~7,100 steps at ~82 ms/step
                  "schedule_steps": 7100},
        "quantize": {"method": "rtn", "bits": 6, "embed_bits": 8},
        "pack": {"codec": "zstd"},
        "ttt_eval": {"seq_len": 2048, "stride": 64},
    },
}
