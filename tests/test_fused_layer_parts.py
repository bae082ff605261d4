"""bench/fused_layer.py parts_info: a layer's time split into the rest and the routed experts."""
import pytest

from bench import fused_layer
from sere.harness.model_configs import layer_shapes


def test_parts_info_splits_the_layer_into_rest_and_experts():
    shapes = layer_shapes("Qwen1.5-MoE-A2.7B")
    bw = 3.0e12
    floor = 15 * shapes.expert_params() * 2 / bw
    info = fused_layer.parts_info(shapes, 15, layer_s=175e-6, rest_s=60e-6, bw=bw)
    assert info["rest_us"] == 60.0 and info["experts_us"] == 115.0
    assert info["experts_floor_us"] == pytest.approx(floor * 1e6, abs=0.01)
    assert info["experts_floor_share"] == pytest.approx(floor / 115e-6, abs=1e-3)
    assert fused_layer.parts_info(shapes, 15, layer_s=50e-6, rest_s=60e-6, bw=bw)["experts_floor_share"] is None
