# Sourced by the bench scripts on the GPU machine: installs the carried wheels and pgolf, and defines
# `run_folders` (a run's folders and what it leaves in OUT) and `timed`.
export PYTHONUNBUFFERED=1
if [ -z "${BENCH_LOCAL:-}" ]; then  # BENCH_LOCAL=1: a dry run on a machine where pgolf is installed
  # the listed wheels, not whatever .whl holds: a .whl without constriction once failed a row only at pack,
  # after its training (2026-12-02); now pip names the missing wheel before anything runs
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    --find-links .whl -r bench/carry_wheels.txt || {
    echo "bench/common.sh: .whl lacks a wheel of bench/carry_wheels.txt: run 'bash bench/carry.sh' where PyPI" \
      "is reached, and carry .whl" >&2; exit 2; }
  export PYTHONPATH=/tmp/site
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
fi
PG="python3 -m pgolf.cli"

run_folders() {  # run_folders NAME [RESULTS] [FILE...]: the work folder W=/tmp/NAME, the metrics folder
  # R=$W/RESULTS (default: results) and OUT (default /tmp/NAME-out); when the script exits, R's metrics are
  # merged into $OUT/results.json and the FILEs (names in R, globs allowed) that exist go into one archive,
  # $OUT/files.tgz: the device returns at most 8 files a call, and a held machine's R gathers every call's
  # files (on 2026-11-30 a seed-study call's ninth file, its results.json, did not come back)
  W=/tmp/$1
  R=$W/${2:-results}
  OUT=${OUT:-/tmp/$1-out}
  RUN_KEEP=("${@:3}")
  mkdir -p "$OUT" "$W" "$R"
  trap 'python3 bench/merge_results.py "$R" "$OUT/results.json"; keep_files' EXIT
}

keep_files() {  # run_folders' FILEs, as $OUT/files.tgz (loose where that would pass the device's 16 MiB a file)
  local names=() pattern f
  for pattern in "${RUN_KEEP[@]}"; do
    for f in $R/$pattern; do [ -f "$f" ] && names+=("$(basename "$f")"); done
  done
  [ ${#names[@]} -gt 0 ] || return 0
  tar -czf "$OUT/files.tgz" -C "$R" "${names[@]}"
  if [ "$(stat -c %s "$OUT/files.tgz")" -gt $(( 15 * 2**20 )) ]; then
    rm "$OUT/files.tgz"
    for f in "${names[@]}"; do cp "$R/$f" "$OUT/"; done
  fi
  echo "kept ${#names[@]} files in $OUT"
}

seconds_left() {  # what is left of the call's BUDGET seconds since START (both set by the script)
  echo $(( BUDGET - ($(date +%s) - START) ))
}

timed() {  # timed NAME CMD...: run it, append "NAME milliseconds" to $R/times.txt
  local name=$1; shift
  local t0; t0=$(date +%s%N)
  "$@"
  echo "$name $(( ($(date +%s%N) - t0) / 1000000 ))" | tee -a "$R/times.txt"
}

machine_env() {  # the date, GPUs and torch/triton versions, then the host (CPU, cores, load), for a run's env.txt
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' || true
  echo "host: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
}

tokenize_corpus() {  # tokenize_corpus OUT ARGS...: the protocol's split of the carried corpus (VAL_DOCS, 600)
  # and tokenizer training docs (the first 1,500, long ones kept); ARGS add vocab size, CaseOps, metrics
  local out=$1; shift
  $PG tokenize .corpus/enwiki_val.jsonl.xz .corpus/enwiki_train.jsonl.xz --out "$out" --val-docs "${VAL_DOCS:-600}" \
    --set tokenizer_train_docs=1500 --set max_sentence_length=1048576 "$@"
}

# FlashAttention-4 on the GPU machines (no network), from bench/fa4_wheels.sh's carried folders, into FA4_SITE.
# The wheels are unzipped into one tree, not pip-installed: the CuTe DSL's wheels share the nvidia_cutlass_dsl
# folder, which `pip install --target` will not merge; PYTHONPATH adds the DSL package path its .pth would add.
FA4_SITE=/tmp/fa4site
export PYTHONPATH=$FA4_SITE:$FA4_SITE/nvidia_cutlass_dsl/dsl_packages:${PYTHONPATH:-}

fa4_unpack_half() {  # the call carrying .fa4/p1a or .fa4/p1b: keep its half; unpack once both are on the machine
  mkdir -p "$FA4_SITE" /tmp/fa4parts
  cp .fa4/p1*/cu13.tar.xz.* /tmp/fa4parts/
  if [ -f /tmp/fa4parts/cu13.tar.xz.00 ] && [ -f /tmp/fa4parts/cu13.tar.xz.01 ]; then
    cat /tmp/fa4parts/cu13.tar.xz.0[01] | tar -xJ -C "$FA4_SITE"
    du -sh "$FA4_SITE"
  else
    echo "kept $(ls /tmp/fa4parts); run again carrying the other half (.fa4/p1a, .fa4/p1b)"
  fi
}

fa4_install() {  # a call carrying .fa4/p2, after both halves: the other wheels (cuda-bindings where torch lacks it)
  [ -f "$FA4_SITE/.unzipped" ] && return 0
  if [ ! -d "$FA4_SITE/nvidia_cutlass_dsl" ]; then
    # a CPU dry run of a script's plumbing (BENCH_LOCAL=1) goes on without FA4: fa4 runs its CPU reference there
    [ -n "${BENCH_LOCAL:-}" ] && { echo "dry run: no FA4"; return 0; }
    echo "no FA4 libraries: carry .fa4/p1a, then .fa4/p1b first"; exit 1
  fi
  local wheels
  wheels=$(ls .fa4/p2/*.whl | grep -v cuda_bindings)
  python3 -c 'import cuda.bindings' 2>/dev/null || wheels="$wheels $(ls .fa4/p2/cuda_bindings*.whl)"
  for w in $wheels; do python3 -m zipfile -e "$w" "$FA4_SITE"; done
  touch "$FA4_SITE/.unzipped"
}
