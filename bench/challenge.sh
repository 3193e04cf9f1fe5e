#!/usr/bin/env bash
# The challenge-scale run (issue 5): tokenize → train `record` with a 600 s cap → calibrate → quantize
# (int6 GPTQ + LQER, --budget 16000000) → pack → ttt-eval, on NPROC GPUs through torchrun:
#   bash bench/challenge.sh NPROC [CAP_SECONDS]
# A device call lasts at most 10 minutes and this run does not fit one, so the script is re-entrant:
# repeat the same call on the held machine and each call goes on where the last stopped. Training stops
# itself (`train --suspend-after`, the full state saved) before the call's time is up and the next call
# resumes it (`--resume`), so no step is lost or repeated; a call that ends training stops there, and the
# next runs the quantize → pack → ttt-eval chain. "done" in the output means every stage has run.
# Everything but the launcher is the same whatever NPROC is (NPROC=1 runs plain python).
# A CPU dry run: BENCH_LOCAL=1 PRESET=tiny VAL_DOCS=20 bash bench/challenge.sh 1 20 (repeat until "done").
#
# Protocol as bench/gpu_stack.sh: ../shared/corpus carried as .corpus; validation = 600 enwiki_val docs;
# SP8192 + CaseOps trained on the first 1,500 training docs; 3 compile-priming steps (the preset's 20 would
# cost a minute per call and are not training). Packed with the preset's brotli, in 2 MiB chunks so that a
# --budget build takes seconds on the machine's cores. TTT is off: pgolf does not implement it yet.
set -euo pipefail
NPROC=$1
CAP=${2:-600}
CALL_SECONDS=${CALL_SECONDS:-590}  # the device's per-call limit, less a margin
source bench/common.sh
run_folders pgolf-challenge results '*.log' train_log.csv
export TORCHINDUCTOR_CACHE_DIR=$W/inductor  # kept between calls on a held machine
CALL=$(( $(cat "$W/calls" 2>/dev/null || echo 0) + 1 ))
echo "$CALL" > "$W/calls"
{
  echo "call $CALL nproc $NPROC cap $CAP"
  machine_env
} | tee -a "$R/env.txt"

TOK=$W/tok8192c
P=$W/params.yaml
printf 'preset: %s\npack: {codec: brotli, chunk_bytes: 2097152}\nttt_eval: {ttt: none}\n' "${PRESET:-record}" > "$P"
NP=(--params "$P")
CKPT=$W/record.safetensors
LAUNCH=(python3 -m pgolf.cli)
[ "$NPROC" -gt 1 ] && LAUNCH=(torchrun --standalone --nproc_per_node="$NPROC" -m pgolf.cli)

if [ ! -f "$TOK/manifest.json" ]; then
  timed tokenize tokenize_corpus "$TOK" "${NP[@]}" --vocab-size 8192 --caseops \
    --metrics "$R/tokenize_metrics.json" 2>&1 | tee -a "$R/tokenize.log"
fi

if [ ! -f "$CKPT" ]; then
  RESUME=()
  [ -f "$CKPT.resume" ] && RESUME=(--resume)
  # Suspend early enough for the end-of-run evaluation and save, should the cap fall inside this call.
  SUSPEND=$(( CALL_SECONDS - 90 - SECONDS )); [ "$SUSPEND" -ge 0 ] || SUSPEND=0
  timed "train_call$CALL" "${LAUNCH[@]}" train --data "$TOK" --out "$CKPT" "${NP[@]}" --max-wallclock-seconds "$CAP" \
    --set warmup_steps=3 --set log_every=25 --metrics "$R/train_metrics.json" --loss-log "$R/train_log.csv" \
    --suspend-after "$SUSPEND" "${RESUME[@]}" 2>&1 | tee -a "$R/train.log"
  [ -f "$CKPT" ] && echo "training done; call again for quantize → pack → ttt-eval" \
    || echo "training suspended; call again to resume"
  exit 0
fi

H=$W/hessians.safetensors
[ -f "$H" ] || timed calibrate "${LAUNCH[@]}" calibrate "$CKPT" --data "$TOK" --out "$H" "${NP[@]}" \
  --metrics "$R/calibrate_metrics.json" 2>&1 | tee -a "$R/calibrate.log"
# The preset's recipe (int6 GPTQ, SDClip, int7 embedding) with widths 4–8 and LQER chosen per tensor.
timed quantize python3 -m pgolf.cli quantize "$CKPT" --out "$W/q.safetensors" --hessians "$H" --data "$TOK" \
  "${NP[@]}" --set lqer_top_k=0 --budget 16000000 --metrics "$R/quantize_metrics.json" 2>&1 | tee "$R/quantize.log"
timed pack python3 -m pgolf.cli pack "$W/q.safetensors" --data "$TOK" --out "$W/record.pgolf" "${NP[@]}" \
  --metrics "$R/pack_metrics.json" 2>&1 | tee "$R/pack.log"
timed ttt_eval python3 -m pgolf.cli ttt-eval "$W/record.pgolf" --data "$TOK" "${NP[@]}" \
  --metrics "$R/ttt_eval_metrics.json" 2>&1 | tee "$R/ttt_eval.log"
echo done
