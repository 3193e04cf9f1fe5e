#!/usr/bin/env bash
# Issue 16's profile of pr2071's step on one and on two GPUs, one device call on nvidia-h200-x2 (carry .whl):
# bench/step_profile.py on GPU 0 once per torch.compile mode in COMPILE_MODES (default "default"), one after
# another, then under torchrun on both GPUs once per train.ddp_graph in DDP_GRAPHS (default "buckets whole"),
# in the preset's compile_mode (pr2071's is reduce-overhead since 2026-11-30) unless SETS names one.
# The runs never overlap: pr2071's step is bound by the host's launches, and on 2026-11-30 a 1-GPU run beside a
# second, compiling one measured 417 ms/step against 311.8 in an earlier call. A run takes about 150 s on one
# GPU and 220 s on two (compile included; from that call's log times), so one call holds about three: e.g.
# COMPILE_MODES="default reduce-overhead" DDP_GRAPHS="" in one call, the defaults in the next (each call its own
# 1-GPU reference). STEPS timed steps (default 8). NCCL's transport between the GPUs is read from NCCL_DEBUG=INFO.
# Every run stops inside BUDGET (570 s). Results in $OUT: profile_*.json beside step_profile.tgz (the logs and
# rank 0's Chrome traces).
set -uo pipefail
source bench/common.sh
OUT=${OUT:-/tmp/pgolf-profile-out}
W=/tmp/pgolf-profile
mkdir -p "$OUT" "$W"
rm -f "$W"/profile_*.json "$W"/trace_*.json.gz  # an earlier call's, already returned: only this call's go back
machine_env > "$OUT/env.txt"
export TORCHINDUCTOR_CACHE_DIR=$W/inductor TRITON_CACHE_DIR=$W/triton
ARGS=(--preset pr2071 --out "$W" --steps "${STEPS:-8}" --profile-steps 3)
# SETS: train settings for every run, space-separated KEY=VALUE, and TAG a suffix for their files (e.g.
# SETS="compile_mode=reduce-overhead" TAG=_graphs DDP_GRAPHS=whole COMPILE_MODES=" ": CUDA graphs under DDP
# with one graph a micro-batch); a run's own compile_mode / ddp_graph comes after them and wins
for kv in ${SETS:-}; do ARGS+=(--set "$kv"); done
left() { echo $(( ${BUDGET:-570} - SECONDS )); }  # every run inside the call's 10 minutes, the archive still made
for mode in ${COMPILE_MODES:-default}; do
  [ "$(left)" -gt 60 ] || { echo "skip compile_mode $mode: $(left)s left"; continue; }
  CUDA_VISIBLE_DEVICES=0 timeout "$(left)" python3 bench/step_profile.py "${ARGS[@]}" --tag "_$mode${TAG:-}" \
    --set compile_mode="$mode" > "$OUT/1gpu_$mode${TAG:-}.log" 2>&1
  grep -v -E "Warning|USDT|warn" "$OUT/1gpu_$mode${TAG:-}.log" | tail -n 2
done
for graph in ${DDP_GRAPHS-buckets whole}; do
  [ "$(left)" -gt 60 ] || { echo "skip ddp_graph $graph: $(left)s left"; continue; }
  NCCL_DEBUG=INFO timeout "$(left)" torchrun --standalone --nproc_per_node=2 bench/step_profile.py "${ARGS[@]}" \
    --tag "_$graph${TAG:-}" --set ddp_graph="$graph" > "$OUT/2gpu_$graph${TAG:-}.log" 2>&1
  grep -E "NCCL INFO Channel 00/0 " "$OUT/2gpu_$graph${TAG:-}.log" | sort -u | head -n 1
  grep -v -E "Warning|USDT|NCCL|warn" "$OUT/2gpu_$graph${TAG:-}.log" | tail -n 2
done
cp "$W"/profile_*.json "$W"/trace_*.json.gz "$OUT/" 2>/dev/null || true
# the device returns a few files a call: one archive, and the summaries beside it
tar -czf /tmp/step_profile.tgz -C "$OUT" . && find "$OUT" -type f ! -name 'profile_*.json' -delete
mv /tmp/step_profile.tgz "$OUT/"
