#!/usr/bin/env bash
# The record (PR #1855) against pgolf's `record` model on the same weights (issue 15): two device calls
# on one held machine, then a third on any (carry .corpus, .whl and .anchors):
#   bash bench/record_fidelity.sh record    # tokenize as the record expects; its own train_gpt.py trains
#                                           # CAP seconds (default 150), quantizes, writes final_model.int6.ptz
#                                           # (COMPRESSOR=pergroup: lrzip) and logs its diagnostic val_bpb
#   bash bench/record_fidelity.sh compare   # `pgolf verify` on that artifact, then bench/record_fidelity.py:
#                                           # the same float and quantized weights in both models
#   bash bench/record_fidelity.sh verify    # one call on a fresh machine: `pgolf verify` on the artifact and
#                                           # log the record phase returned, carried in .anchors/fidelity/
# .anchors/ holds a copy of ../shared/anchors (the record's script and tokenizer) and Debian's lrzip .debs
# (lrzip, liblzo2-2, liblz4-1, libbz2-1.0). The record script runs on one GPU with FlashAttention 3 replaced
# by bench/fa3_shim (PyTorch SDPA) and torch.compile off (TORCH_COMPILE_DISABLE=1): its compile warm-up
# recompiles the whole model for each of 8 shapes, more than a call allows. Eager changes speed, not the
# computation. Its other settings are the README's run command, with TTT off (not compared here).
set -euo pipefail
PHASE=$1
CAP=${CAP:-150}
source bench/common.sh
run_folders pgolf-rf "results_$PHASE"
machine_env > "$R/env.txt"
ANCHOR=$PWD/.anchors/record_1855
TOK=$W/tok
RUN=$W/run
DATASET=$W/recdata/datasets/fineweb10B_sp8192_lossless_caps_caseops_v1_reserved

# lrzip from the carried .debs
for deb in .anchors/debs/*.deb; do dpkg -x "$deb" "$W/lrzip"; done
export PATH="$W/lrzip/usr/bin:$PATH"
export LD_LIBRARY_PATH="$W/lrzip/usr/lib/x86_64-linux-gnu:$W/lrzip/lib/x86_64-linux-gnu:${LD_LIBRARY_PATH:-}"
lrzip -V

# The record's settings (its README's command), one GPU, TTT off, compile off.
export DATA_DIR=$W/recdata DATA_PATH=$DATASET TOKENIZER_PATH=$TOK/tokenizer.model ARTIFACT_DIR=$RUN RUN_ID=fidelity
export VOCAB_SIZE=8192 CASEOPS_ENABLED=1 ITERATIONS=20000 MAX_WALLCLOCK_SECONDS=$CAP
export EMBED_BITS=7 MATRIX_LR=0.026 MIN_LR=0.1 MLP_CLIP_SIGMAS=11.5 ATTN_CLIP_SIGMAS=13.0 EMBED_CLIP_SIGMAS=14.0
export GRAD_CLIP_NORM=0.3 TTT_CHUNK_SIZE=48 WARMUP_STEPS=1 MUON_BACKEND_STEPS=5 WARMDOWN_FRAC=0.85 BETA2=0.99
export SPARSE_ATTN_GATE_SCALE=0.5 GPTQ_RESERVE_SECONDS=0.5 GPTQ_CALIBRATION_BATCHES=16 VAL_LOSS_EVERY=0
export GATED_ATTN_QUANT_GATE=1 SPARSE_ATTN_GATE_ENABLED=1 GATE_WINDOW=12 SMEAR_GATE_ENABLED=1
export LQER_ENABLED=1 LQER_ASYM_ENABLED=1 LQER_RANK=4 LQER_FACTOR_BITS=4 LQER_ASYM_GROUP=64 LQER_TOP_K=3
export FUSED_CE_ENABLED=1 COMPRESSOR=pergroup SEED=42 TTT_ENABLED=0 TRAIN_LOG_EVERY=10
export TORCH_COMPILE_DISABLE=1
export PYTHONPATH="$PWD/bench/fa3_shim:$PYTHONPATH"

if [ "$PHASE" = record ]; then
  # pgolf writes the record's shard and sidecar formats; its tokenizer is the record's own model.
  VAL_DOCS=${VAL_DOCS:-400} timed tokenize tokenize_corpus "$TOK" --params none.yaml --vocab-size 8192 --caseops \
    --tokenizer "$ANCHOR/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model" \
    --metrics "$R/tokenize_metrics.json"
  mkdir -p "$DATASET" "$RUN"
  ln -sf "$TOK"/fineweb_*.bin "$DATASET/"
  (cd "$RUN" && timed record_script python3 "$ANCHOR/train_gpt.py" 2>&1 | grep -v Warning | tail -n 60)
  cp "$RUN/fidelity.txt" "$OUT/record_fidelity.log"
  cp "$RUN/final_model.int6.ptz" "$OUT/"
  grep -E "val_bpb|stopping_early|Serialized|peak memory" "$RUN/fidelity.txt" | tee "$R/record_lines.txt"
elif [ "$PHASE" = verify ]; then
  VAL_DOCS=${VAL_DOCS:-400} timed tokenize tokenize_corpus "$TOK" --params none.yaml --vocab-size 8192 --caseops \
    --tokenizer "$ANCHOR/tokenizers/fineweb_8192_bpe_lossless_caps_caseops_v1_reserved.model" \
    --metrics "$R/tokenize_metrics.json"
  timed verify $PG verify .anchors/fidelity/final_model.int6.ptz --data "$TOK" --claims .anchors/fidelity/fidelity.txt \
    --params none.yaml --report "$R/verify_metrics.json" --markdown "$OUT/verify.md" || echo "verify exited $?"
else
  [ -f "$RUN/final_model.int6.ptz" ] || { echo "no record artifact: run the record phase first on this held machine"; exit 1; }
  timed verify $PG verify "$RUN/final_model.int6.ptz" --data "$TOK" --claims "$RUN/fidelity.txt" --params none.yaml \
    --set ttt_eval.seq_len=2048 --report "$R/verify_metrics.json" || echo "verify exited $?"
  timed harness python3 bench/record_fidelity.py --script "$ANCHOR/train_gpt.py" --run "$RUN" --data "$TOK" \
    --out "$R/fidelity.json" 2>&1 | grep -v Warning
fi
