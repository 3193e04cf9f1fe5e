#!/usr/bin/env bash
# Test-time training on a trained, packed blob (issue 13's benchmark) on one GPU, in two calls on one held
# machine (each under the device's 10-minute limit):
#   bash bench/gpu_ttt.sh train   # tokenize; train pr2071 for CAP (240) s; calibrate; quantize with the
#                                 # preset's recipe (int6 GPTQ, SDClip, int7 embedding, LQER); pack; score (none)
#   bash bench/gpu_ttt.sh eval    # the same blob: sliding windows (stride 64), score-first TTT
#   MODES="lora phased" VAL_TOKENS=1000000 bash bench/gpu_ttt.sh eval   # other modes (none sliding
#                                 # score_first score_first_sliding lora phased train_then_score), on the
#                                 # first N targets only; EXTRA="--stride 0" adds options to every eval;
#                                 # NPROC=2 runs the evals under torchrun on 2 GPUs
#   PRESET=pr398 TOKARGS="--vocab-size 1024" EXTRA="--stride 0" bash bench/gpu_ttt.sh train   # PR #398's stack
# `train` also returns the blob (in 15 MiB parts) and the validation data under $OUT, so that `eval` can run
# on a fresh machine from them (carried as .ttt) if the first one was given back in between.
#
# Protocol as bench/gpu_stack.sh: ../shared/corpus carried as .corpus; validation = enwiki_val (600 docs);
# SP8192 + CaseOps trained on the first 1,500 training docs (long docs kept); 3 compile-priming steps.
# Packed with zlib (fast; the eval does not depend on the codec). A CPU dry run:
#   BENCH_LOCAL=1 CAP=20 VAL_DOCS=20 PRESET=tiny bash bench/gpu_ttt.sh train && BENCH_LOCAL=1 bash bench/gpu_ttt.sh eval
set -euo pipefail
STEP=$1
CAP=${CAP:-240}
PRESET=${PRESET:-pr2071}
source bench/common.sh
run_folders pgolf-ttt
export TORCHINDUCTOR_CACHE_DIR=$W/inductor
{ echo "step $STEP preset $PRESET cap $CAP"; machine_env; } | tee -a "$R/env.txt"

P=$W/params.yaml
printf 'preset: %s\npack: {codec: zlib}\nttt_eval: {ttt: none, device: auto}\n' "$PRESET" > "$P"
NP=(--params "$P")
TOK=$W/tok
BLOB=$W/model.pgolf

if [ "$STEP" = train ]; then
  # shellcheck disable=SC2086  # TOKARGS is a list of options
  timed tokenize tokenize_corpus "$TOK" "${NP[@]}" ${TOKARGS:---vocab-size 8192 --caseops} --metrics "$R/tokenize_metrics.json"
  timed train $PG train --data "$TOK" --out "$W/ckpt.safetensors" "${NP[@]}" --max-wallclock-seconds "$CAP" \
    --set warmup_steps=3 --set log_every=50 --metrics "$R/train_metrics.json" --loss-log "$R/train_log.csv"
  timed calibrate $PG calibrate "$W/ckpt.safetensors" --data "$TOK" --out "$W/h.safetensors" "${NP[@]}" \
    --metrics "$R/calibrate_metrics.json"
  timed quantize $PG quantize "$W/ckpt.safetensors" --hessians "$W/h.safetensors" --data "$TOK" \
    --out "$W/q.safetensors" "${NP[@]}" --metrics "$R/quantize_metrics.json"
  timed pack $PG pack "$W/q.safetensors" --data "$TOK" --out "$BLOB" "${NP[@]}" --limit 1000000000 \
    --metrics "$R/pack_metrics.json"
  # shellcheck disable=SC2086
  timed eval_none $PG ttt-eval "$BLOB" --data "$TOK" "${NP[@]}" ${EXTRA:-} --metrics "$R/eval_none_metrics.json"
  split -b 15M "$BLOB" "$OUT/blob.part-"  # back to this machine: the eval can run on a fresh one
  cp "$TOK"/fineweb_val_000000.bin "$TOK"/fineweb_val_bytes_000000.bin "$TOK"/tokenizer.model "$TOK"/manifest.json "$OUT/"
  exit 0
fi

if [ ! -f "$BLOB" ]; then  # a fresh machine: the blob and the validation data carried back as .ttt
  echo "no blob from the train call on this machine: using the carried .ttt"
  mkdir -p "$TOK" && cp .ttt/fineweb_val_* .ttt/tokenizer.model .ttt/manifest.json "$TOK/"
  cat .ttt/blob.part-* > "$BLOB"
fi
SF=(--set ttt=score_first --set ttt_lr=0.005 --set ttt_chunk_tokens=32768 --set ttt_epochs=3)
# phased: the record's settings (PR #1855: 3 pauses, global SGD lr 1e-3), with the pauses' document counts
# scaled to this validation set (PREFIX_DOCS documents in all, 2,500 of 50,000 in the record)
PH=(--set ttt=phased_lora --set ttt_phases=3 --set ttt_global_lr=0.001 --set "ttt_prefix_docs=${PREFIX_DOCS:-192}")
LAUNCH=($PG)
if [ "${NPROC:-1}" -gt 1 ]; then LAUNCH=(python3 -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m pgolf.cli); fi
for mode in ${MODES:-sliding score_first}; do
  case $mode in
    none) ARGS=() ;;
    sliding) ARGS=(--stride 64) ;;
    score_first) ARGS=("${SF[@]}") ;;
    score_first_sliding) ARGS=("${SF[@]}" --stride 64) ;;
    lora) ARGS=(--set ttt=lora) ;;  # the defaults: rank 80, α 144, chunks of 48, AdamW 1e-4, 64 documents
    phased) ARGS=("${PH[@]}") ;;
    # PR #398's protocol, flagged: 20 epochs over the validation tokens (SGD as score_first's), then scoring
    train_then_score) ARGS=(--set ttt=train_then_score --set ttt_epochs=20 --set ttt_lr=0.005) ;;
  esac
  name="eval_${mode}${VAL_TOKENS:+_$VAL_TOKENS}${NPROC:+_np$NPROC}"
  # shellcheck disable=SC2086
  timed "$name" "${LAUNCH[@]}" ttt-eval "$BLOB" --data "$TOK" "${NP[@]}" "${ARGS[@]}" ${EXTRA:-} \
    --val-tokens "${VAL_TOKENS:-0}" --metrics "$R/${name}_metrics.json" 2>&1 | grep -v "^\[rank" | tee "$R/$name.log"
done
echo done
