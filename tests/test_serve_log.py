"""The serving bench reads what SERE applied from the server's log line (sere/vllm/router.py)."""
from bench.serve import sere_layers, sere_merge

LINE = ('INFO 12-07 09:07:19 [router.py:220] SERE on 48 of 48 MoE layers (additional_config["sere"]): S=1, '
        'threshold=0.0, max_tokens=None, backend=auto (numba), sort_slots=False, merge_slots={}, '
        'similarity=/tmp/model/sere_similarity.safetensors')


def test_the_log_line_gives_the_layers_and_merge_slots_as_resolved():
    for merge in ("T <= 4 (auto)", "off (auto)", "T <= 2/3", "off"):
        text = "loading...\n" + LINE.format(merge) + "\nready\n"
        assert sere_layers(text) == (48, 48)
        assert sere_merge(text) == merge
    assert sere_layers("no sere here") is None and sere_merge("no sere here") is None


def level(concurrency, tok_s, tpot):
    return {"concurrency": concurrency, "requests": 4 * concurrency, "output_tok_s": tok_s, "ttft_ms_median": 30.0,
            "ttft_ms_p99": 40.0, "tpot_ms_median": tpot, "tpot_ms_p99": tpot + 1, "failed": 0, "incomplete": 0,
            "engine_steps": None, "steps_over_graph": None, "wall_s": 2.0, "output_tokens": 512,
            "decode_share": None, "preemptions": 0, "mean_in_flight": float(concurrency), "tokens_per_chunk": 1.0,
            "client_cpu_share": 0.02, "frontend_cpu_share": None}


def test_the_summary_gives_tok_s_and_tpot_ratios_against_stock():
    """The A/A run's shape: tok/s 0.88x at c=16 while TPOT agrees; both ratios in the table."""
    from bench.serve_report import RATIO_NOISE, summary_lines

    results = {"stock": {"levels": [level(1, 218.0, 4.386), level(16, 880.9, 15.674)], "start_s": 149.1,
                         "sere_layers": None, "server": "stock"},
               "sere-s1": {"levels": [level(1, 436.0, 2.193), level(16, 777.0, 15.524)], "start_s": 128.1,
                           "sere_layers": (48, 48), "sere_merge": "T <= 4 (auto)", "server": "sere-s1"}}
    text = "\n".join(summary_lines(results, ["## heading"]))
    assert "| tok/s vs stock | TPOT speed-up |" in text
    assert "| 2.00x | 2.00x |" in text  # c=1: both ratios
    assert "| 0.88x | 1.01x |" in text  # c=16: 15.674 / 15.524
    assert RATIO_NOISE in text and "SERE on 48 of 48 MoE layers, merge_slots=T <= 4 (auto)" in text
