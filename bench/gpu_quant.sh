#!/usr/bin/env bash
# Quantization schemes on one trained checkpoint, in one device call:
#   bash bench/gpu_quant.sh [ITERATIONS]
# Tokenizes ../shared/corpus (carried as .corpus) as bench/gpu.sh does, trains the `baseline` preset for
# ITERATIONS fixed steps, calibrates once, then quantizes → packs → scores each scheme. Results: $OUT/results.json.
set -euo pipefail
ITERS=${1:-400}
source bench/common.sh
run_folders pgolf-quant
NP=(--params none.yaml)
{ date -u +%Y-%m-%dT%H:%M:%SZ; nvidia-smi --query-gpu=name --format=csv,noheader; } > "$R/env.txt"

timed tokenize $PG tokenize .corpus/enwiki_val.jsonl.xz .corpus/enwiki_train.jsonl.xz --out "$W/tok" "${NP[@]}" \
  --vocab-size 1024 --val-docs 600 --set tokenizer_train_docs=1500 --set max_sentence_length=1048576 \
  --metrics "$R/tokenize_metrics.json"
timed train $PG train --data "$W/tok" --out "$W/ckpt.safetensors" "${NP[@]}" --preset baseline \
  --max-wallclock-seconds 0 --iterations "$ITERS" --set warmdown_iters="$ITERS" \
  --metrics "$R/train_metrics.json" --loss-log "$W/loss.csv"
timed calibrate $PG calibrate "$W/ckpt.safetensors" --data "$W/tok" --out "$W/h.safetensors" "${NP[@]}" \
  --metrics "$R/calibrate_metrics.json"

scheme() {  # scheme NAME CODEC QUANTIZE-ARGS...
  local name=$1 codec=$2; shift 2
  timed "quantize_$name" $PG quantize "$W/ckpt.safetensors" --out "$W/$name.safetensors" "${NP[@]}" \
    --metrics "$R/quantize_${name}_metrics.json" "$@" > "$W/$name.quantize.log"
  timed "pack_$name" $PG pack "$W/$name.safetensors" --data "$W/tok" --codec "$codec" --out "$W/$name.pgolf" \
    "${NP[@]}" --metrics "$R/pack_${name}_metrics.json" > /dev/null
  timed "eval_$name" $PG ttt-eval "$W/$name.pgolf" --data "$W/tok" "${NP[@]}" --seq-len 1024 \
    --metrics "$R/ttt_eval_${name}_metrics.json"
}
H=(--hessians "$W/h.safetensors")
scheme int8_rtn zlib --bits 8
scheme int6_rtn zlib --bits 6 "${H[@]}"
scheme int6_gptq zlib --bits 6 --method gptq --clip sdclip "${H[@]}"
scheme int6_gptq_lqer zlib --bits 6 --method gptq --clip sdclip --lqer-top-k 3 --set lqer_weighted=true "${H[@]}"
