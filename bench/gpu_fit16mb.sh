#!/usr/bin/env bash
# Fitting 16 MB (issue 14) on the `pr2071` 240 s checkpoint, in two device calls on one held machine:
#   bash bench/gpu_fit16mb.sh train    # tokenize, train 240 s, calibrate (H and G), the preset's recipe
#   bash bench/gpu_fit16mb.sh budget   # --budget 16000000 with the old (layer) and new (loss) objectives,
#                                      # and the single-tensor downgrade study (bench/sensitivity.py)
#   bash bench/gpu_fit16mb.sh quick    # one call: a 200 s checkpoint, its recipe and --budget 16000000 (loss,
#                                      # widths 5-7) measured and packed with ans, both scored
# Protocol as bench/gpu_stack.sh (../shared/corpus carried as .corpus, 600 val docs, SP8192 CaseOps,
# 3 compile-priming steps). Blobs are packed per group (format 3) with `auto` (each stream's smallest of
# zlib, zstd, brotli, lzma, ans); --budget measures with `ans` alone (fast builds; auto is never larger per
# stream). Results: $OUT/results.json; the recipe's blob comes back as $OUT/recipe.pgolf for the CPU
# codec comparison (bench/codec_bench.py).
set -euo pipefail
PHASE=$1
source bench/common.sh
run_folders pgolf-fit "results_$PHASE"
export TORCHINDUCTOR_CACHE_DIR=$W/inductor
machine_env > "$R/env.txt"
params_file() {  # params_file CODEC: the preset with that pack codec and TTT off
  local f=$W/params_$1.yaml
  printf 'preset: pr2071\npack: {codec: %s}\nttt_eval: {ttt: none}\n' "$1" > "$f"
  echo "$f"
}
AUTO=(--params "$(params_file auto)")
ANS=(--params "$(params_file ans)")
TOK=$W/tok8192c
CKPT=$W/pr2071.safetensors
H=(--hessians "$W/h.safetensors")

pack_and_score() {  # pack_and_score NAME: pack (limit lifted: bytes are reported) and score NAME.safetensors
  timed "pack_$1" $PG pack "$W/$1.safetensors" --data "$TOK" --out "$W/$1.pgolf" "${AUTO[@]}" \
    --set limit=1000000000 --metrics "$R/pack_$1_metrics.json" > "$W/$1.pack.log"
  grep -E "stream|total" "$W/$1.pack.log" || true
  timed "eval_$1" $PG ttt-eval "$W/$1.pgolf" --data "$TOK" "${AUTO[@]}" --metrics "$R/ttt_eval_$1_metrics.json"
}

if [ "$PHASE" = quick ]; then  # fits one 10-minute call: shorter training, a short live-weights check
  timed tokenize tokenize_corpus "$TOK" "${AUTO[@]}" --vocab-size 8192 --caseops --metrics "$R/tokenize_metrics.json"
  timed train $PG train --data "$TOK" --out "$CKPT" "${AUTO[@]}" --max-wallclock-seconds 200 --set warmup_steps=3 \
    --set log_every=100 --set val_tokens=262144 --metrics "$R/train_metrics.json" --loss-log "$R/train_log.csv"
  timed calibrate $PG calibrate "$CKPT" --data "$TOK" --out "$W/h.safetensors" "${AUTO[@]}" \
    --metrics "$R/calibrate_metrics.json"
  for name in recipe budget_loss; do
    args=()
    [ $name = recipe ] || args=(--data "$TOK" --set lqer_top_k=0 --set budget_bits=5,6,7 --budget 16000000)
    timed "quantize_$name" $PG quantize "$CKPT" --out "$W/$name.safetensors" "${ANS[@]}" "${H[@]}" "${args[@]}" \
      --metrics "$R/quantize_${name}_metrics.json" > "$W/$name.quantize.log"
    tail -n 1 "$W/$name.quantize.log"
    timed "pack_$name" $PG pack "$W/$name.safetensors" --data "$TOK" --out "$W/$name.pgolf" "${ANS[@]}" \
      --set limit=1000000000 --metrics "$R/pack_${name}_metrics.json" > "$W/$name.pack.log"
    grep -E "total" "$W/$name.pack.log" || true
    timed "eval_$name" $PG ttt-eval "$W/$name.pgolf" --data "$TOK" "${ANS[@]}" --metrics "$R/ttt_eval_${name}_metrics.json"
  done
elif [ "$PHASE" = train ]; then
  timed tokenize tokenize_corpus "$TOK" "${AUTO[@]}" --vocab-size 8192 --caseops --metrics "$R/tokenize_metrics.json"
  timed train $PG train --data "$TOK" --out "$CKPT" "${AUTO[@]}" --max-wallclock-seconds 240 --set warmup_steps=3 \
    --set log_every=50 --metrics "$R/train_metrics.json" --loss-log "$R/train_log.csv"
  # The output-gradient pass is new: should it fail on the GPU, the recipe still runs on H alone.
  timed calibrate $PG calibrate "$CKPT" --data "$TOK" --out "$W/h.safetensors" "${AUTO[@]}" \
    --metrics "$R/calibrate_metrics.json" || timed calibrate_h_only $PG calibrate "$CKPT" --data "$TOK" \
    --out "$W/h.safetensors" "${AUTO[@]}" --set output_grads=false --metrics "$R/calibrate_metrics.json"
  timed quantize_recipe $PG quantize "$CKPT" --out "$W/recipe.safetensors" "${AUTO[@]}" "${H[@]}" \
    --metrics "$R/quantize_recipe_metrics.json" > "$W/recipe.quantize.log"
  pack_and_score recipe
  cp "$W/recipe.pgolf" "$OUT/recipe.pgolf"
else
  [ -f "$CKPT" ] || { echo "no checkpoint: run the train phase first on this held machine"; exit 1; }
  if [ ! -f "$W/recipe.pgolf" ]; then  # the train call ran out of time before the recipe was scored
    [ -f "$W/recipe.safetensors" ] || timed quantize_recipe $PG quantize "$CKPT" --out "$W/recipe.safetensors" \
      "${AUTO[@]}" "${H[@]}" --metrics "$R/quantize_recipe_metrics.json" > "$W/recipe.quantize.log"
    pack_and_score recipe
    cp "$W/recipe.pgolf" "$OUT/recipe.pgolf"
  fi
  for objective in layer loss; do
    timed "quantize_budget_$objective" $PG quantize "$CKPT" --out "$W/budget_$objective.safetensors" "${ANS[@]}" \
      "${H[@]}" --data "$TOK" --set lqer_top_k=0 --set budget_objective=$objective --budget 16000000 \
      --metrics "$R/quantize_budget_${objective}_metrics.json" > "$W/budget_$objective.quantize.log"
    tail -n 2 "$W/budget_$objective.quantize.log"
    pack_and_score "budget_$objective"
  done
  timed sensitivity python3 bench/sensitivity.py "$CKPT" "$W/h.safetensors" "$W/recipe.safetensors" "$TOK" \
    "$R/sensitivity.json" --bits 4 --val-seqs 128
fi
