#!/usr/bin/env bash
# The `baseline` preset against the challenge's baseline script (issue 15), step by step, in one device call
# (carry .corpus, .whl and .anchors, a copy of ../shared/anchors):
#   bash bench/baseline_steps.sh [STEPS]   # default 668, the reference's step count under the 240 s cap
# Same shards (SP-1024, tokenizer trained on the first 1,500 docs, long documents kept), same seed, a fixed
# step count with no wall-clock cap (step-based LR schedule in both), the train loss logged every step.
# With two GPUs the runs go side by side (GPU 0: the script, GPU 1: pgolf); with one, one after the other.
# bench/baseline_steps.py then lines the losses up and finds where they part.
set -euo pipefail
STEPS=${1:-668}
source bench/common.sh
run_folders pgolf-bs
machine_env > "$R/env.txt"
TOK=$W/tok
ROOT=$PWD
[ -f "$TOK/manifest.json" ] || timed tokenize tokenize_corpus "$TOK" --params none.yaml --vocab-size 1024 \
  --metrics "$R/tokenize_metrics.json"
REF=$W/refdata  # the script's glob fineweb_val_*.bin would take pgolf's byte sidecar too: tokens only
mkdir -p "$REF"
ln -sf "$TOK"/fineweb_train_*.bin "$REF/"
for f in "$TOK"/fineweb_val_[0-9]*.bin; do ln -sf "$f" "$REF/"; done
GPUS=$(nvidia-smi -L | wc -l)
reference() {
  (cd "$W" && CUDA_VISIBLE_DEVICES=0 DATA_PATH="$REF" TOKENIZER_PATH="$TOK/tokenizer.model" VOCAB_SIZE=1024 \
    RUN_ID=reference ITERATIONS="$STEPS" MAX_WALLCLOCK_SECONDS=0 TRAIN_LOG_EVERY=1 VAL_LOSS_EVERY=0 \
    python3 "$ROOT/.anchors/baseline/train_gpt.py" > "$W/reference.out" 2>&1)
}
ours() {
  CUDA_VISIBLE_DEVICES=$(( GPUS > 1 ? 1 : 0 )) $PG train --data "$TOK" --out "$W/ckpt.safetensors" --params none.yaml \
    --preset baseline --max-wallclock-seconds 0 --iterations "$STEPS" --set log_every=1 \
    --loss-log "$R/pgolf_loss.csv" --metrics "$R/train_metrics.json" > "$W/pgolf.out" 2>&1
}
if [ "$GPUS" -gt 1 ]; then
  reference & ours & wait
else
  timed reference reference
  timed pgolf ours
fi
tail -n 5 "$W/reference.out" "$W/pgolf.out"
cp "$W/logs/reference.txt" "$OUT/reference.log"
python3 bench/baseline_steps.py "$W/logs/reference.txt" "$R/pgolf_loss.csv" "$R/train_report.json" \
  --out "$R/steps.json"
