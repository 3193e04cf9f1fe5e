#!/usr/bin/env bash
# Issue 18's ablation table: rows of bench/seed_studies.tsv, one lane a GPU, in one device call (carry .corpus .whl):
#   bash bench/seed_studies.sh "pr2071_base kmeans" "pr398_base gradient_bits"
# A lane runs its rows one after another on its GPU (the first lane on GPU 0, the second on GPU 1). A row
# starts only while the call has the seconds it needs left (BUDGET, default 560; a train row 540, a quantize
# row 150, an eval row 120), and every command stops at BUDGET, so a call ends inside the device's 10 minutes
# and returns what finished (a row cut short is reported failed).
# - train rows: `pgolf train` of the base preset with the base row's overrides, then the row's own, capped at
#   240 s; then the base preset's own quantization (pr2071: calibrate + its GPTQ/LQER recipe; pr398: int6 RTN,
#   int8 embedding), pack with the preset's codec (size limit lifted: bytes are reported), ttt-eval (TTT off:
#   pr2071's phased LoRA TTT alone takes about 45 minutes on one H200; all 600 docs);
# - quantize rows: the base row's checkpoint (and Hessians) quantized with the overrides, packed, scored;
# - eval rows: the base row's blob scored with the overrides, and with them but ngram_mix none, on the first
#   EVAL_TOKENS val tokens.
# quantize and eval rows need their base's train row earlier in this call or in an earlier call on the same
# held machine (its files stay in /tmp/pgolf-studies). A pr2071 train row beside another lane does not finish in
# one call (2026-11-30, on 2 GPUs: `pgolf train` about 480 s, 240 of them training, the rest compiling,
# validating, saving; then calibrate 65, quantize 30, pack 88, eval 27 s); alone on one H200 it did (2026-12-01:
# 403-524 s in all). With RESUME=1 a row trained with less than 240 s left is not scored (it is
# reported `trained`), and a train row whose checkpoint an earlier call on this machine wrote is not retrained:
# its quantization and scoring run (a row needs 240 s then). So calls with RESUME=1 finish it. A training that
# would outlast the call (s4d2, 2026-12-01: its first step came about 400 s into the call) saves its state and
# stops SUSPEND_MARGIN s before the budget (`train --suspend-after`; reported `suspended`), and the next RESUME=1
# call goes on with it (`--resume`: no step lost or repeated), then scores it if time is left. Protocol as
# bench/gpu_stack.sh: ../shared/corpus carried as .corpus, 600 validation docs, SP1024 for pr398 and SP8192
# CaseOps for pr2071, 3 compile-priming steps. Train's own closing validation reads 262,144 tokens only; a row's
# BPB is its quantized blob's.
# Results: $OUT/results.json (every metrics file, keyed ROW_STAGE_metrics) and $OUT/files.tgz (the rows' logs);
# bench/seed_studies_summary.py turns them into the table.
set -uo pipefail
source bench/common.sh
run_folders pgolf-studies results '*_loss.csv' '*.log'
export BUDGET=${BUDGET:-560} START=$(date +%s) EVAL_TOKENS=${EVAL_TOKENS:-500000}
# seconds to score a trained pr2071 row (2026-11-30: calibrate 65, quantize 30, pack 88, eval 27 s) with room
SCORE_NEEDS=${SCORE_NEEDS:-240}
# a train row stops SUSPEND_MARGIN s before the budget, its state saved; under RESUME=1 a train row, new or
# suspended, starts only with RESUME_NEEDS s left (a pr2071 base row took 411 s in all, 240 of them training)
SUSPEND_MARGIN=${SUSPEND_MARGIN:-25} RESUME_NEEDS=${RESUME_NEEDS:-300}
# a CPU dry run of the plumbing (BENCH_LOCAL=1 VAL_DOCS=4 CAP=5 DRY_SETS=model.num_layers=2,...): extra train sets
# and calibrate sets (DRY_CALIBRATE_SETS=n_batches=2,batch_seqs=2)
DRY=() DRY_CAL=()
IFS=, read -ra dry <<< "${DRY_SETS:-}"
for s in "${dry[@]}"; do DRY+=(--set "$s"); done
IFS=, read -ra dry <<< "${DRY_CALIBRATE_SETS:-}"
for s in "${dry[@]}"; do DRY_CAL+=(--set "$s"); done
machine_env > "$R/env.txt"

pg() {  # pg ARGS...: a pgolf command, stopped when the call's BUDGET is spent
  local left; left=$(seconds_left)
  [ "$left" -gt 5 ] || { echo "pgolf $1: no time left"; return 124; }
  timeout "$left" $PG "$@"
}

field() {  # field ROW COLUMN: one cell of the row table (COLUMN by its header name)
  awk -F'\t' -v r="$1" -v c="$2" '/^#/ { next } !n++ { for (i = 1; i <= NF; i++) col[$i] = i; next }
    $1 == r { print $col[c] }' bench/seed_studies.tsv
}

tokenized() {  # tokenized BASE: the base's tokenized corpus (made once per machine)
  local base=$1 tok args
  case $base in
    pr2071) tok=$W/tok8192c; args=(--vocab-size 8192 --caseops) ;;
    *) tok=$W/tok1024; args=(--vocab-size 1024 --no-caseops) ;;
  esac
  # one lane tokenizes, the other waits for it
  if mkdir "$tok.lock" 2>/dev/null; then
    [ -f "$tok/manifest.json" ] || tokenize_corpus "$tok" --params none.yaml "${args[@]}" \
      --metrics "$R/tokenize_${base}_metrics.json" > "$W/tokenize_$base.log" 2>&1 || touch "$tok.failed"
  else
    while [ ! -f "$tok/manifest.json" ] && [ ! -f "$tok.failed" ]; do sleep 2; done
  fi
  echo "$tok"
}

sets() {  # sets OVERRIDES: "--set k=v" for each of the ;-separated overrides ("-": none)
  local o=$1
  [ "$o" = - ] && return 0
  o=${o//BASE_CKPT/$W/$(field "$ROW" base)_base.safetensors}
  IFS=';' read -ra kv <<< "$o"
  for s in "${kv[@]}"; do printf -- '--set\n%s\n' "$s"; done
}

score() {  # score NAME QUANTIZED: pack NAME's quantized weights and score the blob
  local name=$1 q=$2
  pg pack "$q" --data "$TOK" --out "$W/$name.pgolf" "${NP[@]}" --set limit=1000000000 \
    --metrics "$R/${name}_pack_metrics.json" > "$W/${name}_pack.log" 2>&1 &&
  pg ttt-eval "$W/$name.pgolf" --data "$TOK" "${NP[@]}" --metrics "$R/${name}_eval_metrics.json" \
    > "$W/${name}_eval.log" 2>&1
}

quantize() {  # quantize NAME CKPT OVERRIDES...: the base preset's quantization of CKPT (+ overrides), then score
  local name=$1 ckpt=$2 h=(); shift 2
  if [ "$BASE" = pr2071 ] || [[ " $* " == *gradient_bits* ]]; then
    [ -f "${ckpt%.safetensors}.h.safetensors" ] || pg calibrate "$ckpt" --data "$TOK" \
      --out "${ckpt%.safetensors}.h.safetensors" "${NP[@]}" "${DRY_CAL[@]}" --metrics "$R/${name}_calibrate_metrics.json" \
      > "$W/${name}_calibrate.log" 2>&1
    h=(--hessians "${ckpt%.safetensors}.h.safetensors")
  fi
  pg quantize "$ckpt" --out "$W/$name.q.safetensors" "${NP[@]}" "${h[@]}" --data "$TOK" "$@" \
    --metrics "$R/${name}_quantize_metrics.json" > "$W/${name}_quantize.log" 2>&1 && score "$name" "$W/$name.q.safetensors"
}

resumed() {  # resumed ROW: RESUME=1 and the train row's checkpoint is already on this machine (trained, saved)
  [ -n "${RESUME:-}" ] && [ -f "$R/${1}_train_metrics.json" ]
}

suspended() {  # suspended CKPT: a training toward CKPT saved its state and stopped (train --suspend-after)
  [ -f "$1.resume" ]
}

run_row() {
  ROW=$1 BASE=$(field "$1" base)
  local stage over
  stage=$(field "$ROW" stage) over=$(field "$ROW" overrides)
  case $stage in train|quantize|eval) ;; *) echo "$ROW: not a row of bench/seed_studies.tsv"; return 1 ;; esac
  TOK=$(tokenized "$BASE")
  printf 'preset: %s\nttt_eval: {ttt: none}\n' "$BASE" > "$W/params_$BASE.yaml"
  NP=(--params "$W/params_$BASE.yaml")
  # a train row is its base's run plus the row's change: the base row's overrides (pr398's schedule_scale=auto)
  # come first. On 2026-11-30 three pr398 rows trained without them, 3,000-step warmdown and all, and scored
  # 1.85-1.88 BPB against the base's 1.29.
  local inherited=-
  [ "$stage" = train ] && [ "$ROW" != "${BASE}_base" ] && inherited=$(field "${BASE}_base" overrides)
  mapfile -t S < <(sets "$inherited"; sets "$over")
  case $stage in
    train)
      local ckpt=$W/$ROW.safetensors again=()  # a base row's is the BASE_CKPT of the rows on it
      if resumed "$ROW"; then quantize "$ROW" "$ckpt"; return; fi
      if [ -n "${RESUME:-}" ] && suspended "$ckpt"; then
        again=(--resume)
      else  # an earlier call's Hessians, suspended state and log belong to an earlier run
        rm -f "${ckpt%.safetensors}.h.safetensors" "$ckpt.resume"
        : > "$W/${ROW}_train.log"
      fi
      # training saves its state and stops SUSPEND_MARGIN s before the budget ends; RESUME=1 goes on from there
      local suspend=$(( $(seconds_left) - SUSPEND_MARGIN ))
      pg train --data "$TOK" --out "$ckpt" "${NP[@]}" --max-wallclock-seconds "${CAP:-240}" --set warmup_steps=3 \
        --set log_every=50 --set val_tokens=262144 "${S[@]}" "${DRY[@]}" --metrics "$R/${ROW}_train_metrics.json" \
        --suspend-after $(( suspend > 1 ? suspend : 1 )) "${again[@]}" \
        --loss-log "$R/${ROW}_loss.csv" >> "$W/${ROW}_train.log" 2>&1 || return 1
      if suspended "$ckpt"; then return 4; fi
      # under RESUME=1 a row trained too late to be scored in this call is scored by the next one
      if [ -n "${RESUME:-}" ] && [ "$(seconds_left)" -lt "$SCORE_NEEDS" ]; then return 3; fi
      quantize "$ROW" "$ckpt" ;;
    quantize)
      quantize "$ROW" "$W/${BASE}_base.safetensors" "${S[@]}" ;;
    eval)
      for name in "${ROW}_plain" "$ROW"; do  # the plain score: the same overrides, the mixing off
        local extra=("${S[@]}")
        [ "$name" = "$ROW" ] || extra+=(--set ngram_mix=none)
        pg ttt-eval "$W/${BASE}_base.pgolf" --data "$TOK" "${NP[@]}" --val-tokens "$EVAL_TOKENS" "${extra[@]}" \
          --metrics "$R/${name}_eval_metrics.json" > "$W/${name}_eval.log" 2>&1 || return 1
      done ;;
  esac
}

lane() {  # lane GPU ROW...: the rows in order on one GPU, each only while its time is left
  local gpu=$1; shift
  export CUDA_VISIBLE_DEVICES=$gpu TORCHINDUCTOR_CACHE_DIR=$W/inductor$gpu TRITON_CACHE_DIR=$W/triton$gpu
  for row in "$@"; do
    local stage need left t0
    stage=$(field "$row" stage)
    # seconds a row needs, as measured on 2026-11-30 (a quantize row of pr398 with its calibrate: 232 s)
    case $stage in train) need=540 ;; quantize) need=150 ;; *) need=120 ;; esac
    # under RESUME=1 a train row may start with less: what it cannot finish, it suspends, and the next call goes on
    if [ "$stage" = train ] && [ -n "${RESUME:-}" ]; then need=$RESUME_NEEDS; fi
    if [ "$stage" = train ] && resumed "$row"; then need=$SCORE_NEEDS; fi
    left=$(seconds_left)
    if [ "$left" -lt "$need" ]; then echo "gpu $gpu: skip $row (${left}s left, needs ${need})"; continue; fi
    t0=$(date +%s)
    run_row "$row"
    case $? in 0) status=ok ;; 3) status="trained (too little time left to score it: run the next call with RESUME=1)" ;;
      4) status="suspended (its training state is saved: run the next call with RESUME=1)" ;;
      *) status=failed ;; esac
    echo "$row $(( ($(date +%s) - t0) * 1000 ))" >> "$R/times.txt"
    echo "gpu $gpu: $row $status in $(( $(date +%s) - t0 )) s"
    [ "$status" = failed ] && tail -n 5 "$W/${row}"_*.log
  done
}

gpu=0
for rows in "$@"; do
  read -ra list <<< "$rows"
  lane $gpu "${list[@]}" &
  gpu=$((gpu + 1))
done
wait
for f in "$W"/*_train.log; do cp "$f" "$R/" 2>/dev/null; done
grep -h "val_bpb" "$W"/*_eval.log 2>/dev/null | tail -n 20
