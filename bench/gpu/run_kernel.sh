#!/usr/bin/env bash
# Device run of the kernel work (issue 2): install the package, run the GPU kernel tests, the
# launch probe, the CUDA C research baseline and the kernel bench; logs and JSON land in $OUT
# (default /tmp/sere_kernel_out).
# Run from the repo root on a CUDA machine:  bash bench/gpu/run_kernel.sh [full|fast|quick]
# full: every bench case; fast: GPU cases only; quick: numba cases only (each also times the
# baseline and torch for its ratios), uniform routing, and a small launch sweep.
set -uo pipefail
OUT=${OUT:-/tmp/sere_kernel_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
status=0

{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
  $PY -c "import sys, torch, numba, numpy; from importlib.metadata import version as v; print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '| numba', numba.__version__, '| numba-cuda', v('numba-cuda'), '| cuda-core', v('cuda-core'), '| cuda-bindings', v('cuda-bindings'), '| numpy', numpy.__version__, '| pytest-benchmark', v('pytest-benchmark'))"
  echo "== install"
  if ! $PY -m pip install -q --no-build-isolation --no-deps -e . ; then
    echo "editable install failed; trying a regular install"
    $PY -m pip install -q --no-build-isolation --no-deps . || status=1
  fi
  $PY -c "import sere.kernels.numba_cuda as m; print('sere.kernels.numba_cuda from', m.__file__, '| available():', m.available())"
} > "$OUT/env_install.txt" 2>&1
cat "$OUT/env_install.txt"

echo "== launch probe"
probe_args=""
if [ "${1:-full}" = "quick" ]; then probe_args="--quick"; fi
timeout ${PROBE_TIMEOUT:-180} $PY -m bench.lab.probe_kernel --out "$OUT/probe.json" $probe_args > "$OUT/probe.log" 2>&1 || status=1
tail -n 30 "$OUT/probe.log"

echo "== research baseline in CUDA C (bench/lab/probe_cuda_baseline.py: the baseline's structure without Numba)"
timeout ${CBASE_TIMEOUT:-120} $PY -m bench.lab.probe_cuda_baseline > "$OUT/probe_cuda_baseline.md" 2>&1 || status=1
cat "$OUT/probe_cuda_baseline.md"

echo "== kernel bench"
case "${1:-full}" in
  quick) select="gpu and numba and uniform" ;;
  fast) select="gpu" ;;
  *) select="gpu or (cpu and (reference-1- or torch-1- or reference-64- or torch-64-))" ;;
esac
timeout ${BENCH_TIMEOUT:-300} $PY -m pytest bench/test_bench_reroute.py -k "$select" -q -s -p no:cacheprovider \
  --benchmark-json="$OUT/bench_kernel.json" --benchmark-columns=min,median,max --benchmark-sort=name \
  > "$OUT/bench.log" 2>&1 || status=1
grep -E "^\[reroute|passed|failed|error" "$OUT/bench.log" | tail -n 60
$PY -m bench.gpu.summarize_kernel "$OUT/bench_kernel.json" > "$OUT/summary.md" 2>&1 || status=1
cat "$OUT/summary.md"
echo "== GPU kernel tests"
timeout ${TESTS_TIMEOUT:-300} $PY -m pytest tests/test_gpu_kernels.py -m gpu -q -rfEs --durations=10 -p no:cacheprovider \
  > "$OUT/gpu_tests.log" 2>&1 || status=1
tail -n 40 "$OUT/gpu_tests.log"

exit $status
