#!/usr/bin/env bash
# The device run of issue 14's serving numbers: vLLM's OpenAI-compatible server for
# Qwen3-30B-A3B shapes (dummy weights, bf16, CUDA graphs for batch sizes 1-64, TRITON_ATTN),
# stock then SERE S=1 rho=0, each driven by streaming clients at concurrency 1, 16 and 64
# (4 requests per client, 64-token prompts, 128 new tokens, ignore_eos): bench/test_bench_serve.py
# as pytest-benchmark cases (bench/serve.py runs the servers and clients).
#
# On the GPU host, from the repo root, vLLM 0.26 bundle unpacked and this package installed
# (the plugin must be registered: `python3 -m pip install --no-build-isolation --no-deps -e .`; the script stops if it is not):
#   export PYTHONPATH=/tmp/vllm-site:$PYTHONPATH && bash bench/gpu/run_serve.sh
# Env: OUT (default /tmp/sere_serve_out), BUDGET_S (default 520: seconds for the whole script;
# no server starts with fewer than 200 s of it left, its cases skip, saying so), MODEL (default
# qwen3-30b-a3b), CONCURRENCY (default 1,16,64), ROUNDS (default 4), SERVERS (default stock,sere-s1).
# Expected: a server answers /health after 150-175 s (H200, these shapes), its levels and warm-up
# take well under a minute and its shutdown a few seconds: ~6-7 minutes in all.
#
# What comes back is at most 4 files in $OUT: run_serve.log (everything printed), summary.md (the
# table, one line per level saying where its time went, the hypotheses for c=16 vs c=64),
# bench.json (pytest-benchmark, extra_info per case) and serve_results.tar.gz (server logs and
# JSON, the report; written at the end, also after a failure).
set -uo pipefail
OUT=${OUT:-/tmp/sere_serve_out}
BUDGET_S=${BUDGET_S:-520}
WORK=${WORK:-/tmp/sere_serve_work}
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/run_serve.log") 2>&1

{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used --format=csv
  $PY -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__)"
  $PY -c "from importlib.metadata import entry_points as e; print('vllm plugins:', [p.name for p in e(group='vllm.general_plugins')])"
  git rev-parse HEAD 2>/dev/null || echo "no git history here (working-tree copy)"
} 2>&1 | tee "$WORK/env.txt"
# SERE's engines need the plugin registered for this interpreter; without it they would run stock
# and the run would find out only at its end (2026-12-07: a serving run did, after 6 minutes).
if ! $PY -c "import sys; from importlib.metadata import entry_points as e; sys.exit(not any(p.name == 'sere' for p in e(group='vllm.general_plugins')))"; then
  echo "run_serve.sh: the sere vLLM plugin is not registered for $PY; run $PY -m pip install --no-build-isolation --no-deps -e . first"
  exit 2
fi

# The step's own limit: pytest gets SIGTERM (bench/serve.py then kills the server's process
# group, waiting up to 15 s for it) 30 s before the budget ends, SIGKILL 25 s later.
limit=$((BUDGET_S - 30))
SERE_BENCH_SERVE_OUT="$WORK/servers" SERE_BENCH_SERVE_DEADLINE=$((limit - 10)) SERE_BENCH_SERVE_MIN_LEFT=200 \
SERE_BENCH_SERVE_START_TIMEOUT=240 SERE_BENCH_SERVE_LEVEL_TIMEOUT=120 \
SERE_BENCH_SERVE_MODEL="${MODEL:-qwen3-30b-a3b}" SERE_BENCH_SERVE_SERVERS="${SERVERS:-stock,sere-s1}" \
SERE_BENCH_SERVE_CONCURRENCY="${CONCURRENCY:-1,16,64}" SERE_BENCH_SERVE_ROUNDS="${ROUNDS:-4}" \
SERE_BENCH_SERVE_PROMPT=64 SERE_BENCH_SERVE_NEW_TOKENS=128 \
  timeout -k 25 "$limit" $PY -m pytest bench/test_bench_serve.py -m vllm -s -q -rfEs -p no:cacheprovider \
    --benchmark-json="$OUT/bench.json" --benchmark-columns=median,iqr --benchmark-sort=name
status=$?
$PY -m sere.harness.report "$OUT/bench.json" --out "$WORK/report" > /dev/null 2>&1 || echo "(no report: see bench.json)"
cp "$WORK/servers/summary.md" "$OUT/summary.md" 2>/dev/null || echo "(no summary.md: no server finished)"
tar -czf "$OUT/serve_results.tar.gz" -C "$WORK" --exclude='servers/model' . 2>/dev/null
echo "== run_serve.sh: status $status in $SECONDS s"
exit $status
