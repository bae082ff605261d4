#!/usr/bin/env bash
# Device run after the runtime/harness split (issue 16): tox -e gpu on this tree, then the
# kernel gate: the pre-split tree (carried in .gate_base/, a `git archive` of the commit before
# the kernel split, without zoo checkpoints) saves the numba kernel cases with tox -e bench-gpu,
# and this tree must pass tox -e gate (median +10 %) against that save. Logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/sere_gate_out}; mkdir -p "$OUT"
PY=${PY:-python3}; STORE=/tmp/sere_bstore; KSEL="gpu and numba and uniform and graph"
status=0
$PY -m pip install -q --no-index --find-links .whl tox tox-current-env > "$OUT/env.txt" 2>&1 || status=1
nvidia-smi --query-gpu=name,driver_version --format=csv >> "$OUT/env.txt"
step() {  # name, dir, tox args...
  local name=$1 dir=$2; shift 2
  (cd "$dir" && $PY -m pip install -q --no-build-isolation --no-deps -e . && timeout 280 $PY -m tox --current-env "$@") > "$OUT/$name.log" 2>&1
  local rc=$?; echo "== $name -> rc $rc"; tail -n 15 "$OUT/$name.log"; [ $rc -eq 0 ] || status=1
}
ROOT=$PWD
step kernel-base .gate_base -e bench-gpu -- bench/test_bench_reroute.py -k "$KSEL" -q --benchmark-storage="file://$STORE" --benchmark-columns=median --benchmark-sort=name
step kernel-gate "$ROOT" -e gate -- bench/test_bench_reroute.py -k "$KSEL" -q --benchmark-storage="file://$STORE" --benchmark-columns=median --benchmark-sort=name
step gpu-tests "$ROOT" -e gpu -- tests -q -rfEs -p no:cacheprovider
exit $status
