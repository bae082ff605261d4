#!/usr/bin/env bash
# sere-tune at real size (issue 13): a Qwen1.5-MoE-A2.7B-shaped model with random weights
# (sere.harness.model_configs.real_config, 14.3 B parameters, 28.6 GB in bf16), saved with the
# zoo tokenizer (tests/zoo/tokenizer; its ids are far below the real vocabulary of 151936) and
# a random similarity artifact of the right shape (24 layers x [60, 60], uniform in [0, 1),
# unit diagonal: it exercises the path, it says nothing about quality). Then `sere-tune` on it,
# bf16 on cuda, batch 16, on the shipped multi-domain sample; prints wall time, peak GPU memory
# (torch.cuda.max_memory_allocated) and peak host RSS (resource.getrusage) of each step.
#
# On the GPU host, from the repo root:   bash bench/gpu/tune_real.sh
# CPU smoke test of the python parts:    SMOKE=1 bash bench/gpu/tune_real.sh
#   (a tiny qwen2_moe config, float32 on the CPU, a small grid)
# Env: OUT (default /tmp/sere_tune_out), WORK (model folder, default /tmp/sere_tune_work; the
# model is NOT put under $OUT), PY (python3), DEVICE (cuda), DTYPE (bfloat16), BATCH (16),
# SEQ_LEN (128), NUM_BATCHES (2), SETTINGS (the grid, default "S=1,2 rho=0,0.5,0.8,0.9,0.95,0.99":
# the random similarities are uniform in [0, 1), so the rungs near 1 are the gentle ones),
# SEARCH_EVALS (48), LAYERS (num_hidden_layers override; default: the real 24),
# KL_BUDGET (default auto: random weights give tiny KLs, so a probe run first measures S=1 rho=0
# on one batch and the budget becomes half its KL, which makes the budget bind and the
# per-layer search run; give a number to skip the probe).
# $OUT gets: tune_real.log (everything printed), summary.txt (times and peaks), sere_tuning.json,
# sere_tuning_results.json, sere_tuning.png.
set -uo pipefail
OUT=${OUT:-/tmp/sere_tune_out}
WORK=${WORK:-/tmp/sere_tune_work}
PY=${PY:-python3}
SMOKE=${SMOKE:-0}
if [ "$SMOKE" = "1" ]; then
  DEVICE=${DEVICE:-cpu}; DTYPE=${DTYPE:-float32}; BATCH=${BATCH:-4}; SEQ_LEN=${SEQ_LEN:-16}
  NUM_BATCHES=${NUM_BATCHES:-2}; SETTINGS=${SETTINGS:-"S=1,2 rho=0,0.5,0.9,0.99"}; SEARCH_EVALS=${SEARCH_EVALS:-6}
else
  DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-bfloat16}; BATCH=${BATCH:-16}; SEQ_LEN=${SEQ_LEN:-128}
  NUM_BATCHES=${NUM_BATCHES:-2}; SETTINGS=${SETTINGS:-"S=1,2 rho=0,0.5,0.8,0.9,0.95,0.99"}; SEARCH_EVALS=${SEARCH_EVALS:-48}
fi
LAYERS=${LAYERS:-}
KL_BUDGET=${KL_BUDGET:-auto}
MODEL_DIR=$WORK/qwen1.5-moe-a2.7b-random
export PYTHONUNBUFFERED=1 TQDM_MININTERVAL=5
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH}  # the checkout, uninstalled (sere/__init__ maps kernels/, calibration/)
rm -rf "$WORK" && mkdir -p "$OUT" "$WORK"
exec > >(tee "$OUT/tune_real.log") 2>&1
status=0

{
  date -u +"%Y-%m-%d %H:%M:%S UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  $PY -c "import torch, transformers; print('torch', torch.__version__, '| transformers', transformers.__version__, '| cuda', torch.cuda.is_available())"
  $PY -c "import importlib.util as u; print('accelerate (device_map loading):', u.find_spec('accelerate') is not None)"
  git rev-parse HEAD 2>/dev/null || echo "no git history here (working-tree copy)"
  echo "settings: DEVICE=$DEVICE DTYPE=$DTYPE BATCH=$BATCH SEQ_LEN=$SEQ_LEN NUM_BATCHES=$NUM_BATCHES SETTINGS='$SETTINGS' SEARCH_EVALS=$SEARCH_EVALS LAYERS=${LAYERS:-all} KL_BUDGET=$KL_BUDGET SMOKE=$SMOKE"
} 2>&1 | tee "$OUT/summary.txt"

# A python step with its wall time, peak GPU memory and peak host RSS, printed as one line
# `== <name>: ...` (also appended to summary.txt). Args: name, then the python code's argv.
measured() {
  local name=$1; shift
  $PY - "$name" "$@" <<'EOF'
import json, os, resource, runpy, sys, time

import torch

name, argv = sys.argv[1], sys.argv[2:]
t0 = time.time()
code = 0
try:
    if argv[0] == "build":
        from pathlib import Path
        import shutil
        import transformers as tf
        from sere.harness.model_configs import real_config, tiny_config
        from sere.harness.vllm_testing import save_random_similarity

        folder, device, dtype, layers, smoke = Path(argv[1]), torch.device(argv[2]), getattr(torch, argv[3]), argv[4], argv[5] == "1"
        zoo = Path("tests/zoo/tokenizer")
        tok = tf.AutoTokenizer.from_pretrained(zoo)
        over = {"num_hidden_layers": int(layers)} if layers else {}
        if smoke:
            cfg = tiny_config("qwen2_moe", vocab_size=len(tok), **over)
        else:
            cfg = real_config("Qwen1.5-MoE-A2.7B", **over)
        assert len(tok) <= cfg.vocab_size, (len(tok), cfg.vocab_size)
        cfg.architectures = ["Qwen2MoeForCausalLM"]
        torch.manual_seed(0)
        with torch.device(device):  # random init straight on the device
            model = tf.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        n = sum(p.numel() for p in model.parameters())
        print(f"built {type(model).__name__}: {n / 1e9:.2f} B parameters, {cfg.num_hidden_layers} layers, "
              f"{cfg.num_experts} experts, top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}, {dtype}, on {device}")
        model.save_pretrained(str(folder), max_shard_size="4GB")
        del model
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(zoo / f, folder / f)
        print("similarity:", save_random_similarity(folder, cfg, seed=0, low=0.0))
        size = sum(p.stat().st_size for p in folder.iterdir())
        print(f"saved {folder}: {size / 2**30:.1f} GiB")
    else:  # sere-tune with these arguments
        from sere.harness.tune.cli import main

        try:
            code = main(argv[1:])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
except Exception:
    import traceback
    traceback.print_exc()
    code = 1
wall = time.time() - t0
gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB
line = f"== {name}: rc {code}, wall {wall:.1f} s, peak GPU memory allocated {gpu:.2f} GiB, peak host RSS {rss:.2f} GiB"
print(line, flush=True)
with open(os.path.join(os.environ["OUT"], "summary.txt"), "a") as f:
    f.write(line + "\n")
sys.exit(code)
EOF
}
export OUT

measured build build "$MODEL_DIR" "$DEVICE" "$DTYPE" "$LAYERS" "$SMOKE" || { echo "build failed"; exit 1; }

COMMON=(--model_path "$MODEL_DIR" --device "$DEVICE" --dtype "$DTYPE" --batch_size "$BATCH" --seq_len "$SEQ_LEN")
if [ "$KL_BUDGET" = "auto" ]; then
  measured probe tune "${COMMON[@]}" --num_batches 1 --settings "S=1 rho=0" --kl_budget 1e9 --search_evals 0 \
    --output_path "$WORK/probe" --no_progress || status=1
  KL_BUDGET=$($PY -c "import json; m = json.load(open('$WORK/probe/sere_tuning.json'))['metadata']['measured']; print(f\"{max(m['kl'] / 2, 1e-12):.3g}\")" 2>/dev/null || echo 0.05)
  echo "KL budget (half the probe's S=1 rho=0 KL): $KL_BUDGET" | tee -a "$OUT/summary.txt"
fi

measured sere-tune tune "${COMMON[@]}" --num_batches "$NUM_BATCHES" --settings "$SETTINGS" --kl_budget "$KL_BUDGET" \
  --search_evals "$SEARCH_EVALS" --output_path "$WORK/tuned" || status=1
cp "$WORK"/tuned/sere_tuning* "$OUT"/ 2>/dev/null
echo "== done (status $status); in $OUT: $(ls "$OUT" | tr '\n' ' ')"
cat "$OUT/summary.txt"
exit $status
