#!/usr/bin/env bash
# Device run of the tox GPU envs (issue 5): `tox -e gpu`, `tox -e bench-gpu` (zoo-trace layer
# cases) and `tox -e gate` (a kernel change against its base) on one machine, as a GPU CI job
# would run them.
# Run from the repo root on a CUDA machine:  bash bench/gpu/run_tox_gpu.sh
#
# The GPU host's torch lives in a prepared environment and the host is offline, so tox runs
# with the tox-current-env plugin (`--current-env`: the commands run in the interpreter that
# runs tox, nothing is installed) after an editable install of this package. Wheels of tox and
# the plugin come from .whl/ (carried; see bench/RESULTS.md for how they were fetched).
# Everything lands in $OUT/tox_gpu.tgz (default OUT=/tmp/sere_tox_out); the logs of the tox
# runs are also copied to $OUT as they are.
set -uo pipefail
FINAL=${OUT:-/tmp/sere_tox_out}
OUT=$(mktemp -d /tmp/sere_tox.XXXX)
mkdir -p "$FINAL"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
status=0

{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv
  $PY -m pip install -q --no-index --find-links .whl tox tox-current-env || status=1
  $PY -m pip install -q --no-build-isolation --no-deps -e . || status=1
  $PY -m tox --version
  $PY -c "import sere.kernels.numba_cuda as m; print('numba kernel available:', m.available())"
} > "$OUT/tox_env.txt" 2>&1
cat "$OUT/tox_env.txt"

run_env() {  # name, timeout, tox args...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" $PY -m tox --current-env "$@" > "$OUT/tox_$name.log" 2>&1
  local rc=$?
  echo "== tox $* -> rc $rc in $((SECONDS - t0)) s"
  tail -n 12 "$OUT/tox_$name.log"
  [ $rc -eq 0 ] || status=1
}

# The whole GPU test suite.
run_env gpu "${GPU_TIMEOUT:-240}" -e gpu -- tests -q -rfEs -p no:cacheprovider
# Zoo-trace layer cases on the GPU, saved per machine.
export SERE_BENCH_BACKEND=numba
run_env bench-gpu "${BENCH_TIMEOUT:-150}" -e bench-gpu -- bench/test_bench_layer.py -k zoo -q \
  --benchmark-json="$OUT/bench_zoo_trace.json" --benchmark-columns=median,iqr --benchmark-sort=name

# The gate on a real kernel change: the kernel as it was before the change (carried in
# .whl/gate_base/, the device copy has no git history) is timed and saved with bench-gpu, then
# the working tree's kernel must pass `tox -e gate` (median +10%) against that save.
KSEL="gpu and numba and uniform and graph"
if [ -f .whl/gate_base/numba_cuda.py ]; then
  cp kernels/numba_cuda.py /tmp/numba_cuda_change.py
  cp .whl/gate_base/numba_cuda.py kernels/numba_cuda.py
  run_env kernel-base "${BENCH_TIMEOUT:-150}" -e bench-gpu -- bench/test_bench_reroute.py -k "$KSEL" -q \
    --benchmark-json="$OUT/bench_kernel_base.json" --benchmark-columns=median --benchmark-sort=name
  cp /tmp/numba_cuda_change.py kernels/numba_cuda.py
  run_env kernel-gate "${GATE_TIMEOUT:-150}" -e gate -- bench/test_bench_reroute.py -k "$KSEL" -q \
    --benchmark-columns=median --benchmark-sort=name
fi
$PY -m sere.harness.report "$OUT/bench_zoo_trace.json" > "$OUT/report_zoo_trace.md" 2>&1 || status=1
head -n 60 "$OUT/report_zoo_trace.md"
tar czf "$FINAL/tox_gpu.tgz" -C "$OUT" .
cp "$OUT"/tox_*.log "$FINAL"/ 2>/dev/null
ls -la "$FINAL"
exit $status
