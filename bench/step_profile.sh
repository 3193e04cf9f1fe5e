#!/usr/bin/env bash
# Issue 16's profile of pr2071's step on one and on two GPUs, one device call on nvidia-h200-x2 (carry .whl):
# bench/step_profile.py on GPU 0 (beside it, on GPU 1, the fused CE against its compiled plain expression:
# bench/ce_bench.py), then under torchrun on both GPUs once per train.ddp_graph in DDP_GRAPHS (default: buckets,
# PyTorch's default; whole; compiled_ddp). NCCL's transport between the GPUs is read from NCCL_DEBUG=INFO.
# Results in $OUT: profile_*.json beside step_profile.tgz (the logs and rank 0's Chrome traces).
set -uo pipefail
source bench/common.sh
OUT=${OUT:-/tmp/pgolf-profile-out}
W=/tmp/pgolf-profile
mkdir -p "$OUT" "$W"
machine_env > "$OUT/env.txt"
export TORCHINDUCTOR_CACHE_DIR=$W/inductor TRITON_CACHE_DIR=$W/triton
ARGS=(--preset pr2071 --out "$W" --steps "${STEPS:-8}" --profile-steps 3)
CUDA_VISIBLE_DEVICES=0 timeout 300 python3 bench/step_profile.py "${ARGS[@]}" > "$OUT/1gpu.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 timeout 150 python3 bench/ce_bench.py --out "$OUT/ce_bench.json" > "$OUT/kernels.log" 2>&1
wait
tail -n 3 "$OUT/kernels.log"; grep -v -E "Warning|USDT" "$OUT/1gpu.log" | tail -n 2
for graph in ${DDP_GRAPHS:-buckets whole compiled_ddp}; do
  left=$(( ${BUDGET:-570} - SECONDS ))  # every run inside the device call's 10 minutes, the archive still made
  [ "$left" -gt 60 ] || { echo "skip ddp_graph $graph: ${left}s left"; continue; }
  NCCL_DEBUG=INFO timeout "$left" torchrun --standalone --nproc_per_node=2 bench/step_profile.py "${ARGS[@]}" \
    --tag "_$graph" --set ddp_graph="$graph" > "$OUT/2gpu_$graph.log" 2>&1
  grep -E "NCCL INFO Channel 00/0 " "$OUT/2gpu_$graph.log" | sort -u | head -n 1
  grep -v -E "Warning|USDT|NCCL" "$OUT/2gpu_$graph.log" | tail -n 2
done
cp "$W"/profile_*.json "$W"/trace_*.json.gz "$OUT/" 2>/dev/null || true
# the device returns a few files a call: one archive, and the summaries beside it
tar -czf /tmp/step_profile.tgz -C "$OUT" . && find "$OUT" -type f ! -name 'profile_*.json' -delete
mv /tmp/step_profile.tgz "$OUT/"
