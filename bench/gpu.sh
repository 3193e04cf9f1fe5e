#!/usr/bin/env bash
# The GPU benchmark of the pipeline issue, in one device call:
#   bash bench/gpu.sh [NPROC] [CAP_SECONDS] [ITERATIONS] [MAX_SENTENCE_LENGTH]
# (CAP 0 with ITERATIONS N: a fixed-step run, e.g. the reference's 668 steps.)
# Run from the repo root on the GPU machine with `.whl` (constriction, brotli, zstandard, protobuf, pyyaml
# wheels) and `.corpus` (../shared/corpus/*.jsonl.xz) carried; bench/carry.sh makes both. Every stage's
# metrics land in $OUT.
#
# Protocol: SP-BPE 1024 trained on the first 1,500 training docs (challenge settings), validation =
# enwiki_val (600 docs); the `baseline` preset with a wall-clock cap (240 s); then calibrate,
# int8 RTN + zlib (the reference export), int6 RTN + the smallest codec, ttt-eval, verify.
set -euo pipefail
NPROC=${1:-1}
CAP=${2:-240}
ITERS=${3:-20000}
MAX_SENTENCE=${4:-4192}  # SentencePiece's default (the challenge's); 1048576 keeps long docs in tokenizer training
source bench/common.sh
run_folders pgolf-bench results train_log.csv  # metrics merged into one file: the device returns at most 8

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  git rev-parse HEAD 2>/dev/null || true
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
  nproc
} > "$R/env.txt"
cat "$R/env.txt"

if ! grep -q "\"max_sentence_length\": $MAX_SENTENCE," "$W/tok/manifest.json" 2>/dev/null; then
  timed tokenize $PG tokenize .corpus/enwiki_val.jsonl.xz .corpus/enwiki_train.jsonl.xz --out "$W/tok" \
    --params none.yaml --vocab-size 1024 --val-docs 600 --set tokenizer_train_docs=1500 \
    --set max_sentence_length="$MAX_SENTENCE" \
    --metrics "$R/tokenize_metrics.json"
fi

TRAIN_ARGS=(train --data "$W/tok" --out "$W/ckpt.safetensors" --metrics "$R/train_metrics.json"
            --loss-log "$R/train_log.csv" --params none.yaml --preset baseline --max-wallclock-seconds "$CAP" --iterations "$ITERS")
if [ "$NPROC" -gt 1 ]; then
  timed train torchrun --standalone --nproc_per_node="$NPROC" -m pgolf.cli "${TRAIN_ARGS[@]}"
else
  timed train $PG "${TRAIN_ARGS[@]}"
fi

timed calibrate $PG calibrate "$W/ckpt.safetensors" --data "$W/tok" --out "$W/hessians.safetensors" \
  --params none.yaml --metrics "$R/calibrate_metrics.json"

EVAL=(--params none.yaml --seq-len 1024 --stride 0 --val-tokens 0)
timed quantize_int8 $PG quantize "$W/ckpt.safetensors" --bits 8 --out "$W/q8.safetensors" \
  --params none.yaml --metrics "$R/quantize_int8_metrics.json" 
timed pack_int8_zlib $PG pack "$W/q8.safetensors" --data "$W/tok" --codec zlib --out "$W/q8.pgolf" \
  --params none.yaml --metrics "$R/pack_int8_zlib_metrics.json"
timed eval_int8 $PG ttt-eval "$W/q8.pgolf" --data "$W/tok" "${EVAL[@]}" --metrics "$R/ttt_eval_int8_metrics.json"
timed verify_int8 $PG verify "$W/q8.pgolf" --data "$W/tok" --claims "$R/ttt_eval_int8_metrics.json" \
  --params none.yaml --report "$R/verify_int8_metrics.json"

timed quantize_int6 $PG quantize "$W/ckpt.safetensors" --bits 6 --out "$W/q6.safetensors" \
  --params none.yaml --metrics "$R/quantize_int6_metrics.json" 
timed pack_int6_auto $PG pack "$W/q6.safetensors" --data "$W/tok" --codec auto --out "$W/q6.pgolf" \
  --params none.yaml --metrics "$R/pack_int6_auto_metrics.json"
timed eval_int6 $PG ttt-eval "$W/q6.pgolf" --data "$W/tok" "${EVAL[@]}" --metrics "$R/ttt_eval_int6_metrics.json"
