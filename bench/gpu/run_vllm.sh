#!/usr/bin/env bash
# The device run of issue 5's vLLM GPU gaps: one MoE layer on vLLM's fused MoE kernel (all
# three real shapes), then end-to-end decode in vLLM, stock vs SERE, for DeepSeek-V2-Lite,
# Qwen3-30B-A3B and (batches 128, 256) Qwen1.5-MoE-A2.7B, all within one time budget.
#
# On the GPU host, from the repo root (the scripts run as `python -m bench.gpu.<script>`), vLLM
# 0.26 bundle unpacked and this package installed:
#   export PYTHONPATH=/tmp/vllm-site:$PYTHONPATH && bash bench/gpu/run_vllm.sh
# Env: OUT (default /tmp/sere_vllm_out), BUDGET_S (default 520: seconds for the whole script;
# every step gets a deadline from what is left, so the script ends in time), STEPS (default
# "fused deepseek-v2-lite qwen3-30b-a3b qwen1.5-moe-a2.7b": what to run, in order; the last
# step gets all the time left, e.g. STEPS=qwen3-30b-a3b runs only that model's engines; the step
# fused-pytest runs bench/test_bench_fused_moe.py, the same layer as pytest-benchmark cases;
# e2e-pytest runs bench/test_bench_vllm_decode.py, end to end as pytest-benchmark cases, for the
# models in E2E_MODELS (default all three) at E2E_BATCHES (default 1,16,64,128,256), with
# E2E_REPS repetitions (default 3), under the step's share of the budget; E2E_ROUTING (default: each
# model's own dummy router) sets the routing of e2e-pytest and the model steps: uniform, zipf:1.2, trace
# (the zoo trace of each model's family) or trace:NAME, see bench/vllm_engine.py; gpu-tests runs
# `pytest -m gpu tests`; waves runs bench/lab/probe_expert_waves.py (WAVES_ARGS, e.g.
# "--tokens 16"); tune runs bench/gpu/tune_fused_moe.py for TUNE_MODELS (default
# Qwen1.5-MoE-A2.7B) at TUNE_BATCHES (default 1,16,64,256) in TUNE_S seconds (default 300);
# e2e:MODEL runs one model's ENGINES at E2E_BATCHES (default 1,16,64), E2E_REPS times each; profile runs
# bench/gpu/profile_decode.py for PROFILE_MODELS (default all three, one after another) at batches 1,16,64, with the
# ideal per batch where an earlier e2e step ran the model's counts engine (e.g. ENGINES=stock,sere-s1,counts); fp8 runs
# Qwen3-30B-A3B's FP8_ENGINES (default stock,sere-s1,counts) with FP8 weights at FP8_BATCHES (default 1,16,64): FP8_SCHEME,
# default fp8_per_block, vLLM's online scheme with the published checkpoint's 128 x 128 blocks,
# router gates in bf16; the counts engine shows the routing did not collapse), ENGINES
# (default stock,sere-s1,sere-s2,counts: the engines of the script e2e steps; sere-s1-fused is
# the fused top-k variant, sere-s1-merge the merged-slots one), FUSED_K (a -k expression narrowing fused-pytest).
# Measured on the H100 (2026-11-23): an engine takes 100-145 s from process start to its
# last number (the first engine of a model ~25 s more: vLLM inspects the architecture in a
# subprocess once), so one model's three engines need ~330-400 s.
#
# What comes back is at most 8 files, so $OUT holds only: run_vllm.log (everything printed),
# summary.md (all tables), vllm_results.tar.gz (every JSON, log and table; rewritten after
# each step, so a cut-off run still returns what it finished).
set -uo pipefail
OUT=${OUT:-/tmp/sere_vllm_out}
BUDGET_S=${BUDGET_S:-520}
WORK=${WORK:-/tmp/sere_vllm_work}
PY=${PY:-python3}
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1
status=0
exec > >(tee -a "$OUT/run_vllm.log") 2>&1

left() { echo $((BUDGET_S - SECONDS)); }

pack() {  # everything small from $WORK (model folders left out) into one archive, plus the summary
  cat "$WORK"/fused/vllm_fused_layer.md "$WORK"/fused-pytest/report/report.md "$WORK"/e2e-pytest/report/report.md \
    "$WORK"/e2e-*/summary.md "$WORK"/tune/tune_fused_moe.md "$WORK"/profile-*/profile.md "$WORK"/waves/probe_expert_waves.md \
    > "$OUT/summary.md" 2>/dev/null
  tar -czf "$OUT/vllm_results.tar.gz" -C "$WORK" --exclude='*/model' . 2>/dev/null
}

{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
  $PY -c "import torch, vllm, triton; print('torch', torch.__version__, 'vllm', vllm.__version__, 'triton', triton.__version__)"
  $PY -c "import sere.kernels.numba_cuda as m; print('numba kernel available:', m.available())"
  git rev-parse HEAD 2>/dev/null || echo "no git history here (working-tree copy)"
} > "$WORK/env.txt" 2>&1
cat "$WORK/env.txt"
# SERE's engines need the plugin registered for this interpreter; without it they would run stock
# and the run would find out only at its end (2026-12-07: a serving run did, after 6 minutes).
if ! $PY -c "import sys; from importlib.metadata import entry_points as e; sys.exit(not any(p.name == 'sere' for p in e(group='vllm.general_plugins')))"; then
  echo "run_vllm.sh: the sere vLLM plugin is not registered for $PY; run $PY -m pip install --no-build-isolation --no-deps -e . first"
  exit 2
fi

step() {  # name, seconds (capped by what is left), command...
  local name=$1 want=$2; shift 2
  local limit=$(( want < $(left) ? want : $(left) ))
  if [ "$limit" -lt 45 ]; then
    echo "== $name: skipped, $(left) s left of $BUDGET_S"
    status=1
    return
  fi
  local t0=$SECONDS
  echo "== $name: up to $limit s"
  timeout -k 5 "$limit" "$@"
  local rc=$?
  echo "== $name: rc $rc in $((SECONDS - t0)) s ($(left) s left)"
  [ $rc -eq 0 ] || status=1
  pack
}

STEPS=${STEPS:-fused deepseek-v2-lite qwen3-30b-a3b qwen1.5-moe-a2.7b}
last_step=${STEPS##* }

# End to end, one model: stock and the two SERE settings (CUDA graphs), then the eager
# statistics engine (activated experts, trace check) only where time is left for it.
e2e() {  # model, seconds, min seconds per engine, batches, engines
  local model=$1 want=$2 min_left=$3 batches=$4 engines=$5
  [ "$model" = "$last_step" ] && want=$(left)
  local limit=$(( want < $(left) ? want : $(left) ))
  step "e2e $model" "$limit" $PY -m bench.gpu.vllm_decode --model "$model" --out "$WORK/e2e-$model" \
    --batches "$batches" --only "$engines" --deadline $((limit - 10)) --min-left "$min_left" --engine-timeout 170 \
    ${E2E_ROUTING:+--routing "$E2E_ROUTING"} ${E2E_REPS:+--reps "$E2E_REPS"}
}

ENGINES=${ENGINES:-stock,sere-s1,sere-s2,counts}

# vLLM's FP8 path imports compressed_tensors (with loguru), which the GPU bundle leaves out.
# Carry their wheels (here: pip download --no-deps compressed-tensors==0.17.0 loguru -d .vb/extra,
# 0.3 MB) and they go into the bundle's site folder before the fp8 step.
fp8_deps() {
  $PY -c "import compressed_tensors" 2>/dev/null && return 0
  local wheels=${EXTRA_WHEELS:-.vb/extra}
  if ! ls "$wheels"/*.whl > /dev/null 2>&1; then
    echo "== fp8: skipped: vLLM's FP8 path needs compressed_tensors, which the bundle lacks; carry its wheels in $wheels"
    return 1
  fi
  $PY -m pip install -q --no-deps --no-index --target "${VLLM_SITE:-/tmp/vllm-site}" "$wheels"/*.whl
}

# A bench module as pytest-benchmark cases (the gate's view of its level) with its JSON in
# $WORK/<name>, then its report: bench_pytest NAME MODULE [pytest args...].
bench_pytest() {
  local name=$1 module=$2; shift 2
  mkdir -p "$WORK/$name"
  $PY -m pytest "$module" -q -rfEs -p no:cacheprovider "$@" \
    --benchmark-json="$WORK/$name/bench.json" --benchmark-columns=median,iqr --benchmark-sort=name \
    > "$WORK/$name/pytest.log" 2>&1
  local rc=$?
  tail -n 80 "$WORK/$name/pytest.log"
  $PY -m sere.harness.report "$WORK/$name/bench.json" --out "$WORK/$name/report" > /dev/null || rc=1
  return $rc
}
export -f bench_pytest
export PY WORK

for s in $STEPS; do
  case $s in
    # One layer on vLLM's fused MoE, all three shapes (cases past its deadline are skipped).
    fused) step fused 170 $PY -m bench.gpu.vllm_fused_layer --out "$WORK/fused" --batches 1,16,64,128,256 --deadline 150 ;;
    fused-pytest) step fused-pytest 240 bash -c 'bench_pytest "$@"' _ fused-pytest bench/test_bench_fused_moe.py \
      ${FUSED_K:+-k "$FUSED_K"} ;;
    # The engines' JSON and logs stay in $WORK/e2e-pytest/engines: a cut-off run keeps what it finished.
    e2e-pytest) want=$([ "$s" = "$last_step" ] && left || echo "${E2E_S:-480}")
      lim=$(( want < $(left) ? want : $(left) ))
      step e2e-pytest "$lim" env SERE_BENCH_E2E_OUT="$WORK/e2e-pytest/engines" SERE_BENCH_E2E_DEADLINE=$((lim - 60)) \
        SERE_BENCH_E2E_MODELS="${E2E_MODELS:-qwen1.5-moe-a2.7b,deepseek-v2-lite,qwen3-30b-a3b}" \
        SERE_BENCH_E2E_BATCHES="${E2E_BATCHES:-1,16,64,128,256}" SERE_BENCH_E2E_REPS="${E2E_REPS:-3}" \
        SERE_BENCH_E2E_ROUTING="${E2E_ROUTING:-}" \
        bash -c 'bench_pytest "$@"' _ e2e-pytest bench/test_bench_vllm_decode.py -s ;;
    # Routed experts alone at fixed T and 1-128 distinct experts (issue 14, target 2: the fused-MoE
    # call's fixed cost and byte rate, fitted per model and T), row by row into waves/probe_expert_waves.md.
    waves) mkdir -p "$WORK/waves"
      step waves 200 bash -c "set -o pipefail; $PY -m bench.lab.probe_expert_waves ${WAVES_ARGS:-} \
        2> $WORK/waves/stderr.log | tee $WORK/waves/probe_expert_waves.md" ;;
    gpu-tests) step gpu-tests 240 bash -c "$PY -m pytest -m gpu tests -q -rfEs -p no:cacheprovider > $WORK/gpu-tests.log 2>&1; rc=\$?; tail -n 15 $WORK/gpu-tests.log; exit \$rc" ;;
    tune) want=$([ "$s" = "$last_step" ] && left || echo "${TUNE_S:-300}"); lim=$(( want < $(left) ? want : $(left) ))
      step tune "$lim" $PY -m bench.gpu.tune_fused_moe --models "${TUNE_MODELS:-Qwen1.5-MoE-A2.7B}" \
        --batches "${TUNE_BATCHES:-1,16,64,256}" --out "$WORK/tune" --deadline $((lim - 20)) ;;
    # With an earlier e2e step's counts engine for the model (ENGINES=...,counts), the ideal per batch.
    profile) for m in ${PROFILE_MODELS:-qwen1.5-moe-a2.7b deepseek-v2-lite qwen3-30b-a3b}; do
        counts=$WORK/e2e-$m/counts.json
        step "profile $m" 260 $PY -m bench.gpu.profile_decode --model "$m" --batches 1,16,64 --out "$WORK/profile-$m" \
          --timeout 250 ${E2E_ROUTING:+--routing "$E2E_ROUTING"} $([ -f "$counts" ] && echo --counts "$counts")
      done ;;
    fp8) want=$([ "$s" = "$last_step" ] && left || echo 450); lim=$(( want < $(left) ? want : $(left) ))
      fp8_deps || { status=1; continue; }
      step "e2e qwen3 fp8" "$lim" $PY -m bench.gpu.vllm_decode --model qwen3-30b-a3b --quantization "${FP8_SCHEME:-fp8_per_block}" \
        --out "$WORK/e2e-qwen3-fp8" --batches "${FP8_BATCHES:-1,16,64}" --only "${FP8_ENGINES:-stock,sere-s1,counts}" --deadline $((lim - 10)) --min-left 60 \
        --engine-timeout 170 ;;
    # Any model at E2E_BATCHES (default 1,16,64) with ENGINES, e.g. e2e:qwen1.5-moe-a2.7b.
    e2e:*) e2e "${s#e2e:}" "$(left)" 60 "${E2E_BATCHES:-1,16,64}" "$ENGINES" ;;
    deepseek-v2-lite) e2e deepseek-v2-lite 210 55 1,16,64,128,256 "$ENGINES" ;;
    qwen3-30b-a3b) e2e qwen3-30b-a3b 260 90 1,16,64,128,256 "$ENGINES" ;;
    # Qwen1.5 has batches 1, 16, 64 from the earlier run (bench/results/vllm.md).
    qwen1.5-moe-a2.7b) e2e qwen1.5-moe-a2.7b 200 60 128,256 stock,sere-s1,sere-s2 ;;
    *) echo "== unknown step $s (fused, fused-pytest, e2e-pytest, gpu-tests, tune, waves, e2e:MODEL, profile, fp8, deepseek-v2-lite, qwen3-30b-a3b, qwen1.5-moe-a2.7b)"; status=1 ;;
  esac
done

pack
echo "== run_vllm.sh: status $status in $SECONDS s"
exit $status
