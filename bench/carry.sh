#!/usr/bin/env bash
# The folders the GPU calls carry, made here, where PyPI and ../shared are reached (the device has neither):
#   bash bench/carry.sh      # makes .whl and .corpus, and lists them in .git/info/exclude
# .whl holds the wheels that pgolf imports and the device lacks (bench/common.sh installs them there):
# constriction (pack's `ans` codec), brotli and zstandard (codecs), protobuf (the tokenizer's byte sidecar),
# pyyaml (params). On 2026-12-02 a .whl without constriction failed a seed-study row at pack, after its
# training; common.sh now checks the imports before anything runs. The versions are those of seed-study
# group 01:33 (bench/README).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .corpus .git/info
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  constriction==0.5.0 brotli==1.2.1 zstandard==0.25.0 protobuf==7.36.2 pyyaml==6.0.4
cp ../shared/corpus/*.jsonl.xz .corpus/
for folder in .whl .corpus; do
  grep -qxF "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >> .git/info/exclude
done
du -sh .whl .corpus
