"""Kernel families of the decode profile (bench/profile_families.py) and the report of
bench/gpu/profile_decode.py, on synthetic kernel lists: no GPU, no vLLM."""
from __future__ import annotations

import pytest

from bench.gpu import profile_decode
from bench.gpu.profile_decode import counts_ratios, report
from bench.profile_families import (OTHER, FamilyTime, expert_cost_split, family_of, family_times, ideal_speedup,
                                     markdown, total_us)


@pytest.mark.parametrize("name, family", [
    ("fused_moe_kernel", "routed experts"),
    ("_ZN6cudapy4sere7kernels13numba_kernels14reroute_kernel", "sere re-route"),
    ("moe_align_block_size_kernel", "moe align"),
    ("void vllm::moe::topkGatingSoftmax<float, 8>", "router top-k"),
    ("nvjet_tst_128x64_64x8_2x1_v_bz_TNN", "dense gemm"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32", "dense gemm"),
    ("kernel_unified_attention_2d", "attention"),
    ("void vllm::moe::moe_sum_kernel<c10::BFloat16, 8>", "moe sum / reduce"),
    ("triton_poi_fused_rms_norm_0", "norm"),
    ("act_and_mul_kernel", "activation"),
    ("something_unheard_of", OTHER),
])
def test_family_of(name, family):
    assert family_of(name) == family


def test_family_times_sum_and_refuse_negative_times():
    fams = family_times([("fused_moe_kernel", 100.0, 4), ("fused_moe_kernel_gptq", 50.0), ("nvjet_x", 30.0)])
    assert fams["routed experts"].us == 150.0 and fams["routed experts"].calls == 5 and total_us(fams) == 180.0
    with pytest.raises(ValueError, match="negative"):
        family_times([("x", -1.0)])


def test_ideal_speedup_scales_only_the_routed_experts():
    fams = family_times([("fused_moe_kernel", 600.0), ("nvjet_x", 400.0)])
    assert ideal_speedup(fams, 0.5) == pytest.approx(1000 / 700)
    assert ideal_speedup(fams, 1.0) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ideal_speedup(fams, 0.0)


def test_expert_cost_split_recovers_a_line_and_refuses_one_point():
    fixed, per_expert = 10.0, 2.0
    stock = FamilyTime(us=96 * (fixed + per_expert * 80), calls=96)  # 80 distinct experts
    sere = FamilyTime(us=96 * (fixed + per_expert * 16), calls=96)
    assert expert_cost_split(stock, sere, 80, 16) == pytest.approx((10.0, 2.0))
    assert expert_cost_split(stock, sere, 16.5, 16) is None  # the same count: nothing to separate
    assert expert_cost_split(stock, FamilyTime(), 80, 16) is None  # no launches


def test_markdown_and_report_per_step():
    def engine(expert_us):
        return {"rows": [{"batch": 16, "new_tokens": 10, "wall_s": 0.02, "wall_profiled_s": 0.04,
                          "times": "device kernels", "kernels": [["fused_moe_kernel", expert_us, 10], ["nvjet_x", 500.0, 10]]}]}

    results = {"stock": engine(1500.0), "sere-s1": engine(500.0)}
    text = report(results, expert_ratio=0.25)
    assert "| routed experts | 0.150 | 75.0 % | 0.050 | 50.0 % |" in text  # ms per step: 1500 us / 10 steps
    assert "kernel time stock / sere-s1: 2.00x" in text
    # 2000 / (2000 - 1500 * 0.75) = 2.29x ideal; reached 2.00x = 87.5 % of it
    assert "ideal for sere-s1 (stock's routed-expert time x 0.250, as given; the rest unchanged): 2.29x; reached 2.00x, 88 % of it" in text
    assert "GPU busy 5 %" in text  # 2 ms of kernels in 40 ms profiled
    assert markdown({}) == "(no profile)"


def test_report_takes_each_batch_ratio_from_the_counts_engine(tmp_path):
    def row(b, expert_us):
        return {"batch": b, "new_tokens": 10, "wall_s": 0.02, "wall_profiled_s": 0.04, "times": "device kernels",
                "kernels": [["fused_moe_kernel", expert_us, 10], ["nvjet_x", 500.0, 10]]}

    results = {"stock": {"rows": [row(1, 1000.0), row(16, 1500.0)]}, "sere-s1": {"rows": [row(1, 900.0), row(16, 500.0)]}}
    counts = counts_ratios({"rows": [{"engine": "sere-s1", "batch": 16, "experts_before": 80.0, "experts_after": 20.0},
                                     {"engine": "sere-s2", "batch": 16, "experts_before": 80.0, "experts_after": 40.0}]})
    text = report(results, None, counts)
    assert "x 0.250, 20.0 / 80.0 distinct experts, counts engine; the rest unchanged): 2.29x; reached 2.00x, 88 % of it" in text
    assert text.count("ideal for") == 1  # batch 1 has no counts and no ratio was given: no ideal there
    # per launch (10 launches each): stock 150 us at 80 experts, SERE 50 us at 20 -> 16.7 us + 1.67 us per expert
    assert "routed-expert kernel per launch = 16.7 us + 1.67 us per distinct expert (stock and sere-s1" in text
    assert "the fixed part, 33 % of sere-s1's expert time" in text
    # a bad counts file is refused before any engine starts
    bad = tmp_path / "counts.json"
    bad.write_text('{"rows": [{"engine": "sere-s1"}]}')
    with pytest.raises(SystemExit):
        profile_decode.main(["--counts", str(bad), "--out", str(tmp_path / "out")])


def test_report_says_when_kernels_overlap_instead_of_an_idle_time():
    # Kernels on two streams (vLLM's shared expert beside the routed experts) sum to more than the
    # wall time: the report must not print a busy share over 100 % as if it were one.
    row = {"batch": 1, "new_tokens": 10, "wall_s": 0.001, "wall_profiled_s": 0.0012,
           "times": "device kernels", "kernels": [["fused_moe_kernel", 900.0, 10], ["nvjet_x", 500.0, 10]]}
    text = report({"stock": {"rows": [row]}}, expert_ratio=None)
    assert "kernels overlap (more than one stream)" in text and "GPU busy" not in text
