# Sourced by the bench scripts on the GPU machine, with R (the results folder) set: installs the carried
# wheels and pgolf, and defines `timed`.
export PYTHONUNBUFFERED=1
if [ -z "${BENCH_LOCAL:-}" ]; then  # BENCH_LOCAL=1: a dry run on a machine where pgolf is installed
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
fi
PG="python3 -m pgolf.cli"

timed() {  # timed NAME CMD...: run it, append "NAME milliseconds" to $R/times.txt
  local name=$1; shift
  local t0; t0=$(date +%s%N)
  "$@"
  echo "$name $(( ($(date +%s%N) - t0) / 1000000 ))" | tee -a "$R/times.txt"
}

machine_env() {  # the date, GPUs and torch/triton versions, for a run's env.txt
  date -u +%Y-%m-%dT%H:%M:%SZ
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' || true
}

tokenize_corpus() {  # tokenize_corpus OUT ARGS...: the protocol's split of the carried corpus (VAL_DOCS, 600)
  # and tokenizer training docs (the first 1,500, long ones kept); ARGS add vocab size, CaseOps, metrics
  local out=$1; shift
  $PG tokenize .corpus/enwiki_val.jsonl.xz .corpus/enwiki_train.jsonl.xz --out "$out" --val-docs "${VAL_DOCS:-600}" \
    --set tokenizer_train_docs=1500 --set max_sentence_length=1048576 "$@"
}
