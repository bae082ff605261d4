#!/usr/bin/env bash
# Device run of a kernel change (issue 14), in this order, each step under its own timeout:
#   0. bench.lab.compare_ptx: which kernels' compiled instructions differ from the base tree's;
#   1. the kernel gate: the base tree (.gate_base/: `git archive` of the commit before the change,
#      without the zoo checkpoints; its commit in .gate_base/BASE_COMMIT) saves the numba kernel
#      cases with `tox -e bench-gpu`, then this tree must pass `tox -e gate` against that save
#      (median +10 %); tox and tox-current-env come as wheels from .whl/ (without them: the
#      same pytest commands directly);
#   2. compute-sanitizer memcheck (--report-api-errors no: numba-cuda's driver probing fails
#      harmlessly) and racecheck over the kernels' edge shapes (python -m bench.gpu.sanitize_kernel);
#   3. the kernel bench at graph replay, uniform routing: numba, the research-structure baseline
#      and torch side by side, the weight-order kernel against the sort path, and the fused router
#      top-k + re-route kernel against top-k then re-route, the merging kernel against the plain one
#      (JSON + tables);
#   4. the GPU tests (`pytest -m gpu tests`, as `tox -e gpu`, with 8 pytest-xdist workers where the
#      wheel is installed or carried in .vb/extra; SKIP_GPU_TESTS=1 leaves them out).
# GATE_ONLY=1 stops after step 1; KSEL sets the gated cases (-k expression); NO_PTX=1 leaves step 0
# out (it needs no GPU: run it here instead, python -m bench.lab.compare_ptx .gate_base).
# From the repo root on the GPU host:  bash bench/gpu/run_kernel_gate.sh
# $OUT (default /tmp/sere_kgate_out) gets: kgate.log (all printed), summary.md, bench_kernel.json,
# logs.tar.gz (every step's log); at most 4 files, the device returns 8.
set -uo pipefail
OUT=${OUT:-/tmp/sere_kgate_out}; mkdir -p "$OUT"
PY=${PY:-python3}; STORE=/tmp/sere_bstore; LOGS=/tmp/sere_kgate_logs; mkdir -p "$LOGS"
KSEL=${KSEL:-"gpu and numba and uniform and graph"}  # the gated cases (add "or gpu_merged" for the merging kernel)
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/kgate.log") 2>&1
status=0
date -u +"%Y-%m-%d %H:%M:%S UTC"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
echo "this tree: ${COMMIT:-unknown commit}; base: $(cat .gate_base/BASE_COMMIT 2>/dev/null || echo none)"
# tox and tox-current-env from .whl/; without them the same pytest commands as tox.ini's
# bench-gpu / gate envs (so the gate fits in a call that carries the vLLM bundle instead).
if $PY -m pip install -q --no-index --find-links .whl tox tox-current-env > "$LOGS/pip.log" 2>&1; then
  SAVE=($PY -m tox --current-env -e bench-gpu --); GATE=($PY -m tox --current-env -e gate --)
  GPU_TESTS=($PY -m tox --current-env -e gpu --)
else
  echo "no tox wheels in .whl/: running tox.ini's bench-gpu / gate commands with pytest directly"
  SAVE=($PY -m pytest --benchmark-enable --benchmark-autosave)
  GATE=($PY -m pytest --benchmark-enable --benchmark-compare --benchmark-compare-fail=median:10%)
  GPU_TESTS=($PY -m pytest -m gpu)
fi

step() {  # name, timeout s, dir, command...
  local name=$1 limit=$2 dir=$3; shift 3
  local t0=$SECONDS
  (cd "$dir" && timeout "$limit" "$@") > "$LOGS/$name.log" 2>&1
  local rc=$?
  echo "== $name: rc $rc, $((SECONDS - t0)) s"; tail -n "${TAIL:-12}" "$LOGS/$name.log"
  [ $rc -eq 0 ] || status=1
  return $rc
}
install() { $PY -m pip install -q --no-build-isolation --no-deps -e . ; }
ROOT=$PWD
if [ -d .gate_base ]; then
  # Which kernels' instructions the change touches (informational: a gate figure on an unchanged
  # kernel is noise); its failure does not fail the gate.
  [ "${NO_PTX:-0}" = 1 ] || (timeout 180 $PY -m bench.lab.compare_ptx .gate_base --out "$LOGS/ptx" > "$LOGS/compare_ptx.log" 2>&1 \
    && grep "^|" "$LOGS/compare_ptx.log" | cut -c1-160) || echo "== compare_ptx: no result (see compare_ptx.log)"
  (cd .gate_base && install) > "$LOGS/install-base.log" 2>&1
  step kernel-base 150 .gate_base "${SAVE[@]}" bench/test_bench_reroute.py -k "$KSEL" -q \
    --benchmark-storage="file://$STORE" --benchmark-columns=median --benchmark-sort=name
fi
install > "$LOGS/install.log" 2>&1 || { echo "install failed"; tail "$LOGS/install.log"; status=1; }
[ -d .gate_base ] && step kernel-gate 150 "$ROOT" "${GATE[@]}" bench/test_bench_reroute.py \
  -k "$KSEL" -q --benchmark-storage="file://$STORE" --benchmark-columns=median --benchmark-sort=name

if [ "${GATE_ONLY:-0}" = 1 ]; then  # the gate alone (e.g. beside end-to-end runs in one call)
  tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
  echo "run_kernel_gate: status $status (GATE_ONLY: no sanitizer, bench or GPU tests)"
  exit $status
fi
SAN=(compute-sanitizer --print-limit 20)
TAIL=4 step memcheck 200 "$ROOT" "${SAN[@]}" --tool memcheck --report-api-errors no $PY -m bench.gpu.sanitize_kernel
TAIL=4 step racecheck 200 "$ROOT" "${SAN[@]}" --tool racecheck --racecheck-report hazard $PY -m bench.gpu.sanitize_kernel --quick

TAIL=3 step bench 200 "$ROOT" $PY -m pytest bench/test_bench_reroute.py -k "gpu and uniform and graph or gpu_unsorted or gpu_fused_topk or gpu_merged" -q -s \
  -p no:cacheprovider --benchmark-json="$OUT/bench_kernel.json" --benchmark-columns=median --benchmark-sort=name
$PY -m bench.gpu.summarize_kernel "$OUT/bench_kernel.json" > "$OUT/summary.md" 2>&1 && cat "$OUT/summary.md"

# The GPU tests are mostly Numba compiling, one kernel after another: with pytest-xdist (a wheel in
# .vb/extra where carried) eight workers took 189 s for all of them on the H100 (2026-12-07), where
# one process ran out of the 240 s.
XDIST=()
$PY -m pip install -q --no-index --find-links .vb/extra pytest-xdist > "$LOGS/pip-xdist.log" 2>&1
$PY -c "import xdist" 2> /dev/null && XDIST=(-n 8)
[ "${SKIP_GPU_TESTS:-0}" = 1 ] || TAIL=6 step gpu-tests 240 "$ROOT" "${GPU_TESTS[@]}" tests -q -rfEs -p no:cacheprovider "${XDIST[@]}"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null
echo "run_kernel_gate: status $status"
exit $status
