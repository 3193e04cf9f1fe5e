#!/usr/bin/env bash
# Speed side by side (issue 16): the record script (PR #1855) and pgolf's `record` preset, one GPU each of one
# host, the same shards, the same batch geometry, depth recurrence on at the same fraction of the same steps.
# Device calls on one held machine (carry the folders named):
#   bash bench/speed_sidebyside.sh fa4     # twice: carry .fa4/p1a, then .fa4/p1b: FlashAttention-4's CUDA 13
#                                          # libraries (63.6 MB of xz in two halves, bench/fa4_wheels.sh)
#   bash bench/speed_sidebyside.sh run     # carry .fa4/p2 .corpus .whl .anchors: install FA4, tokenize, then
#                                          # GPU 0: the record script's step (bench/speed_record.py), then JOBS0;
#                                          # GPU 1: the pgolf jobs of JOBS1 — each job one `pgolf train`
#   bash bench/speed_sidebyside.sh scale   # the same machine: pgolf under torchrun on 2 GPUs (JOBS2)
#   bash bench/speed_sidebyside.sh profile # the same machine, after `run` (its FA4 and tokens): kernel time by
#                                          # kind, the record script on GPU 0 and pgolf's record_fast on GPU 1 at
#                                          # once (device time, which the shared host does not change), both
#                                          # with depth recurrence on, PROFILE_STEPS (3) profiled steps each;
#                                          # PGOLF_VARIANT=NAME profiles that commit's pgolf (bench/variant.sh)
# A job is NAME:PRESET:SETS[:VARIANT] (SETS comma-separated KEY=VALUE for `pgolf train --set`; VARIANT another
# commit's pgolf from bench/variant.sh, carried in .variant); a job starts only while the call has JOB_SECONDS
# left, so a call ends inside the device's 10 minutes with what finished.
# STEPS timed steps (default 60, depth recurrence from half-way), 3 compile-priming steps per depth mode.
# A CPU dry run of the plumbing (tokenize, queues, variants; no FA4, no record script), here, about 4 minutes:
#   BENCH_LOCAL=1 OUT=/tmp/dry STEPS=20 JOBS0=" " JOBS1="tiny_a:tiny:vocab_size=8192
#     tiny_b:tiny:vocab_size=8192:VARIANT" bash bench/speed_sidebyside.sh run
set -euo pipefail
PHASE=$1
STEPS=${STEPS:-60}
source bench/common.sh
run_folders pgolf-speed "results_$PHASE" 'speed_*.json' '*_loss.csv' 'trace_*' 'profile_*.json' '*.log'
machine_env > "$R/env.txt"
START=$(date +%s)
BUDGET=${BUDGET:-560}  # seconds this call may use
export TORCHINDUCTOR_CACHE_DIR=$W/inductor TRITON_CACHE_DIR=$W/triton  # kept between calls on a held machine
if [ "$PHASE" = fa4 ]; then fa4_unpack_half; exit 0; fi
fa4_install
python3 - <<'EOF' 2>&1 | grep -v Warning | tee "$R/fa4_check.txt" || echo "the FA4 check failed"
# FA4 through pgolf's custom op against SDPA with the dense document mask: forward and gradients, bf16.
import torch, torch.nn.functional as F
from pgolf.nn.attention import document_mask, segments_of, varlen_bthd
torch.manual_seed(0)
B, H, Hkv, T, D = 4, 8, 4, 2048, 64
ids = torch.randint(2, 100, (B, T), device="cuda"); ids[ids < 4] = 1  # BOS = 1, ~2 % of positions
q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=document_mask(ids, 1), enable_gqa=True)
out = varlen_bthd(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), segments_of(ids, 1)).transpose(1, 2)
g = torch.randn_like(ref)
gr = torch.autograd.grad(ref, (q, k, v), g)
go = torch.autograd.grad(out.float(), (q, k, v), g)
print("fa4 vs fp32 dense: max |dout|", (out.float() - ref).abs().max().item(),
      "max |dq|,|dk|,|dv|", [round((a.float() - b.float()).abs().max().item(), 4) for a, b in zip(go, gr)],
      "bf16 sdpa |dout|", (F.scaled_dot_product_attention(q, k, v, attn_mask=document_mask(ids, 1), enable_gqa=True).float() - ref).abs().max().item())
EOF

ANCHOR=$PWD/.anchors/record_1855
TOK=$W/tok
if [ ! -f "$TOK/manifest.json" ]; then
  timed tokenize tokenize_corpus "$TOK" --params none.yaml --vocab-size 8192 --caseops \
    --tokenizer "$ANCHOR/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model" \
    --metrics "$R/tokenize_metrics.json"
fi

variant_path() {  # variant_path NAME JOB: the PYTHONPATH that imports bench/variant.sh's NAME first (none: as
  # is); the variant's commit and patch go into the results as variant_JOB.json
  [ -z "$1" ] && { echo "$PYTHONPATH"; return 0; }
  [ -d ".variant/$1/pgolf" ] || { echo "no .variant/$1: run bash bench/variant.sh REV here, carry .variant" >&2; return 1; }
  cp ".variant/$1/variant.json" "$R/variant_$2.json"
  echo "$PWD/.variant/$1:$PYTHONPATH"
}

pgolf_job() {  # pgolf_job GPUS NAME PRESET SETS [VARIANT]: one `pgolf train` of STEPS fixed steps, loss/time
  # every 10 steps; with VARIANT, that commit's pgolf (bench/variant.sh)
  local gpus=$1 name=$2 preset=$3 sets=$4 variant=${5:-} nproc launcher pypath
  pypath=$(variant_path "$variant" "$name") || return 1
  nproc=$(awk -F, '{print NF}' <<< "$gpus")
  launcher="$PG"
  [ "$nproc" -gt 1 ] && launcher="torchrun --standalone --nproc_per_node=$nproc -m pgolf.cli"
  local extra=()
  IFS=, read -ra kv <<< "$sets"
  for s in "${kv[@]}"; do [ -n "$s" ] && extra+=(--set "$s"); done
  printf 'preset: %s\n' "$preset" > "$W/params_$name.yaml"
  # the job's preset and settings for bench/speed_summary.py (a variant's commit is variant_NAME.json)
  printf '{"preset": "%s", "sets": "%s", "gpus": "%s"}\n' "$preset" "$sets" "$gpus" > "$R/speed_job_$name.json"
  PYTHONPATH=$pypath CUDA_VISIBLE_DEVICES=$gpus timed "pgolf_$name" $launcher train --data "$TOK" --out "$W/$name.safetensors" \
    --params "$W/params_$name.yaml" --set iterations="$STEPS" --set max_wallclock_seconds=0 --set warmup_steps=3 \
    --set log_every=10 --set loop_enable_frac=0.5 --set val_tokens=262144 "${extra[@]}" \
    --metrics "$R/speed_pgolf_$name.json" --loss-log "$R/${name}_loss.csv" 2>&1 | grep -v Warning | tail -n 8
}

run_queue() {  # run_queue GPUS JOB...: jobs one after another while time is left
  local gpus=$1; shift
  for job in "$@"; do
    local left; left=$(seconds_left)
    if [ "$left" -lt "${JOB_SECONDS:-240}" ]; then echo "skip $job: ${left}s left"; continue; fi
    IFS=: read -r name preset sets variant <<< "$job"
    if [ "$name" = record_script ]; then
      record_job "$gpus"
    else
      pgolf_job "$gpus" "$name" "$preset" "$sets" "$variant" || echo "job $name failed"
    fi
  done
}

record_job() {  # the record script's step on one GPU, its settings as its README runs it (TTT and GPTQ aside)
  (
    export DATA_DIR=$W/recdata DATA_PATH=$W/recdata/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved
    export TOKENIZER_PATH=$TOK/tokenizer.model ARTIFACT_DIR=$W/recrun RUN_ID=speed VOCAB_SIZE=8192 CASEOPS_ENABLED=1
    export ITERATIONS=$STEPS MAX_WALLCLOCK_SECONDS=0 MATRIX_LR=0.026 MIN_LR=0.1 GRAD_CLIP_NORM=0.3 WARMUP_STEPS=3
    export MUON_BACKEND_STEPS=5 WARMDOWN_FRAC=0.85 BETA2=0.99 SPARSE_ATTN_GATE_SCALE=0.5 GATED_ATTN_QUANT_GATE=1
    export SPARSE_ATTN_GATE_ENABLED=1 GATE_WINDOW=12 SMEAR_GATE_ENABLED=1 FUSED_CE_ENABLED=1 SEED=42 TTT_ENABLED=0
    export PYTHONPATH="$PWD/bench/fa3_on_fa4:$PWD/bench:$PYTHONPATH"
    mkdir -p "$DATA_PATH" "$ARTIFACT_DIR"
    ln -sf "$TOK"/fineweb_*.bin "$DATA_PATH/"
    CUDA_VISIBLE_DEVICES=$1 timed record_script python3 bench/speed_record.py --script "$ANCHOR/train_gpt.py" \
      --steps "$STEPS" --loop-frac 0.5 --profile-steps "${PROFILE_STEPS:-0}" --out "$R/speed_record.json" 2>&1 |
      grep -v Warning | tail -n 12
  ) || echo "record job failed"
}

if [ "$PHASE" = run ]; then
  read -ra Q0 <<< "${JOBS0:-record_script pr2071_fast:pr2071:attn_backend=fa4,fused_ce=true}"
  read -ra Q1 <<< "${JOBS1:-record_fast:record:attn_backend=fa4,fused_ce=true record_flex:record:attn_backend=auto}"
  run_queue 0 "${Q0[@]}" > "$R/queue0.log" 2>&1 &
  run_queue 1 "${Q1[@]}" > "$R/queue1.log" 2>&1 &
  wait
  cat "$R/queue0.log" "$R/queue1.log"
elif [ "$PHASE" = profile ]; then
  # both sides profiled after the loop switch; the record script's trace is $R/trace_record_script.json.gz
  export PROFILE_STEPS=${PROFILE_STEPS:-3} STEPS=${PROFILE_TIMED_STEPS:-10}
  record_job 0 > "$R/queue0.log" 2>&1 &
  pypath=$(variant_path "${PGOLF_VARIANT:-}" record_fast)
  PYTHONPATH=$pypath CUDA_VISIBLE_DEVICES=1 \
    timeout "$(seconds_left)" python3 bench/step_profile.py \
    --preset record --data "$TOK" --out "$R" --tag _record_fast --steps 5 --profile-steps "$PROFILE_STEPS" \
    --set attn_backend=fa4 --set fused_ce=true > "$R/queue1.log" 2>&1 &
  wait
  grep -v Warning "$R/queue0.log" | tail -n 5; grep -v Warning "$R/queue1.log" | tail -n 2
  python3 - "$R" <<'EOF' || true
import json, sys
from pathlib import Path
r = Path(sys.argv[1])
script = json.loads((r / "speed_record.json").read_text()).get("profile", {}).get("trace", {})
pgolf = json.loads((r / "profile_1gpu_record_fast.json").read_text())["profile"]["trace"]
for side, t in (("record script", script), ("pgolf record_fast", pgolf)):
    print(side, t.get("kernels_busy_ms_per_step"), t.get("kernel_ms_per_step_by_kind"))
EOF
else  # scale
  read -ra Q2 <<< "${JOBS2:-record_fast_2gpu:record:attn_backend=fa4,fused_ce=true pr2071_fast_2gpu:pr2071:attn_backend=fa4,fused_ce=true}"
  run_queue 0,1 "${Q2[@]}"
fi
python3 bench/speed_summary.py "$R" --out "$R/speed_summary.json" || true
