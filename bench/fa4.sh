#!/usr/bin/env bash
# FlashAttention-4 against PyTorch's attention kernels (bench/attn_bench.py), in two back-to-back calls:
#   bash bench/fa4.sh 1   # carry .fa4/p1: the small wheels and the first half of the cu13 libs wheel
#   bash bench/fa4.sh 2   # carry .fa4/p2: the second half (+ cuda-bindings): install, then benchmark
# The cu13 libs wheel (92 MB) is larger than one call may carry; the halves meet in /tmp on the held
# machine (../shared/GPU.md). Wheels: flash-attn-4 4.0.0b36, nvidia-cutlass-dsl 4.8.1 (+ libs base, core,
# cu13), apache-tvm-ffi 0.1.15.post2, torch-c-dlpack-ext 0.1.5, quack-kernels 0.6.5, einops 0.8.2.
set -euo pipefail
W=/tmp/fa4w
mkdir -p "$W"
if [ "$1" = 1 ]; then
  cp .fa4/p1/* "$W/"
  ls -la "$W"
  exit 0
fi
cp .fa4/p2/* "$W/"
ls "$W"/cu13.part.aa > /dev/null  # from call 1 on this held machine
cat "$W"/cu13.part.* > "$W/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl"
echo "$(cat "$W/cu13.sha256")  $W/nvidia_cutlass_dsl_libs_cu13-4.8.1-cp312-cp312-manylinux_2_28_x86_64.whl" | sha256sum -c
WHEELS=$(ls "$W"/*.whl | grep -v cuda_bindings)
# cuda-bindings only where torch did not bring it (a second copy could shadow torch's pinned one).
python3 -c 'import cuda.bindings' 2>/dev/null || WHEELS="$WHEELS $(ls "$W"/cuda_bindings*.whl)"
python3 -m pip install --no-deps -q $WHEELS 2>&1 | tail -3
python3 -m pip list 2>/dev/null | grep -i -E "flash|cutlass|cuda.bindings|quack|tvm|dlpack|einops"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
OUT=${OUT:-/tmp/fa4-out}
mkdir -p "$OUT"
python3 bench/attn_bench.py --batch 12 --out "$OUT/attn_b12.json" 2>&1 | grep -v Warning
python3 bench/attn_bench.py --batch 48 --out "$OUT/attn_b48.json" 2>&1 | grep -v Warning
