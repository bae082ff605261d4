#!/usr/bin/env bash
# Calibration at real scale (issue 13): sere-calibrate on random-weight checkpoints of the
# published Qwen1.5-MoE-A2.7B (14.3B parameters, 26.7 GiB in bf16) and Qwen3-30B-A3B (30.5B,
# 56.9 GiB) shapes, CKA then substitution, with peak host and GPU memory of every step.
# Run from the repo root on the GPU host (H200: 139 GiB GPU, 128 GiB host, 64 GiB disk, offline):
#   bash bench/gpu/calibrate_real.sh              # about 5-8 minutes; BUDGET_S bounds it
# Per model: bench/gpu/make_random_model.py builds it with random weights directly on the GPU in
# bf16 (inside `with torch.device("cuda")`), saves it in 5 GB safetensors shards to $WORK on
# local disk (the disk must hold 57 GiB for Qwen3-30B-A3B: the first model is deleted before the
# second is built, and with FIT_DISK=1 the layer count is cut to what fits, said in the report)
# and copies in the zoo tokenizer; that process ends, so the GPU is free again. Then
# `python -m sere.calibration` (= sere-calibrate) runs on it with --device cuda --dtype bfloat16
# on a short text (MAX_LEN x MAX_TOKENS of the shipped Genesis extract), once per method.
# Every step runs under /usr/bin/time -v where it exists (its "Maximum resident set size" is the
# process's peak host RSS) and the calibration command prints its own last line
# "peak memory: host RSS ... (peaks: anonymous ..., file-backed ...), cuda:0 ... allocated".
# The anonymous part is what the process allocated (a model materialised on the host shows
# there); the file-backed part is mapped safetensors pages (since the loader reads shards with
# pread, none should be left). With HOST_CAP_GIB (default 12; 0: off) every calibration step runs
# in a cgroup v2 whose memory.max is that many GiB, far below either checkpoint: the step must
# finish under it, and the table adds the cgroup's own peak (memory.peak, page cache included)
# and its oom_kill count. Where cgroup v2 cannot be set up the steps run uncapped, said so.
# Out ($OUT, default /tmp/sere_calib_real_out): calibrate_real.txt (the table and the memory
# lines), calibrate_real.log (everything printed), calibrate_real.tar.gz (step logs, artifacts,
# heatmaps). The model folders are deleted at the end, however the script ends.
# CPU check of this script (narrow 2-layer models of the same structure):
#   DEVICE=cpu DTYPE=float32 MAKE_ARGS="--layers 2 --hidden 64" bash bench/gpu/calibrate_real.sh
set -uo pipefail
OUT=${OUT:-/tmp/sere_calib_real_out}
WORK=${WORK:-/tmp/sere_calib_real}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bfloat16}
MODELS=${MODELS:-"Qwen1.5-MoE-A2.7B Qwen3-30B-A3B"}
METHODS=${METHODS:-"cka substitution"}
MAX_LEN=${MAX_LEN:-128}
MAX_TOKENS=${MAX_TOKENS:-2048}
BATCH=${BATCH:-8}
BUDGET_S=${BUDGET_S:-570}
FIT_DISK=${FIT_DISK:-1}
MAKE_ARGS=${MAKE_ARGS:-}
TOKENIZER=${TOKENIZER:-tests/zoo/tokenizer}
HOST_CAP_GIB=${HOST_CAP_GIB:-12}
export PYTHONUNBUFFERED=1 TQDM_DISABLE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
rm -rf "$WORK" && mkdir -p "$WORK/logs" "$WORK/results"
REPORT=$OUT/calibrate_real.txt
: > "$REPORT"
exec > >(tee -a "$OUT/calibrate_real.log") 2>&1
t_start=$SECONDS

cleanup() {
  rm -rf "$WORK/model"
  tar czf "$OUT/calibrate_real.tar.gz" -C "$WORK" logs results 2>/dev/null
}
trap cleanup EXIT

left() { echo $((BUDGET_S - (SECONDS - t_start))); }
gib() { awk -v k="$1" 'BEGIN { printf "%.2f", k / 1048576 }'; }  # KiB -> GiB
TIMEV=()
[ -x /usr/bin/time ] && /usr/bin/time -v true >/dev/null 2>&1 && TIMEV=(/usr/bin/time -v)

{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  git log -1 --format="commit %H" 2>/dev/null
  if ! $PY -c "import sere.calibration" 2>/dev/null; then
    $PY -m pip install -q --no-build-isolation --no-deps -e . || echo "pip install failed (running from the checkout)"
  fi
  $PY -c "import sys, torch, transformers; print('python', sys.version.split()[0], '| torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
  $PY -c "import accelerate; print('accelerate', accelerate.__version__)" 2>/dev/null \
    || echo "accelerate: not installed (sere.calibration.loading opens transformers' one-device gate)"
  free -g | head -2
  df -h "$WORK" | tail -1
  if [ ${#TIMEV[@]} -gt 0 ]; then echo "time -v: ${TIMEV[*]}"; else echo "time -v: not available (peak host RSS from the command's own line only)"; fi
  echo "settings: device $DEVICE, dtype $DTYPE, max_len $MAX_LEN, max_tokens $MAX_TOKENS, batch $BATCH, budget $BUDGET_S s"
} | tee -a "$REPORT"

# The host memory cap: a cgroup v2 child with memory.max = HOST_CAP_GIB (no swap).
CG=""
if [ "$HOST_CAP_GIB" != 0 ]; then
  root=/sys/fs/cgroup
  if [ -f $root/cgroup.controllers ] && grep -qw memory $root/cgroup.controllers; then
    grep -qw memory $root/cgroup.subtree_control || echo +memory > $root/cgroup.subtree_control 2>/dev/null
    if mkdir -p $root/sere_cap 2>/dev/null && echo $((HOST_CAP_GIB * 1024 * 1024 * 1024)) > $root/sere_cap/memory.max 2>/dev/null; then
      echo 0 > $root/sere_cap/memory.swap.max 2>/dev/null
      CG=$root/sere_cap
    fi
  fi
  if [ -n "$CG" ]; then echo "host memory cap: $HOST_CAP_GIB GiB (cgroup v2 $CG/memory.max) on every calibration step"
  else echo "host memory cap: NOT applied (no writable cgroup v2 memory controller here)"; fi | tee -a "$REPORT"
fi
# capped CMD...: CMD inside the cap's cgroup (as is where there is none)
CAPPED=()
[ -n "$CG" ] && CAPPED=(sh -c 'echo $$ > "$0/cgroup.procs" && exec "$@"' "$CG")
cap_note() {  # the cgroup's peak (page cache included) and OOM kills since the last reset
  [ -n "$CG" ] || return 0
  local peak="-" kills
  [ -f "$CG/memory.peak" ] && peak=$(gib $(( $(cat "$CG/memory.peak") / 1024 )))
  kills=$(awk '/^oom_kill / { print $2 }' "$CG/memory.events" 2>/dev/null)
  echo " [cap $HOST_CAP_GIB GiB: cgroup peak $peak GiB, oom_kill ${kills:-?}]"
}

ROWS=()
# run_step TAG CMD...: runs CMD under the time left (and time -v), appends one row to ROWS
run_step() {
  local tag=$1; shift
  local budget; budget=$(left)
  if [ "$budget" -lt 20 ]; then
    ROWS+=("| $tag | skipped: budget spent | | | |"); echo "== $tag: skipped (budget spent)"; return 1
  fi
  local log=$WORK/logs/$tag.log tv=$WORK/logs/$tag.time
  local t0; t0=$(date +%s.%N)
  if [ ${#TIMEV[@]} -gt 0 ]; then
    timeout "$budget" "${TIMEV[@]}" -o "$tv" "$@" > "$log" 2>&1
  else
    timeout "$budget" "$@" > "$log" 2>&1
  fi
  local rc=$?
  local wall; wall=$(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
  local rss="-"
  if [ -f "$tv" ]; then
    local kib; kib=$(awk -F': ' '/Maximum resident set size/ { print $2 }' "$tv")
    [ -n "$kib" ] && rss=$(gib "$kib")
  fi
  local peak; peak=$(grep -E '^peak memory:' "$log" | tail -n 1)
  [ -z "$peak" ] && peak=$(grep -E '^built:' "$log" | tail -n 1)  # the model builder's own line
  grep -q "loading the model on the host first" "$log" && peak="$peak [LOADED VIA HOST]"
  [ "${1:-}" = sh ] && [ -n "$CG" ] && peak="$peak$(cap_note)"
  [ $rc -ne 0 ] && peak="$peak [rc $rc: $(grep -v '^\s*$' "$log" | tail -n 1 | cut -c1-200)]"
  ROWS+=("| $tag | $rc | $wall | $rss | $peak |")
  echo "== $tag: rc $rc, $wall s, max RSS $rss GiB; $peak"
  return $rc
}

for model in $MODELS; do
  rm -rf "$WORK/model"
  fit=(); [ "$FIT_DISK" = 1 ] && fit=(--fit-disk)
  # shellcheck disable=SC2086
  run_step "$model-build" $PY -m bench.gpu.make_random_model --model "$model" --out "$WORK/model" --device "$DEVICE" \
    --dtype "$DTYPE" --tokenizer-from "$TOKENIZER" --max-shard-size 5GB "${fit[@]}" $MAKE_ARGS || continue
  du -sh "$WORK/model" | tee -a "$REPORT"
  for method in $METHODS; do
    [ -n "$CG" ] && echo 0 > "$CG/memory.peak" 2>/dev/null  # reset the peak (kernels >= 6.12), else it is cumulative
    run_step "$model-$method" "${CAPPED[@]}" $PY -m sere.calibration --model_path "$WORK/model" --output_path "$WORK/results/$model/$method" \
      --similarity_method "$method" --device "$DEVICE" --dtype "$DTYPE" --max_len "$MAX_LEN" --max_tokens "$MAX_TOKENS" \
      --batch_size "$BATCH" --no_progress
  done
  rm -rf "$WORK/model"
done

{
  echo
  echo "| step | rc | wall s | max RSS GiB (time -v) | peak memory (the step's own report) |"
  echo "|---|---:|---:|---:|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  echo "total $((SECONDS - t_start)) s"
} | tee -a "$REPORT"
