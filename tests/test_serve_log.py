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
