#!/usr/bin/env bash
# Train the four zoo models on one GPU, calibrate them, and pack the checkpoints (issues 6, 12).
# Run from the repo root:  bash bench/gpu/train_zoo.sh        (device run: see tests/zoo/README.md)
#
# Needs the corpus's token streams and tokenizer (python -m sere.harness.zoo.corpus --out .corpus;
# the run reads only .corpus/tokens and .corpus/tokenizer) in $DATA, because the GPU host is offline. The models are tiny, so one training keeps an H100 far
# from busy (kernel launches bind, not FLOPs): the three from-scratch models and the dense
# model train at the same time, each in its own process, and the upcycled model follows the
# dense one. Each run stops at its wall-time cap (minutes below; the learning-rate schedule runs
# by time) or early by validation patience, and keeps its best-by-validation weights
# (sere/harness/zoo/train.py). Budget: the dense + upcycled pair gets the same wall time as each
# from-scratch model (DENSE_MIN + UP_MIN = MAIN_MIN), and the same step count each.
# Then the calibration command runs on each: linear CKA (the default), frobenius, cosine and
# substitution on the multi-domain mix (calibration/data/multidomain_mix.txt), and CKA on one
# domain only (kjv, pycode: calibration/data/domains/) for the calibration-domain-shift study.
# Out: $OUT/zoo_<name>.tar.gz per checkpoint dir, $OUT/zoo_logs.tar.gz, $OUT/summary.txt.
# CPU smoke test of this script:  DEVICE=cpu PY=python MAIN_MIN=0.2 DENSE_MIN=0.1 UP_MIN=0.1 STEPS=4 EVAL=2 BATCH=2 VARIANTS=cka CALIB_S=300 bash bench/gpu/train_zoo.sh
set -uo pipefail
OUT=${OUT:-/tmp/sere_zoo_out}
DATA=${DATA:-.corpus}
DEVICE=${DEVICE:-cuda}
MAIN_MIN=${MAIN_MIN:-5.0}
DENSE_MIN=${DENSE_MIN:-1.5}
UP_MIN=${UP_MIN:-3.5}
STEPS=${STEPS:-4000}  # 4000 x 64 x 256 tokens = 65 M, about 7 passes over the 9.3 M training tokens;
# the time caps bind first if the GPU is slower than that (the schedule then runs by time)
BATCH=${BATCH:-64}
SEQ=${SEQ:-256}
LR=${LR:-2e-3}
EVAL=${EVAL:-250}
PATIENCE=${PATIENCE:-4}
CALIB_S=${CALIB_S:-100}  # each calibration run is cut at this many seconds: the packing below must happen
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
    --steps "$STEPS" --max-minutes "$minutes" --batch "$BATCH" --seq-len "$SEQ" --lr "$LR" --eval-every "$EVAL" \
    --patience "$PATIENCE" --seed 0 "$@" > "$LOG/train_$name.log" 2>&1
  echo "== train $name -> rc $? at $((SECONDS - t0)) s: $(tail -n 1 "$LOG/train_$name.log")"
}

MODELS=${MODELS:-qwen2_moe deepseek_v2 qwen3_moe qwen2_moe_upcycled}  # a subset retrains only those
for m in $MODELS; do
  [ "$m" = qwen2_moe_upcycled ] || train "$m" "$MAIN_MIN" &
done
case " $MODELS " in *" qwen2_moe_upcycled "*)
  ( train qwen2_dense "$DENSE_MIN" && train qwen2_moe_upcycled "$UP_MIN" --init-from "$WORK/qwen2_dense" \
    && cp "$WORK/qwen2_dense/train_log.json" "$WORK/qwen2_moe_upcycled/dense_train_log.json" ) & ;;
esac
wait

# Calibration documents: the shipped texts cut into ~1600-character pieces at line ends
# (sere.harness.zoo.calib_text: code and man pages have short paragraphs the command would drop).
CAL=$WORK/calib_text && mkdir -p "$CAL"
$PY -m sere.harness.zoo.calib_text calibration/data/multidomain_mix.txt "$CAL/mix.jsonl"
for d in kjv pycode; do $PY -m sere.harness.zoo.calib_text "calibration/data/domains/$d.txt" "$CAL/$d.jsonl"; done

calibrate_one() {  # name, variant: cka on the mix next to the model, every other variant in similarity_<variant>/
  local dir=$WORK/$1 variant=$2 method=$2 text=$CAL/mix.jsonl extra=()
  [ -f "$dir/model.safetensors" ] || { echo "== calibrate $1: no checkpoint"; return; }
  case $variant in cka_*) method=cka; text=$CAL/${variant#cka_}.jsonl ;; esac
  [ "$variant" = cka ] || extra=(--output_path "$dir/similarity_$variant")
  timeout "$CALIB_S" $PY -m sere.calibration --model_path "$dir" --data_path "$text" --similarity_method "$method" \
    --max_len 256 --device "$DEVICE" --dtype float32 --no_progress "${extra[@]}" > "$LOG/calib_$1_$variant.log" 2>&1
  echo "== calibrate $1 $variant -> rc $?"
}
for m in $MODELS; do  # up to 24 small jobs at once, each cut at CALIB_S
  for variant in ${VARIANTS:-cka frobenius cosine substitution cka_kjv cka_pycode}; do
    calibrate_one "$m" "$variant" &
  done
done
wait

{
  echo "wall $((SECONDS - t0)) s"
  for m in qwen2_dense $MODELS; do
    $PY - "$WORK/$m/train_log.json" <<'EOF' 2>&1
import json, sys
try:
    log = json.load(open(sys.argv[1]))
except OSError as e:
    print(f"{sys.argv[1]}: {e}"); raise SystemExit
print(f"{log['model']}: {log['steps_done']} steps in {log['wall_s']} s on {log['device']}, stopped by {log['stopped_by']}; "
      f"kept step {log['saved_step']} (validation ppl {log['best_val_ppl']}); {log['checkpoint_bytes']} bytes")
print(f"  {log['tokens_seen']:,} tokens seen, {log.get('precision')}, kernel {log.get('experts_kernel')}")
print("  evals:", [(e["step"], e["val_ppl"]) for e in log["heldout_evals"]])
print("  best per domain:", min(log["heldout_evals"], key=lambda e: e["val_ppl"]).get("val_ppl_per_domain"))
EOF
  done
} > "$LOG/summary.txt"
cp "$LOG/summary.txt" "$OUT/summary.txt"
cat "$LOG/summary.txt"
# One tar of the checkpoints and logs (not the dense model's weights: its log went into the
# upcycled model's folder), cut into 15 MiB parts: the device returns at most 8 files of at most
# 16 MiB each, and one bf16 checkpoint is about 21 MB. Unpack: cat zoo.tar.gz.* | tar xz
tar czf - -C "$WORK" --exclude=qwen2_dense $MODELS logs | split -b 15M -d - "$OUT/zoo.tar.gz."
ls -la "$OUT"
