# Sourced by the bench scripts on the GPU machine, with R (the results folder) set: installs the carried
# wheels and pgolf, and defines `timed`.
export PYTHONUNBUFFERED=1
if [ -z "${BENCH_LOCAL:-}" ]; then  # BENCH_LOCAL=1: a dry run on a machine where pgolf is installed
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
  python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
fi
PG="python3 -m stages.cli"

timed() {  # timed NAME CMD...: run it, append "NAME milliseconds" to $R/times.txt
  local name=$1; shift
  local t0; t0=$(date +%s%N)
  "$@"
  echo "$name $(( ($(date +%s%N) - t0) / 1000000 ))" | tee -a "$R/times.txt"
}
