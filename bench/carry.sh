#!/usr/bin/env bash
# The folders the GPU calls carry, made here, where PyPI and ../shared are reached (the device has neither):
#   bash bench/carry.sh      # makes .whl and .corpus, and lists them in .git/info/exclude
# .whl holds the wheels of bench/carry_wheels.txt, which bench/common.sh installs there.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl .corpus .git/info
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
  -r bench/carry_wheels.txt
cp ../shared/corpus/*.jsonl.xz .corpus/
for folder in .whl .corpus; do
  grep -qxF "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >> .git/info/exclude
done
du -sh .whl .corpus
