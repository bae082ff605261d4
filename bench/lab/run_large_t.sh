#!/usr/bin/env bash
# Device run of the large-T follow-up (issue 2): the large-T bench (one-launch vs two-launch vs
# baseline) and the GPU kernel tests, no install (PYTHONPATH). Logs and JSON land in $OUT.
# Run from the repo root on a CUDA machine:  bash bench/lab/run_large_t.sh
set -uo pipefail
OUT=${OUT:-/tmp/sere_large_t_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PY=${PY:-python3}
status=0
{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv
  $PY -c "import sys, torch, numba, numpy; from importlib.metadata import version as v; print('python', sys.version.split()[0], '| torch', torch.__version__, '| numba-cuda', v('numba-cuda'), '| numpy', numpy.__version__)"
  git rev-parse --short HEAD 2>/dev/null || true
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
echo "== large-T bench"
timeout ${BENCH_TIMEOUT:-120} $PY -m bench.lab.large_t --out "$OUT/large_t.json" > "$OUT/large_t.log" 2>&1 || status=1
grep -v "large-T bench:" "$OUT/large_t.log" | tail -n 40
echo "== GPU kernel tests"
timeout ${TESTS_TIMEOUT:-150} $PY -m pytest tests/test_gpu_kernels.py -m gpu -q -rfEs --durations=8 -p no:cacheprovider \
  > "$OUT/gpu_tests.log" 2>&1 || status=1
tail -n 40 "$OUT/gpu_tests.log"
exit $status
