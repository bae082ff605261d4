"""SereConfig: per-layer overrides and validation.

    pytest tests/test_config.py
"""
import pytest

from sere import SereConfig


def test_layer_overrides_fall_back_to_globals():
    cfg = SereConfig(select_top_k=2, threshold=0.1, layer_overrides={3: {"threshold": 0.5}, 4: {"select_top_k": 1}})
    assert (cfg.for_layer(0).select_top_k, cfg.for_layer(0).threshold) == (2, 0.1)
    assert (cfg.for_layer(3).select_top_k, cfg.for_layer(3).threshold) == (2, 0.5)
    assert (cfg.for_layer(4).select_top_k, cfg.for_layer(4).threshold) == (1, 0.1)


def test_from_dict_reads_string_layer_keys_and_rejects_unknown():
    cfg = SereConfig.from_dict({"select_top_k": 1, "threshold": 0.0, "layer_overrides": {"2": {"threshold": 0.3}},
                                "enabled_layers": [1, 2], "max_tokens": 256})
    assert cfg.for_layer(2).threshold == 0.3 and cfg.applies_to(2) and not cfg.applies_to(0)
    with pytest.raises(ValueError, match="unknown SERE setting"):
        SereConfig.from_dict({"select_topk": 1})


@pytest.mark.parametrize("kw,exc,msg", [
    (dict(select_top_k=1.5), TypeError, "select_top_k must be an int"),
    (dict(threshold="x"), TypeError, "threshold must be a real number"),
    (dict(threshold=float("nan")), TypeError, "threshold must be a real number"),
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(layer_overrides={1: {"rho": 0.2}}), ValueError, "unknown key"),
    (dict(layer_overrides={1: {"select_top_k": "2"}}), TypeError, r"layer_overrides\[1\]: select_top_k must be an int"),
])
def test_bad_settings_fail_clearly(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        SereConfig(**kw)
