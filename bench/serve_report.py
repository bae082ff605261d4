"""The serving bench's report: what explains each level's time, and the summary table.

    from bench.serve_report import diagnose, summary_lines
    lines = summary_lines({"stock": result, "sere-s1": result2}, heading=["## ..."])

`diagnose(level)` says in one line where a level's wall time went (bench/serve.py measures:
decode share, engine steps against the in-phase count, steps above the largest CUDA graph size,
preemptions, requests in flight, tokens per streamed chunk, CPU shares). `WHY_C16_VS_C64` lists the hypotheses for why stock
at concurrency 16 can take as long as at 64 (issue 14), each with the measurement that tests it.
"""
from __future__ import annotations

from bench.extra_info import markdown_table


def diagnose(level: dict) -> str:
    """One line saying where a level's wall time went, from its measurements (module docstring)."""
    parts = [f"c={level['concurrency']}: {level['requests']} requests in {level['wall_s']:.2f} s"]
    if level["decode_share"] is not None:
        parts.append(f"decode at median TPOT explains {level['decode_share']:.0%} of it")
    if level["engine_steps"] is not None:
        steps = f"{level['engine_steps']} engine steps (in-phase clients: {level['ideal_steps']}), " \
                f"{level['tokens_per_step']} tokens each"
        if level["steps_over_graph"] is not None:
            steps += f", {level['steps_over_graph']} above the largest CUDA graph size"
        parts.append(steps)
        if level["preemptions"]:
            parts.append(f"{level['preemptions']} KV-cache preemptions")
    parts.append(f"{level['mean_in_flight']:.1f} requests in flight on average")
    parts.append(f"{level['tokens_per_chunk']:.2f} tokens per streamed chunk")
    cpu = [f"client {level['client_cpu_share']:.0%}"]
    if level["frontend_cpu_share"] is not None:
        cpu.append(f"server front end {level['frontend_cpu_share']:.0%}")
    parts.append("CPU " + ", ".join(cpu))
    return "; ".join(parts)


WHY_C16_VS_C64 = """\
Why stock at concurrency 16 can take as long as at 64 (issue 14's H200 reference: 164 requests per
server, which suggests 4 + 32 + 128, i.e. 2 requests per client at 16 and at 64). Hypotheses, each
with the measurement above that tests it:
1. Step time grows slowly with batch (the main suspect): with equal requests per client a level's
   wall time is about rounds x new tokens x the decode step time, and a stock step at batch 16
   already reads most of the weights (Qwen3-30B-A3B under uniform routing, which dummy weights
   approach: ~84 of 128 experts per layer at 16, ~126 at 64, layer bench on the H100; plus every
   dense weight at both), so it costs nearly as much as a step at 64, which makes 4x the tokens.
   Test: median TPOT at 16 / at 64 close to the wall-time ratio, decode share high. SERE S=1 reads
   ~16 experts per layer at 16, hence its large gain there. Compare tok/s, not wall time.
2. Prefill interleaving: vLLM schedules a new prompt's prefill into the same step as the running
   decodes, which stalls every stream for that step. Closed-loop clients drift out of phase after
   their first request, so prefills spread over many steps. Test: engine steps above the in-phase
   count, ITL p99 / max, a low decode share.
3. CUDA graphs: graphs are captured for batch sizes up to the largest capture size (64 here); a step
   with a prefill has more tokens (64-token prompt + running decodes) and runs outside the graphs.
   Test: steps above the largest CUDA graph size (on the GPU; the CPU smoke run is eager).
4. Host bound: the API server's front end (one Python process: HTTP, detokenizing, SSE framing for
   every stream at every step) or the client saturates a core at high concurrency. Test: CPU share
   of the front end / client near 100 %, more than one token per streamed chunk (vLLM merges the
   outputs of several steps when the front end falls behind).
5. KV-cache preemptions (recomputed requests). Test: preemptions > 0.
These are hypotheses until a GPU run's numbers say which hold."""


# What an A/A run (both servers stock: bench/RESULTS.md section 24, H100) showed of the two ratios.
RATIO_NOISE = ("tok/s vs stock carries where the prefills fell (an A/A run of this workload, both servers "
               "stock, read 0.88x-1.04x); TPOT speed-up = stock's median TPOT / this one's, decode alone "
               "(the A/A run: within 1.5 %).")


def level_ratios(result: dict) -> list[str]:
    """Each level against the largest one of the same server: wall time, tokens and median TPOT."""
    levels = sorted(result["levels"], key=lambda lv: lv["concurrency"])
    if len(levels) < 2:
        return []
    top = levels[-1]
    out = []
    for lv in levels[:-1]:
        tpot = (f", median TPOT {lv['tpot_ms_median'] / top['tpot_ms_median']:.2f}"
                if lv["tpot_ms_median"] and top["tpot_ms_median"] else "")
        out.append(f"{result['server']} c={lv['concurrency']} vs c={top['concurrency']}: wall time "
                   f"{lv['wall_s'] / top['wall_s']:.2f}, output tokens {lv['output_tokens'] / top['output_tokens']:.2f}{tpot}")
    return out


def _cell(x) -> str:
    return "-" if x is None else str(x)


def summary_lines(results: dict[str, dict], heading: list[str]) -> list[str]:
    """A markdown summary of servers' results (stock first): one table row per server and
    level, the SERE / stock ratios of the same run, the diagnosis lines and the hypotheses."""
    stock = {lv["concurrency"]: lv for lv in results.get("stock", {}).get("levels", [])}
    rows = []
    for name, r in results.items():
        for lv in r["levels"]:
            s = stock.get(lv["concurrency"]) if name != "stock" else None
            ratio = f"{lv['output_tok_s'] / s['output_tok_s']:.2f}x" if s and s["output_tok_s"] else ""
            tpot_ratio = (f"{s['tpot_ms_median'] / lv['tpot_ms_median']:.2f}x"
                          if s and s["tpot_ms_median"] and lv["tpot_ms_median"] else "")
            rows.append([name, lv["concurrency"], lv["requests"], f"{lv['output_tok_s']:.1f}",
                         f"{lv['ttft_ms_median']} / {lv['ttft_ms_p99']}", f"{lv['tpot_ms_median']} / {lv['tpot_ms_p99']}",
                         f"{lv['failed']} / {lv['incomplete']}", _cell(lv["engine_steps"]), _cell(lv["steps_over_graph"]),
                         ratio, tpot_ratio])
    lines = [*heading, "", *markdown_table(
        ["server", "concurrency", "requests", "output tok/s", "TTFT ms median / p99", "TPOT ms median / p99",
         "failed / incomplete", "engine steps", "steps > graph", "tok/s vs stock", "TPOT speed-up"], "lrrrrrrrrrr",
        rows), "", RATIO_NOISE, ""]
    for name, r in results.items():
        layers = r.get("sere_layers")
        merge = f", merge_slots={r['sere_merge']}" if r.get("sere_merge") else ""
        lines.append(f"{name}: /health after {r['start_s']} s; SERE on "
                     f"{'no' if layers is None else f'{layers[0]} of {layers[1]}'} MoE layers{merge}")
        lines += [f"- {diagnose(lv)}" for lv in r["levels"]] + [f"- {x}" for x in level_ratios(r)]
    return lines + ["", WHY_C16_VS_C64]
