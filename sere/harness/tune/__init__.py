"""`sere-tune`: fidelity and tuning of SERE on any transformers MoE checkpoint.

    sere-tune --model_path ./my-moe --batch_size 16 --kl_budget 0.05      # or python -m sere.harness.tune

Measures, against the unmodified model at fixed batch compositions, mean KL per token, top-1
agreement, perplexity ratio and distinct experts per MoE layer and decode step for a grid of
(S, rho), then searches per-layer thresholds from the best uniform setting, and writes
`sere_tuning.json`, accepted unchanged by `sere.hf.enable(model, **json)` and by vLLM as
`additional_config={"sere": json}`.

  cli      arguments, input checks (one-line errors), the table, the output files
  data     txt / jsonl / parquet text, the token stream and the windows of each batch size
  measure  one setting -> metrics against the stock model (StepwiseSere: SERE per decode step)
  search   the settings grid syntax, the grid and the greedy per-layer search
  plot     the Pareto plot (matplotlib optional)
"""
from sere.harness.tune.cli import main

__all__ = ["main"]
