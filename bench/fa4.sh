#!/usr/bin/env bash
# FlashAttention-4 against PyTorch's attention kernels (bench/attn_bench.py), in three back-to-back calls on one
# held machine, from bench/fa4_wheels.sh's folders (each carried with .whl):
#   bash bench/fa4.sh half    # carry .fa4/p1a: the first half of the CuTe DSL's CUDA 13 libraries
#   bash bench/fa4.sh half    # carry .fa4/p1b: the second half; both unpacked
#   bash bench/fa4.sh bench   # carry .fa4/p2: the other wheels, then the benchmark at 12 and 48 sequences
set -euo pipefail
source bench/common.sh
if [ "$1" = half ]; then fa4_unpack_half; exit 0; fi
fa4_install
python3 -c 'import flash_attn.cute, cutlass; print("flash-attn-4 and the CuTe DSL import")'
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
OUT=${OUT:-/tmp/fa4-out}
mkdir -p "$OUT"
python3 bench/attn_bench.py --batch 12 --out "$OUT/attn_b12.json" 2>&1 | grep -v Warning
python3 bench/attn_bench.py --batch 48 --out "$OUT/attn_b48.json" 2>&1 | grep -v Warning
