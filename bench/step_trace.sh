#!/usr/bin/env bash
# Issue 16's kernel check and step trace, one device call (carry .whl): the fused softcapped CE against its
# compiled plain expression (bench/ce_bench.py), then the training step's host waits with pinned and pageable
# batches (bench/step_trace.py).
set -uo pipefail
source bench/common.sh
OUT=${OUT:-/tmp/pgolf-trace-out}
mkdir -p "$OUT"
machine_env > "$OUT/env.txt"
python3 bench/ce_bench.py --out "$OUT/ce_bench.json" 2>&1 | grep -v Warning | tail -n 4
python3 bench/step_trace.py --out /tmp/pgolf-trace 2>&1 | grep -v -E "Warning|USDT" | tail -n 6
cp /tmp/pgolf-trace/step_trace.json /tmp/pgolf-trace/trace_*.json.gz "$OUT/" 2>/dev/null || true
