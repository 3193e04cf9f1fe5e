#!/usr/bin/env bash
# FlashAttention-4's wheels for the GPU machines, which have no network (run here, where PyPI is reached):
#   bash bench/fa4_wheels.sh        # makes .fa4/p1a, .fa4/p1b and .fa4/p2 (ignored by git: .git/info/exclude)
# bench/speed_sidebyside.sh carries them in three calls: `fa4` twice (.fa4/p1a, then .fa4/p1b: the CUDA 13
# libraries of the CuTe DSL, unzipped, xz-compressed and split in two halves, since the 63.6 MB whole and the
# working tree passed one call's 64 MiB on 2026-11-30) and `run` (.fa4/p2: the other wheels, unzipped there).
# Versions as measured in bench/README (2026-11-30): flash-attn-4 4.0.0b36, nvidia-cutlass-dsl 4.8.1,
# apache-tvm-ffi 0.1.15.post2, torch-c-dlpack-ext 0.1.5, quack-kernels 0.6.5, einops 0.8.2, and cuda-bindings
# 13 (installed there only where torch did not bring it).
set -euo pipefail
DL=.fa4/download
mkdir -p "$DL" .fa4/p1a .fa4/p1b .fa4/p2
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any -d "$DL" \
  flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2 \
  torch-c-dlpack-ext==0.1.5 quack-kernels==0.6.5 einops==0.8.2 "cuda-bindings>=13,<14"
CU13=$(ls "$DL"/nvidia_cutlass_dsl_libs_cu13-*.whl)
find "$DL" -name '*.whl' ! -name "$(basename "$CU13")" -exec cp {} .fa4/p2/ \;
tree=$(mktemp -d)
python3 -m zipfile -e "$CU13" "$tree"
tar -C "$tree" -cf - . | xz -9 -T0 > "$DL/cu13.tar.xz"
rm -rf "$tree" .fa4/p1
split -n 2 -d "$DL/cu13.tar.xz" "$DL/cu13.tar.xz."
mv "$DL/cu13.tar.xz.00" .fa4/p1a/ && mv "$DL/cu13.tar.xz.01" .fa4/p1b/
du -sh .fa4/p1a .fa4/p1b .fa4/p2
