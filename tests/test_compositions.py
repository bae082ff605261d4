"""Batch compositions over domains (sere.harness.compositions) and the per-row metrics of fidelity."""
from __future__ import annotations

import pytest
import torch

from sere.harness import compositions as comp
from sere.harness.fidelity import Composition


def _pool(L=4):
    # every token says which domain (hundreds) and which window (units) it comes from
    streams = {d: torch.arange(100) // L + 100 * (i + 1) for i, d in enumerate(["a", "b", "c", "d"])}
    return comp.window_pool(streams, L)


def test_one_domain_and_mixed_batches():
    pool = _pool()
    one = comp.one_domain(pool, "b", batch_size=4, num_batches=2)
    assert one.shape == (2, 4, 4) and bool((one // 100 == 2).all())
    mixed = comp.mixed(pool, ["a", "b", "c", "d"], batch_size=8, num_batches=2)
    assert mixed.shape == (2, 8, 4)
    assert (mixed[:, :, 0] // 100).tolist() == [[1, 2, 3, 4, 1, 2, 3, 4]] * 2  # row r from domain r % 4
    assert len(set(mixed[:, :, 0].flatten().tolist())) == 16  # no window used twice
    with pytest.raises(ValueError, match="not a multiple of the 3 domains"):
        comp.mixed(pool, ["a", "b", "c"], batch_size=8, num_batches=1)


def test_minority_row_is_the_same_request_in_both_companies():
    pool = _pool()
    crowd = comp.minority(pool, "c", "a", batch_size=5, num_batches=3)
    alone = comp.minority_alone(pool, "c", batch_size=5, num_batches=3)
    assert torch.equal(crowd[:, 0], alone[:, 0]) and bool((crowd[:, 0] // 100 == 3).all())
    assert bool((crowd[:, 1:] // 100 == 1).all()) and bool((alone[:, 1:] // 100 == 3).all())
    everything = alone.reshape(-1, 4)[:, 0].tolist()
    assert len(set(everything)) == len(everything)  # the company never repeats the minority request
    with pytest.raises(ValueError, match="windows of 4, 100 needed"):
        comp.one_domain(pool, "a", batch_size=50, num_batches=2)
    with pytest.raises(ValueError, match="unknown domain 'z'"):
        comp.minority(pool, "z", "a", 4, 1)


def test_composition_accepts_composed_batches_of_its_own_shape():
    c = Composition(batch_size=4, seq_len=4, num_windows=8)
    b = comp.one_domain(_pool(), "a", 4, 2)
    assert c.batches(b) is b
    with pytest.raises(ValueError, match="do not match"):
        Composition(batch_size=2, seq_len=4, num_windows=8).batches(b)


def test_fidelity_per_row_metrics_average_to_the_totals():
    from sere.harness.fidelity import fidelity, reference_pass
    from sere.harness.model_configs import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = tiny_config("qwen2_moe")
    model = AutoModelForCausalLM.from_config(cfg).eval()
    streams = {d: torch.randint(0, cfg.vocab_size, (400,), generator=torch.Generator().manual_seed(i)) for i, d in enumerate("ab")}
    pool = comp.window_pool(streams, 8)
    batches = comp.minority(pool, "b", "a", batch_size=4, num_batches=2)
    ref = reference_pass(model, batches, Composition(4, 8, 8), prompt_len=2, gen_len=2)
    E = cfg.num_experts
    sim = {i: torch.eye(E) * 0.5 + 0.5 for i in range(cfg.num_hidden_layers)}
    m = fidelity(model, ref, sim, select_top_k=1, threshold=0.0, greedy=False)
    assert len(m.kl_by_row) == len(m.top1_by_row) == 4
    assert sum(m.kl_by_row) / 4 == pytest.approx(m.kl, rel=1e-9)
    assert sum(m.top1_by_row) / 4 == pytest.approx(m.top1_agreement, rel=1e-9)
    assert m.kl > 0 and max(m.kl_by_row) > 0
