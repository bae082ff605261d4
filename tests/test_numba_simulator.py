"""The Numba CUDA kernels under the CUDA simulator, against the plain-loop reference.

Run: `pytest tests/test_numba_simulator.py` on a machine without a GPU (the root conftest sets
NUMBA_ENABLE_CUDASIM=1 before Numba is imported). With a real GPU these tests skip: the same
kernels run natively in tests/test_gpu_kernels.py. The simulator runs every thread as a Python
thread and every block barrier is slow, so shapes stay small; the simulator launches the kernel
with groups of 4 lanes (instead of 32) and at most 2 blocks, so the grid-stride loop and the
cross-lane argmax both run.
Index letters: T = tokens, k = experts per token, E = experts, S = primary slots.
"""
from __future__ import annotations

import sys

import numpy as np
import pytest

from sere.kernels import numba_cuda as nc
from sere.kernels import numba_launch, numba_numpy
from sere.kernels.reference import reroute_reference, reroute_reference_in_weight_order
from sere.kernels.research_baseline import reroute_research_baseline_numpy

pytestmark = pytest.mark.skipif(
    not nc.simulator_enabled(),
    reason="CUDA simulator is off (a GPU is present): tests/test_gpu_kernels.py covers these kernels",
)

# (T, E, k): extremes and odd sizes. Each case sweeps every S in 0..k with fresh inputs.
SHAPES = [(1, 8, 1), (1, 60, 8), (2, 8, 4), (2, 60, 8), (33, 8, 4), (33, 60, 8)]
THRESHOLDS = (0.0, 0.5, 1.0)  # 0.5 and 1.0 sit exactly on similarity values: `>=` is tested
ID_DTYPES = (np.int32, np.int64)
SIM_DTYPES = (np.float32, np.float16)


@pytest.fixture(autouse=True, scope="module")
def _fast_thread_switching():
    """The simulator's block runner polls its threads; a short GIL switch interval lets the
    simulated threads reach each barrier sooner (several times faster here)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    yield
    sys.setswitchinterval(old)


def random_case(rng, T, E, k, id_dtype, sim_dtype):
    """ids with -1 and >= E sprinkled in, primary slots drawn from a random subset of experts
    (so the primary set is neither empty nor everything), and similarities on a coarse grid
    of quarters (ties everywhere, exact in float16 and bfloat16)."""
    ids = rng.integers(0, E, size=(T, k))  # T, k
    subset = rng.choice(E, size=rng.integers(1, E + 1), replace=False)
    ids[:, : max(1, k // 2)] = rng.choice(subset, size=(T, max(1, k // 2)))
    invalid = rng.random((T, k)) < 0.12
    ids[invalid] = rng.choice(np.array([-1, E, E + 3]), size=int(invalid.sum()))
    sim = (rng.integers(0, 5, size=(E, E)) / 4).astype(sim_dtype)  # E, E in {0, .25, .5, .75, 1}
    return ids.astype(id_dtype), sim


def assert_same_ids(got, want, context):
    assert got.dtype == want.dtype, context
    np.testing.assert_array_equal(got, want, err_msg=str(context))


@pytest.mark.parametrize("T,E,k", SHAPES)
def test_kernel_matches_reference_every_S(T, E, k):
    rng = np.random.default_rng([T, E, k])
    for S in range(k + 1):
        id_dtype = ID_DTYPES[S % 2]
        sim_dtype = SIM_DTYPES[(S // 2) % 2]
        for rho in THRESHOLDS:
            ids, sim = random_case(rng, T, E, k, id_dtype, sim_dtype)
            want = reroute_reference(ids, sim, S, rho)
            got = nc.reroute_numba_numpy(ids, sim, S, rho)
            assert_same_ids(got, want, (T, E, k, S, rho, id_dtype, sim_dtype))


def random_weights(rng, T, k, dtype):
    """Router weights in any slot order, on a coarse grid so that ties between slots occur."""
    return (rng.integers(1, 6, size=(T, k)) / 8).astype(dtype)  # T, k


@pytest.mark.parametrize("T,E,k", SHAPES)
def test_weight_order_kernel_matches_sort_reroute_scatter(T, E, k):
    """Unsorted slots: the weight-order kernel equals the reference applied in each token's
    weight order (stable, descending) with every id back in its own slot, for every S."""
    rng = np.random.default_rng([T, E, k, 7])
    for S in range(k + 1):
        w_dtype = SIM_DTYPES[S % 2]
        for rho in THRESHOLDS[::2]:
            ids, sim = random_case(rng, T, E, k, ID_DTYPES[(S // 2) % 2], SIM_DTYPES[(S + 1) % 2])
            weights = random_weights(rng, T, k, w_dtype)
            want = reroute_reference_in_weight_order(ids, weights, sim, S, rho)
            got = nc.reroute_numba_numpy(ids, sim, S, rho, weights=weights)
            assert_same_ids(got, want, (T, E, k, S, rho, w_dtype))


def test_weight_order_kernel_with_sorted_weights_is_the_plain_kernel():
    rng = np.random.default_rng(11)
    ids, sim = random_case(rng, 33, 60, 8, np.int64, np.float32)
    weights = -np.sort(-rng.random((33, 8)).astype(np.float32), axis=1)  # already descending, no ties
    for S in (1, 2, 5):
        assert_same_ids(nc.reroute_numba_numpy(ids, sim, S, 0.0, weights=weights),
                        nc.reroute_numba_numpy(ids, sim, S, 0.0), S)


def test_weight_order_reference_moves_the_light_slots():
    """A hand case: token slots [a, b, c] with weights [0.1, 0.7, 0.2] and S = 1: b is the head
    (primary); a and c move to b when similar enough, and stay in their own slots."""
    ids = np.array([[3, 1, 2]])
    weights = np.array([[0.1, 0.7, 0.2]], dtype=np.float32)
    sim = np.eye(4, dtype=np.float32)
    sim[3, 1] = sim[2, 1] = 0.9
    got = reroute_reference_in_weight_order(ids, weights, sim, 1, 0.5)
    assert got.tolist() == [[1, 1, 1]]
    sim[2, 1] = 0.1  # c is critical now
    assert reroute_reference_in_weight_order(ids, weights, sim, 1, 0.5).tolist() == [[1, 1, 2]]


# The two-launch (large-T) path, forced at simulator sizes: it must give the same ids bit for bit.
TWO_LAUNCH_SHAPES = [(1, 8, 2), (2, 60, 8), (33, 8, 4), (33, 60, 8)]


@pytest.mark.parametrize("flags_build", ["block", "scatter"])
@pytest.mark.parametrize("T,E,k", TWO_LAUNCH_SHAPES)
def test_two_launch_path_matches_reference_every_S(T, E, k, flags_build):
    rng = np.random.default_rng([T, E, k, 2])
    for S in range(k + 1):
        rho = THRESHOLDS[S % 3]
        ids, sim = random_case(rng, T, E, k, ID_DTYPES[S % 2], SIM_DTYPES[(S // 2) % 2])
        want = reroute_reference(ids, sim, S, rho)
        got = nc.reroute_numba_numpy(ids, sim, S, rho, two_launch=True, flags_build=flags_build)
        assert_same_ids(got, want, (T, E, k, S, rho, flags_build))


@pytest.mark.parametrize("flags_build", ["block", "scatter"])
def test_two_launch_path_edge_cases(flags_build):
    """Ties across lanes, only invalid primary ids (empty P), bfloat16 bits: through the flags buffer."""
    two = dict(two_launch=True, flags_build=flags_build)
    ties = np.array([[59, 13, 7, 42]], dtype=np.int32)
    got = nc.reroute_numba_numpy(ties, np.ones((60, 60), np.float32), 2, 1.0, **two)
    np.testing.assert_array_equal(got, [[59, 13, 13, 13]])
    invalid_head = np.array([[-1, 3, 4], [9, 5, 2]], dtype=np.int64)
    got = nc.reroute_numba_numpy(invalid_head, np.ones((8, 8), np.float32), 1, 0.0, **two)
    np.testing.assert_array_equal(got, invalid_head)
    rng = np.random.default_rng(23)
    ids, sim32 = random_case(rng, 33, 60, 8, np.int32, np.float32)
    sim32 = sim32 - np.float32(0.375)
    bits = (sim32.view(np.uint32) >> 16).astype(np.uint16).view(np.int16)
    got = nc.reroute_numba_numpy(ids, bits, 3, -0.125, bf16_bits=True, **two)
    assert_same_ids(got, reroute_reference(ids, sim32, 3, -0.125), "bf16")


def test_unknown_flags_build_is_refused():
    ids = np.array([[1, 2, 3]], dtype=np.int32)
    with pytest.raises(ValueError, match="flags_build must be one of block, scatter, got 'grid'"):
        nc.reroute_numba_numpy(ids, np.ones((8, 8), np.float32), 1, 0.0, two_launch=True, flags_build="grid")


def test_shape_rule_picks_two_launches_from_the_threshold(monkeypatch):
    """The rule reads only T, k and S; with the threshold lowered, the default call takes the
    two-launch path (checked by making that path's kernel the only one that can run)."""
    assert nc.use_two_launch(4096, 8, 1) and not nc.use_two_launch(256, 8, 7)  # decode: one launch
    monkeypatch.setattr(numba_launch, "TWO_LAUNCH_MIN_TOKENS", 33)
    assert nc.use_two_launch(33, 8, 2) and not nc.use_two_launch(32, 8, 2)
    assert not nc.use_two_launch(33, 8, 0) and not nc.use_two_launch(33, 8, 8)  # identity: one launch
    rng = np.random.default_rng(29)
    ids, sim = random_case(rng, 33, 60, 8, np.int64, np.float32)
    one_launch_compiled = numba_numpy._array_kernel

    def refuse_one_launch(sim_kind, cols, threads, lanes, two_launch=False):
        assert two_launch, "the shape rule should have picked the two-launch path"
        return one_launch_compiled(sim_kind, cols, threads, lanes, two_launch)

    monkeypatch.setattr(numba_numpy, "_array_kernel", refuse_one_launch)
    assert_same_ids(nc.reroute_numba_numpy(ids, sim, 2, 0.5), reroute_reference(ids, sim, 2, 0.5), "auto")


@pytest.mark.parametrize("T,E,k,S", [(2, 60, 8, 2), (33, 8, 4, 1)])
def test_bfloat16_bits_match_reference(T, E, k, S):
    """bfloat16 arrives as int16 bits (torch bf16 has no array interface); the kernel widens them."""
    rng = np.random.default_rng([T, E, k, S, 16])
    ids, sim32 = random_case(rng, T, E, k, np.int64, np.float32)
    sim32 = sim32 - np.float32(0.375)  # negative values too: the sign bit must survive widening
    bits = (sim32.view(np.uint32) >> 16).astype(np.uint16).view(np.int16)  # exact: quarters fit bf16
    for rho in (-0.125, 0.125):
        want = reroute_reference(ids, sim32, S, rho)
        got = nc.reroute_numba_numpy(ids, bits, S, rho, bf16_bits=True)
        assert_same_ids(got, want, (T, E, k, S, rho))


def test_smallest_index_wins_ties_across_lanes():
    """Every candidate ties: the answer is the smallest primary expert, held by another lane."""
    E = 60
    ids = np.array([[59, 13, 7, 42]], dtype=np.int32)  # primary {59, 13} (S=2), lanes 3 and 1 of 4
    sim = np.ones((E, E), dtype=np.float32)
    got = nc.reroute_numba_numpy(ids, sim, 2, 1.0)
    np.testing.assert_array_equal(got, [[59, 13, 13, 13]])


def test_threshold_above_every_similarity_keeps_ids():
    rng = np.random.default_rng(7)
    ids, sim = random_case(rng, 2, 60, 8, np.int64, np.float32)
    np.testing.assert_array_equal(nc.reroute_numba_numpy(ids, sim, 2, 1.5), ids)


def test_only_invalid_primary_ids_is_identity():
    ids = np.array([[-1, 3, 4], [9, 5, 2]], dtype=np.int32)  # E = 8: -1 and 9 are invalid
    sim = np.ones((8, 8), dtype=np.float32)
    np.testing.assert_array_equal(nc.reroute_numba_numpy(ids, sim, 1, 0.0), ids)


def test_zero_tokens_give_empty_output():
    out = nc.reroute_numba_numpy(np.zeros((0, 4), np.int64), np.ones((8, 8), np.float32), 1, 0.0)
    assert out.shape == (0, 4) and out.dtype == np.int64


@pytest.mark.parametrize(
    "ids,sim,match",
    [
        (np.zeros((2, 4), np.float32), np.ones((8, 8), np.float32), "int32/int64"),
        (np.zeros(4, np.int32), np.ones((8, 8), np.float32), "2-D"),
        (np.zeros((2, 4), np.int32), np.ones((8, 9), np.float32), "square"),
        (np.zeros((2, 4), np.int32), np.ones((8, 8), np.int32), "float32/float16"),
        (np.zeros((2, 4), np.int32), np.ones((nc.MAX_EXPERTS + 1,) * 2, np.float32), "at most"),
    ],
)
def test_bad_input_raises_clear_error(ids, sim, match):
    with pytest.raises((TypeError, ValueError), match=match):
        nc.reroute_numba_numpy(ids, sim, 1, 0.0)


@pytest.mark.parametrize("T,E,k", [(1, 8, 4), (33, 60, 8)])
def test_research_baseline_matches_reference(T, E, k):
    rng = np.random.default_rng([T, E, k, 99])
    for S in range(k + 1):
        ids, sim = random_case(rng, T, E, k, ID_DTYPES[S % 2], SIM_DTYPES[S % 2])
        rho = THRESHOLDS[S % 3]
        want = reroute_reference(ids, sim, S, rho)
        assert_same_ids(reroute_research_baseline_numpy(ids, sim, S, rho), want, (T, E, k, S, rho))


# ---- the fused router top-k + re-route kernel (sere.kernels.numba_topk) ------------------------
TOPK_SHAPES = [(1, 8, 2), (5, 16, 4), (9, 60, 8), (33, 8, 4), (6, 30, 6)]  # P built 4 / 4 / 1 / 4 / 2 tokens per group


@pytest.mark.parametrize("T,E,k", TOPK_SHAPES)
def test_fused_topk_reroute_matches_reference(T, E, k):
    """Every S, both renormalize modes, float32 and float16 logits, ties among logits (a coarse
    grid: the smaller expert wins) and among similarities; ids exact, weights to float rounding
    (exp and sum order differ between the simulator, the GPU and NumPy)."""
    from sere.kernels.numba_numpy import topk_reroute_numba_numpy
    from sere.kernels.reference import topk_reroute_reference

    rng = np.random.default_rng([T, E, k, 5])
    for S in range(k + 1):
        ties = S % 2 == 0
        logits = (rng.integers(-4, 5, size=(T, E)) / 2 if ties else rng.standard_normal((T, E))).astype(SIM_DTYPES[S % 2])
        sim = (rng.integers(0, 5, size=(E, E)) / 4).astype(np.float32)
        for renormalize in (False, True):
            rho = THRESHOLDS[(S + renormalize) % 3]
            w, ids = topk_reroute_numba_numpy(logits, k, renormalize, sim, S, rho)
            rw, rids = topk_reroute_reference(logits, k, renormalize, sim, S, rho)
            assert_same_ids(ids, rids, (T, E, k, S, renormalize, rho))
            np.testing.assert_allclose(w, rw, rtol=2e-6, atol=1e-7, err_msg=str((T, E, k, S, renormalize)))


def test_fused_topk_reroute_gpu_layout():
    """The GPU's layout for E = 128 (warp-wide groups, four columns a lane; P built by groups of
    8 lanes, 16 columns each), more tokens than one block's chunk."""
    from sere.kernels.numba_numpy import topk_reroute_numba_numpy
    from sere.kernels.numba_topk import phase1_factor
    from sere.kernels.reference import topk_reroute_reference

    assert phase1_factor(4) == 4
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((5, 128)).astype(np.float32)
    sim = rng.random((128, 128)).astype(np.float32)
    for S, rho in ((1, 0.0), (2, 0.5)):
        w, ids = topk_reroute_numba_numpy(logits, 8, True, sim, S, rho, threads=64, lanes=32, max_blocks=2)
        rw, rids = topk_reroute_reference(logits, 8, True, sim, S, rho)
        assert_same_ids(ids, rids, (S, rho))
        np.testing.assert_allclose(w, rw, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("T,max_blocks,chunk", [(8, 1, 8), (9, 1, 8), (9, 2, 8), (3, 2, 8), (3, 2, 1), (9, 2, 1),
                                                (5, 1, 2), (1, 2, 1)])
def test_fused_topk_builds_p_in_either_pass(T, max_blocks, chunk):
    """One block holding every token (T <= its chunk, a grid of 1) sets P's flags from its own top-k
    picks and skips the separate pass over all tokens; a block with more tokens than its chunk
    (several rounds) or a grid of two takes that pass. Chunks of 8 (a token per group of 4 lanes),
    2 and 1 token (idle groups in step 2, slots of several blocks side by side). All give the reference."""
    from sere.kernels.numba_numpy import topk_reroute_numba_numpy
    from sere.kernels.numba_topk import topk_grid_blocks
    from sere.kernels.reference import topk_reroute_reference

    rng = np.random.default_rng([T, max_blocks, chunk])
    logits = (rng.integers(-4, 5, size=(T, 16)) / 2).astype(np.float32)  # ties: the smaller expert
    sim = (rng.integers(0, 5, size=(16, 16)) / 4).astype(np.float32)
    blocks = topk_grid_blocks(T, 32, 4, max_blocks, chunk)
    assert (blocks == 1 and T <= chunk) == ((T, max_blocks) in ((8, 1), (1, 2)) or (T, chunk) == (3, 8))  # both passes
    for S, rho in ((1, 0.0), (2, 0.5), (3, 0.25)):
        w, ids = topk_reroute_numba_numpy(logits, 6, True, sim, S, rho, threads=32, lanes=4, max_blocks=max_blocks,
                                          chunk=chunk)
        rw, rids = topk_reroute_reference(logits, 6, True, sim, S, rho)
        assert_same_ids(ids, rids, (T, max_blocks, S, rho))
        np.testing.assert_allclose(w, rw, rtol=2e-6, atol=1e-7)


def test_fused_topk_chunk_rule():
    """One token: the whole block. More: as many tokens as let their k slots fit the groups in one
    round (at least one), growing past MAX_CHUNKS chunks up to the block's groups; the grid then
    covers every chunk up to its cap."""
    from sere.kernels.numba_topk import topk_chunk_tokens, topk_grid_blocks, topk_launch_shape

    assert topk_chunk_tokens(1, 8, 8) == 8
    assert [topk_chunk_tokens(T, 8, 8) for T in (2, 16, 64, 65, 128, 256, 512, 4096)] == [1, 1, 1, 2, 2, 4, 8, 8]
    assert topk_chunk_tokens(16, 4, 8) == 2 and topk_chunk_tokens(16, 6, 8) == 1 and topk_chunk_tokens(16, 2, 8) == 4
    assert topk_grid_blocks(64, 256, 32, 528, 1) == 64 and topk_grid_blocks(4096, 256, 32, 528, 1) == 528
    assert topk_grid_blocks(64, 256, 32, 528) == 8  # the default chunk: a token per group
    # a launch's (chunk, blocks): the rule's, a given chunk's, the merging variant's one block
    assert topk_launch_shape(256, 8, 256, 32, 528) == (4, 64) and topk_launch_shape(64, 8, 256, 32, 528, chunk=2) == (2, 32)
    assert topk_launch_shape(4, 8, 256, 32, 528, merge=True, chunk=2) == (8, 1)


def test_fused_topk_refuses_a_chunk_past_its_groups():
    from sere.kernels.numba_topk import make_topk_reroute_kernel

    with pytest.raises(ValueError, match="chunk must be in 1..8"):
        make_topk_reroute_kernel("float32", "float32", 4, 32, 4, 4, chunk=9)
    with pytest.raises(ValueError, match="merging variant"):
        make_topk_reroute_kernel("float32", "float32", 4, 32, 4, 4, merge=True, chunk=2)


def test_fused_topk_kernel_is_built_for_one_k():
    from sere.kernels.numba_numpy import topk_reroute_numba_numpy
    from sere.kernels.numba_topk import MAX_K, make_topk_reroute_kernel

    for bad in (0, MAX_K + 1):
        with pytest.raises(ValueError, match="compiled for one k"):
            make_topk_reroute_kernel("float32", "float32", 4, 32, 4, bad)
    logits = np.arange(8, dtype=np.float32)[None, ::-1].copy()  # expert 0 largest
    sim = np.full((8, 8), 0.5, dtype=np.float32)
    for k in (2, 3):  # two k in one process: each call gets its own k's kernel
        w, ids = topk_reroute_numba_numpy(logits, k, True, sim, 0, 0.0)
        assert ids.tolist() == [list(range(k))]
        np.testing.assert_allclose(w.sum(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("T,E,k", [(1, 8, 4), (3, 16, 6), (8, 16, 4), (2, 60, 8)])
def test_fused_topk_merging_matches_topk_reroute_then_merge(T, E, k):
    """The merging variant (one block): ids bit for bit and weights to float rounding against the
    reference top-k + re-route followed by the reference merge, for every S and both renormalize
    modes; merged slots are -1 with weight 0, an expert's first slot holds the summed weight."""
    from sere.kernels.numba_numpy import topk_reroute_numba_numpy
    from sere.kernels.reference import merge_duplicate_slots_reference, topk_reroute_reference

    rng = np.random.default_rng([T, E, k, 17])
    merged_any = False
    for S in range(k + 1):
        logits = (rng.integers(-4, 5, size=(T, E)) / 2 if S % 2 == 0 else rng.standard_normal((T, E))).astype(np.float32)
        sim = (rng.integers(0, 5, size=(E, E)) / 4).astype(np.float32)
        for renormalize in (False, True):
            rho = THRESHOLDS[(S + renormalize) % 3]
            w, ids = topk_reroute_numba_numpy(logits, k, renormalize, sim, S, rho, merge=True)
            rw, rids = topk_reroute_reference(logits, k, renormalize, sim, S, rho)
            mids, mw = merge_duplicate_slots_reference(rids, rw.astype(np.float32), E)
            assert_same_ids(ids, mids, (T, E, k, S, renormalize, rho))
            np.testing.assert_allclose(w, mw, rtol=2e-6, atol=1e-7, err_msg=str((T, E, k, S, renormalize)))
            merged_any |= bool((ids == -1).any())
    assert merged_any  # the cases do merge something


def test_fused_topk_merging_refuses_more_tokens_than_one_block():
    from sere.kernels.numba_numpy import topk_reroute_numba_numpy

    with pytest.raises(ValueError, match="one block"):
        topk_reroute_numba_numpy(np.zeros((9, 8), np.float32), 2, True, np.eye(8, dtype=np.float32), 1, 0.0,
                                 threads=32, lanes=4, merge=True)


def test_fused_topk_without_rerouting_is_the_plain_top_k():
    from sere.kernels.numba_numpy import topk_reroute_numba_numpy

    rng = np.random.default_rng(3)
    logits = rng.standard_normal((7, 16)).astype(np.float32)
    sim = np.ones((16, 16), dtype=np.float32)
    for S in (0, 4):  # S <= 0 or S >= k: identity re-routing
        w, ids = topk_reroute_numba_numpy(logits, 4, True, sim, S, 0.0)
        np.testing.assert_array_equal(ids, np.argsort(-logits, axis=1, kind="stable")[:, :4])
        np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)


def test_fused_topk_rejects_bad_input():
    from sere.kernels.numba_numpy import topk_reroute_numba_numpy

    sim = np.eye(8, dtype=np.float32)
    with pytest.raises(ValueError, match="top_k"):
        topk_reroute_numba_numpy(np.zeros((2, 8), np.float32), 9, False, sim, 1, 0.0)
    with pytest.raises(TypeError, match="sim"):
        topk_reroute_numba_numpy(np.zeros((2, 8), np.float32), 2, False, np.eye(4, dtype=np.float32), 1, 0.0)
    with pytest.raises(TypeError, match="router_logits"):
        topk_reroute_numba_numpy(np.zeros((2, 8), np.int32), 2, False, sim, 1, 0.0)


# The merging kernel (re-route, then one slot per expert per token, one block): ids and weights
# bit for bit against the reference re-routing followed by the reference merge.
MERGE_SHAPES = [(1, 8, 4), (1, 60, 8), (3, 60, 8), (9, 8, 4), (2, 48, 40)]  # the last two: several rounds of 32 slots,
# a token's slots in two rounds


def merged_reference(ids, weights, sim, S, rho, in_weight_order):
    from sere.kernels.reference import merge_duplicate_slots_reference

    E = sim.shape[0]
    new = (reroute_reference_in_weight_order(ids, weights, sim, S, rho) if in_weight_order
           else reroute_reference(ids, sim, S, rho))
    return merge_duplicate_slots_reference(new, weights, E)


@pytest.mark.parametrize("T,E,k", MERGE_SHAPES)
@pytest.mark.parametrize("in_weight_order", [False, True], ids=["sorted", "weight-order"])
def test_merging_kernel_matches_reroute_then_merge(T, E, k, in_weight_order):
    rng = np.random.default_rng([T, E, k, int(in_weight_order), 5])
    merged_any = 0
    for S in (0, 1, k // 2, k):
        for rho in (0.0, 0.5):
            ids, sim = random_case(rng, T, E, k, ID_DTYPES[S % 2], SIM_DTYPES[(S // 2) % 2])
            weights = rng.random((T, k)).astype(np.float32)
            if not in_weight_order:
                weights = -np.sort(-weights, axis=1)
            want_ids, want_w = merged_reference(ids, weights, sim, S, rho, in_weight_order)
            got_ids, got_w = numba_numpy.reroute_merged_numba_numpy(ids, weights, sim, S, rho,
                                                                    in_weight_order=in_weight_order)
            context = (T, E, k, S, rho, in_weight_order)
            assert_same_ids(got_ids, want_ids, context)
            assert got_w.dtype == np.float32
            np.testing.assert_array_equal(got_w.view(np.int32), want_w.view(np.int32), err_msg=str(context))
            merged_any += int((got_ids == -1).sum() - (ids == -1).sum() > 0)
    assert merged_any > 0  # some case had duplicate slots to merge


def test_merging_kernel_sends_a_batch_of_one_to_one_slot():
    """T = 1, S = 1, rho = 0: every secondary slot moves to the one primary expert, so the token
    keeps one slot holding the sum of its k weights (added in slot order), the rest -1 / 0."""
    E = 16
    sim = np.full((E, E), 0.25, dtype=np.float32)
    ids = np.array([[5, 9, 2, 11]], dtype=np.int32)  # k = 4
    weights = np.array([[0.4, 0.3, 0.2, 0.1]], dtype=np.float32)
    got_ids, got_w = numba_numpy.reroute_merged_numba_numpy(ids, weights, sim, 1, 0.0)
    assert got_ids.tolist() == [[5, -1, -1, -1]]
    total = ((np.float32(0.4) + np.float32(0.3)) + np.float32(0.2)) + np.float32(0.1)
    assert got_w[0, 0] == total and got_w[0, 1:].tolist() == [0.0, 0.0, 0.0]


def test_merging_kernel_is_built_for_one_k():
    """The merging kernel unrolls its merge over a compile-time k: building it without one is an
    error, and kernels for two k in one process stay apart (each call gets its own k's kernel)."""
    from sere.kernels.numba_kernels import make_kernel

    with pytest.raises(ValueError, match="compiled for one k"):
        make_kernel("float32", 1, 32, 4, merge=True)
    E = 8
    sim = np.full((E, E), 0.5, dtype=np.float32)
    for k in (2, 3):
        ids = np.arange(k, dtype=np.int32)[None, :]
        weights = np.full((1, k), 0.25, dtype=np.float32)
        got_ids, got_w = numba_numpy.reroute_merged_numba_numpy(ids, weights, sim, 1, 0.0)
        assert got_ids.tolist() == [[0] + [-1] * (k - 1)]
        assert got_w[0, 0] == np.float32(0.25) * k
