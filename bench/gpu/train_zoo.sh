#!/usr/bin/env bash
# Train the four zoo models on one GPU, calibrate them, and pack the checkpoints (issue 6).
# Run from the repo root:  bash bench/gpu/train_zoo.sh        (device run: see bench/results/accuracy.md)
#
# Needs the prepared KJV cache (python -m sere.harness.zoo.data --out .kjv, with the committed tokenizer
# copied to .kjv/tokenizer first: see tests/zoo/README.md) in $DATA, because the GPU host is
# offline and has no `bible` command. The models are tiny, so one training keeps an H100 far
# from busy (kernel launches bind, not FLOPs): the three from-scratch models and the dense
# model train at the same time, each in its own process, and the upcycled model follows the
# dense one. Each run stops at its wall-time cap (minutes below; the learning-rate schedule runs
# by time) or early by validation patience, and keeps its best-by-validation weights
# (sere/harness/zoo/train.py). Budget: the dense + upcycled pair gets the same wall time as each
# from-scratch model (DENSE_MIN + UP_MIN = MAIN_MIN), and the same step count each.
# Then the calibration command (default linear CKA, plus frobenius and cosine) runs on each.
# Out: $OUT/zoo_<name>.tar.gz per checkpoint dir, $OUT/zoo_logs.tar.gz, $OUT/summary.txt.
# CPU smoke test of this script:  DEVICE=cpu PY=python MAIN_MIN=0.2 DENSE_MIN=0.1 UP_MIN=0.1 STEPS=6 EVAL=3 BATCH=4 bash bench/gpu/train_zoo.sh
set -uo pipefail
OUT=${OUT:-/tmp/sere_zoo_out}
DATA=${DATA:-.kjv}
DEVICE=${DEVICE:-cuda}
MAIN_MIN=${MAIN_MIN:-3.5}
DENSE_MIN=${DENSE_MIN:-1.0}
UP_MIN=${UP_MIN:-2.5}
STEPS=${STEPS:-1600}  # 1600 x 64 x 128 tokens = 12 passes over the training text; a first H100 run
# with 3000 steps found the best validation perplexity at step 1350-1500 (overfitting after), so
# the schedule now ends there; on an H100 the step count binds before the time caps
BATCH=${BATCH:-64}
LR=${LR:-3e-3}
EVAL=${EVAL:-150}
PATIENCE=${PATIENCE:-4}
CALIB_S=${CALIB_S:-75}  # each calibration run is cut at this many seconds: the packing below must happen
PY=${PY:-python3}
WORK=${WORK:-/tmp/sere_zoo_gpu}
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=10
rm -rf "$WORK" && mkdir -p "$WORK/logs" "$OUT"
LOG=$WORK/logs
t0=$SECONDS

{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,driver_version --format=csv 2>/dev/null || echo "no nvidia-smi"
  git log -1 --format="commit %H" 2>/dev/null
  if ! $PY -c "import sere.calibration" 2>/dev/null; then
    $PY -m pip install -q --no-build-isolation --no-deps -e . || $PY -m pip install -q --no-build-isolation --no-deps . \
      || { echo "pip install failed: linking kernels/ and calibration/ into sere/"; ln -sfn ../kernels sere/kernels; ln -sfn ../calibration sere/calibration; }
  fi
  $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
  $PY -c "import matplotlib, tabulate" 2>&1 && echo "calibration deps: ok"
} > "$LOG/env.txt" 2>&1
cat "$LOG/env.txt"

train() {  # name, minutes, extra args...
  local name=$1 minutes=$2; shift 2
  $PY -m sere.harness.zoo.train --model "$name" --device "$DEVICE" --out "$WORK/$name" --data-dir "$DATA" \
    --steps "$STEPS" --max-minutes "$minutes" --batch "$BATCH" --lr "$LR" --eval-every "$EVAL" \
    --patience "$PATIENCE" --seed 0 "$@" > "$LOG/train_$name.log" 2>&1
  echo "== train $name -> rc $? at $((SECONDS - t0)) s: $(tail -n 1 "$LOG/train_$name.log")"
}

for m in qwen2_moe deepseek_v2 qwen3_moe; do
  train "$m" "$MAIN_MIN" &
done
( train qwen2_dense "$DENSE_MIN" && train qwen2_moe_upcycled "$UP_MIN" --init-from "$WORK/qwen2_dense" ) &
wait

calibrate_one() {  # name, method: CKA (the default) next to the model, the other metrics in subfolders
  local dir=$WORK/$1 method=$2 extra=()
  [ -f "$dir/model.safetensors" ] || { echo "== calibrate $1: no checkpoint"; return; }
  [ "$method" = cka ] || extra=(--similarity_method "$method" --output_path "$dir/similarity_$method")
  timeout "$CALIB_S" $PY -m sere.calibration --model_path "$dir" --max_len 128 --device "$DEVICE" --dtype float32 \
    --no_progress "${extra[@]}" > "$LOG/calib_$1_$method.log" 2>&1
  echo "== calibrate $1 $method -> rc $?"
}
for m in qwen2_moe deepseek_v2 qwen3_moe qwen2_moe_upcycled; do  # 16 small jobs at once, each cut at CALIB_S
  for method in cka frobenius cosine substitution; do
    calibrate_one "$m" "$method" &
  done
done
wait

{
  echo "wall $((SECONDS - t0)) s"
  for m in qwen2_dense qwen2_moe deepseek_v2 qwen3_moe qwen2_moe_upcycled; do
    $PY - "$WORK/$m/train_log.json" <<'EOF' 2>&1
import json, sys
try:
    log = json.load(open(sys.argv[1]))
except OSError as e:
    print(f"{sys.argv[1]}: {e}"); raise SystemExit
print(f"{log['model']}: {log['steps_done']} steps in {log['wall_s']} s on {log['device']}, stopped by {log['stopped_by']}; "
      f"kept step {log['saved_step']} (validation ppl {log['best_val_ppl']}); {log['checkpoint_bytes']} bytes")
print("  evals:", [(e["step"], e["val_ppl"], e["heldout_ppl_subset"]) for e in log["heldout_evals"]])
EOF
  done
} > "$LOG/summary.txt"
cp "$LOG/summary.txt" "$OUT/summary.txt"
cat "$LOG/summary.txt"
# One tar per checkpoint dir (the device returns files of at most 16 MiB; the four fp16
# checkpoints together are more), one of the logs.
for dir in "$WORK"/*/; do
  name=$(basename "$dir")
  tar czf "$OUT/zoo_$name.tar.gz" -C "$WORK" "$name"
done
ls -la "$OUT"
