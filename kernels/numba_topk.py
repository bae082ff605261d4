"""The router's softmax top-k and SERE's re-routing in one kernel (Numba CUDA), so that SERE costs no
launch of its own: it replaces the router's top-k op instead of following it.

The contract it computes (oracle: sere.kernels.reference.topk_reroute_reference), per token t of
router logits [T, E]:
  1. ids: the k experts of largest logit, slot 0 the largest (ties: the smaller expert id), i.e.
     torch.topk(logits, k, sorted=True) on distinct values; selecting on logits rather than on
     softmax probabilities avoids ties that rounding in exp would create;
  2. weights: softmax over all E logits in float32 (exp(l - max) / sum), taken at the k ids,
     divided by their own sum when `renormalize`;
  3. the SERE contract (sere.routing) on those ids: P = every token's slots 0..S-1, each other slot
     moves to its most similar primary expert when that similarity >= rho. Weights unchanged.
This is what vLLM's FusedTopKRouter with softmax scoring does before re-routing (its CUDA
topk_softmax kernel), up to float rounding of the weights' exp and sum.

How it works (one launch, no host sync, graph-capturable), per block:
  1. P in shared memory from the top-S of ALL tokens (each block its own copy: no grid-wide
     sync). Narrow groups (`lanes / p1_factor` lanes, a token each, p1_factor = 4 for E <= 4 *
     lanes) so that a block covers many tokens per round: at T = 64 two rounds instead of eight.
     Where one block holds every token (T <= its chunk, a grid of 1: decode at batch 1) this
     pass is skipped: step 2's first S picks of each token set P's flags instead.
  2. Its own tokens, in chunks of at most one token per group (`topk_chunk_tokens`: past one token,
     only as many as let step 3 take the chunk's slots in one round; `lanes` lanes, logits in registers,
     lane l holding columns l, l + lanes, ...): k rounds of group argmax pick the top-k, a group
     sum gives the softmax denominator, the weights are written, the ids go to shared memory.
  3. The chunk's slots, one per group: a secondary slot whose expert is not primary reads its
     similarity row and takes the group argmax over primary columns (threshold test). Slots run
     in parallel across groups as in the reroute kernel, not one after another per token.
The kernel is compiled for one k (`top_k`; its launch passes the same k), so the k rounds unroll and
the picked values stay in registers; a lane's taken columns are a bit mask in a register, not an
array indexed by a runtime column (which lives in local memory). Selects rather than branches
where the lanes of a group disagree (bench/RESULTS.md section 22: divergent branches, not
arithmetic, were the merge step's cost).
Trip counts are uniform per block (the simulator's group primitives have block barriers).
Index letters: T = tokens, E = experts, k = experts per token, S = primary slots.
"""
from __future__ import annotations

import math

import numpy as np

from sere.kernels import numba_device as device
from sere.kernels.numba_kernels import device_function, make_merge_staged, make_merged_slot, make_row_helpers
from sere.kernels.numba_runtime import cuda, numba

MAX_K = 16  # slots per token kept in per-thread arrays


MAX_CHUNKS = 64  # above 64 chunks the chunk grows: every block rebuilds P from all T tokens


def topk_chunk_tokens(T: int, top_k: int, groups: int) -> int:
    """Tokens per chunk (step 2 and 3 of the kernel) for a call of T tokens on blocks of `groups`
    groups. One token: the whole block (one block, no pass over all tokens for P). More: so few
    that the chunk's slots (chunk x k) fit the block's groups in one round (groups // k tokens), so the
    slots' row scans run side by side over the grid instead of one round after another in a block;
    each block then builds P from every token (step 1), the price of the wider grid, so past
    MAX_CHUNKS chunks a chunk takes more tokens (T / MAX_CHUNKS, at most the block's groups). On the
    H100 (E = 128, k = 8) one token per chunk took T = 8 / 16 / 64 from 8.9 / 9.7 / 10.4 us to
    6.2 / 6.2 / 7.5; at T = 256 four tokens per chunk were fastest (13.9 us; one token 16.8)."""
    if T <= 1:
        return groups
    return min(groups, max(1, groups // top_k, -(-T // MAX_CHUNKS)))


def topk_grid_blocks(T: int, threads: int, lanes: int, max_blocks: int, chunk: int | None = None) -> int:
    """Blocks for T tokens, `chunk` tokens per block and round (default: a group of `lanes` lanes
    per token, threads // lanes), at most max_blocks (each block rebuilds P from all T tokens, so
    more blocks than chunks only add that redundant work)."""
    chunk = chunk or threads // lanes
    return max(1, min(-(-T // chunk), max_blocks))


def topk_launch_shape(T: int, top_k: int, threads: int, lanes: int, max_blocks: int, merge: bool = False,
                      chunk: int | None = None) -> tuple[int, int]:
    """(chunk, blocks) of one launch, what the kernel is compiled for and the grid it runs on: the
    merging variant is one block holding every token; otherwise `chunk` tokens per block and round
    (None: topk_chunk_tokens) and the grid for it (topk_grid_blocks)."""
    groups = threads // lanes
    if merge:
        return groups, 1
    chunk = chunk or topk_chunk_tokens(T, top_k, groups)
    return chunk, topk_grid_blocks(T, threads, lanes, max_blocks, chunk)


def phase1_factor(cols: int) -> int:
    """How many tokens a group of `lanes` lanes splits into for building P: narrower groups hold
    more columns each (cols * factor in registers), capped at 16."""
    return max(1, min(4, 16 // cols))


def make_topk_reroute_kernel(logit_kind: str, sim_kind: str, cols: int, threads: int, lanes: int, top_k: int,
                             merge: bool = False, chunk: int | None = None):
    """Kernel body: logits [T*E] (bfloat16 as int16 bits), sim [E*E], weights_out [T*k] float32,
    ids_out [T*k] int32/int64; scalars T, E, k, S, rho, renormalize (0/1). Compiled for k = top_k
    (1..MAX_K): the launch must pass that k.

    merge=True: also merges each token's duplicate slots after re-routing, as the merging re-route
    kernel does (reference: merge_duplicate_slots_reference after topk_reroute_reference): the new
    ids and the weights wait in shared memory, and after a barrier a thread per slot writes its
    expert and merged weight, or -1 and 0 for a repeat. ONE block holding every token: the launch
    must give a grid of 1 and T <= threads / lanes (vLLM's small-batch path, T k 4 <= E).

    chunk: tokens a block takes per round (1..threads // lanes, default all its groups); the launch
    must size the grid with the same chunk (topk_grid_blocks)."""
    if not 1 <= top_k <= MAX_K:
        raise ValueError(f"the fused top-k kernel is compiled for one k in 1..{MAX_K}, got top_k={top_k}")
    if cols * min(phase1_factor(cols), lanes) > 63:
        raise ValueError(f"{cols} columns per lane do not fit the kernel's 64-bit taken mask")
    load_logit = device.SIM_LOADERS[logit_kind]
    load_row, best_primary = make_row_helpers(sim_kind, cols, lanes)
    group_argmax = device.group_argmax
    group_sum = device.group_sum
    groups_per_block = threads // lanes
    chunk = chunk or groups_per_block
    if not 1 <= chunk <= groups_per_block:
        raise ValueError(f"chunk must be in 1..{groups_per_block} tokens (a group each), got {chunk}")
    if merge and chunk != groups_per_block:
        raise ValueError("the merging variant holds every token in one block: chunk must be threads // lanes")
    factor = min(phase1_factor(cols), lanes)
    p1_lanes, p1_cols = lanes // factor, cols * factor  # same columns per token: p1_lanes * p1_cols == lanes * cols
    p1_groups = threads // p1_lanes
    mask_len = lanes * cols
    chunk_len = groups_per_block * MAX_K  # shared array shapes must be constants, not expressions
    neg_inf = np.float32(-np.inf)
    no_expert = np.int32(0x7FFFFFFF)  # int32 indices: one shuffle per butterfly step, not two (as _NO_EXPERT)
    one = np.int64(1)
    device_fn = device_function()
    merge_staged = make_merge_staged(make_merged_slot(top_k), threads) if merge else None
    stage_len = groups_per_block * top_k if merge else 1  # the merging variant's new ids and weights

    def make_picker(n_cols: int, n_lanes: int):
        """(load_logits, pick_next) for groups of n_lanes lanes holding n_cols columns each; a
        lane's taken columns are the bits of one int64 (bit c: column c)."""

        @device_fn
        def load_logits(vals, logits, t, E, lane, live):
            """This lane's logits of token t into vals; returns the taken mask (columns past E)."""
            taken = numba.int64(0)
            for c in range(n_cols):
                j = lane + n_lanes * c
                vals[c] = load_logit(logits[t * E + j]) if live and j < E else neg_inf
                taken = taken | (one << c) if j >= E else taken  # not an expert: never picked
            return taken

        @device_fn
        def pick_next(vals, taken, lane, scratch_v, scratch_i):
            """(value, expert, taken): the group's largest untaken logit, smallest expert on ties,
            marked taken in the lane that holds it."""
            best_v = neg_inf
            best_i = no_expert
            for c in range(n_cols):
                take = (((taken >> c) & 1) == 0) & ((best_i == no_expert) | (vals[c] > best_v))
                best_v = vals[c] if take else best_v
                best_i = numba.int32(lane + n_lanes * c) if take else best_i
            best_v, best_i = group_argmax(best_v, best_i, n_lanes, scratch_v, scratch_i)
            mine = (best_i != no_expert) & (best_i % n_lanes == lane)
            taken = taken | (one << ((best_i // n_lanes) & 63)) if mine else taken
            return best_v, best_i, taken

        return load_logits, pick_next

    load_logits, pick_next = make_picker(cols, lanes)
    p1_load_logits, p1_pick_next = make_picker(p1_cols, p1_lanes)

    def topk_reroute_kernel(logits, sim, weights_out, ids_out, T, E, k, S, rho, renormalize):
        is_primary = cuda.shared.array(mask_len, numba.int32)  # E flags
        chunk_ids = cuda.shared.array(chunk_len, numba.int32)  # the chunk's top-k ids
        scratch_v = cuda.shared.array(threads, numba.float32)  # the simulator's group primitives
        scratch_i = cuda.shared.array(threads, numba.int64)
        vals = cuda.local.array(cols, numba.float32)  # this lane's logits of the current token
        p1_vals = cuda.local.array(p1_cols, numba.float32)
        row = cuda.local.array(cols, numba.float32)
        pick_v = cuda.local.array(top_k, numba.float32)  # registers: every index is a constant after unrolling
        staged = cuda.shared.array(stage_len, numba.int32)
        staged_w = cuda.shared.array(stage_len, numba.float32)
        tid = cuda.threadIdx.x
        lane = tid % lanes
        group = tid // lanes
        block = cuda.blockIdx.x
        blocks = cuda.gridDim.x
        rerouting = S > 0 and S < top_k
        one_block = blocks == 1 and T <= chunk  # the same in every thread

        # 1. P from the top-S of every token, p1_groups tokens per round (one block holding every
        #    token skips this: its picks in step 2 set the flags).
        for j in range(tid, E, threads):
            is_primary[j] = 0
        cuda.syncthreads()
        if rerouting and not one_block:
            p1_lane = tid % p1_lanes
            for base in range(0, T, p1_groups):
                t = base + tid // p1_lanes
                live = t < T
                p1_taken = p1_load_logits(p1_vals, logits, t, E, p1_lane, live)
                for _ in range(S):
                    v, e, p1_taken = p1_pick_next(p1_vals, p1_taken, p1_lane, scratch_v, scratch_i)
                    if live and p1_lane == 0 and e != no_expert:
                        is_primary[e] = 1
            cuda.syncthreads()

        for base in range(block * chunk, T, blocks * chunk):
            # 2. A token per group (groups past the chunk idle): top-k, softmax weights (written),
            #    ids to shared memory.
            t = base + group
            live = t < T and group < chunk
            taken = load_logits(vals, logits, t, E, lane, live)
            for r in range(top_k):
                pick_v[r], e, taken = pick_next(vals, taken, lane, scratch_v, scratch_i)
                if lane == 0:
                    chunk_ids[group * MAX_K + r] = e
                    if one_block and rerouting and live and r < S and e != no_expert:
                        is_primary[e] = 1
            top = pick_v[0]  # the largest logit: exp(l - top) <= 1, no overflow
            part = np.float32(0.0)
            for c in range(cols):
                if lane + lanes * c < E and live:
                    part += math.exp(vals[c] - top)  # the logits are still in registers
            denom = group_sum(part, lanes, scratch_v)
            kept = np.float32(0.0)
            for r in range(top_k):
                pick_v[r] = math.exp(pick_v[r] - top) / denom if live else np.float32(0.0)
                kept += pick_v[r]
            if live and lane == 0:
                for r in range(top_k):
                    w = pick_v[r] / kept if renormalize != 0 else pick_v[r]
                    if merge:  # one block: the chunk is every token, base 0
                        staged_w[t * top_k + r] = w
                    else:
                        weights_out[t * top_k + r] = w
            cuda.syncthreads()

            # 3. The chunk's slots, a slot per group.
            n_slots = min(chunk, T - base) * top_k  # the same in every thread of the block
            for s0 in range(0, n_slots, groups_per_block):
                s = s0 + group
                live = s < n_slots
                g = s // top_k
                r = s - g * top_k
                e = chunk_ids[g * MAX_K + r] if live else 0
                new = e
                moving = live and rerouting and r >= S and is_primary[e] == 0
                best_v = neg_inf
                best_i = no_expert
                if moving:
                    load_row(row, sim, e, E, lane)
                    best_v, best_i = best_primary(row, is_primary, E, lane)
                if rerouting:
                    best_v, best_i = group_argmax(best_v, best_i, lanes, scratch_v, scratch_i)
                if moving and best_i != no_expert and best_v >= rho:
                    new = best_i
                if live and lane == 0:
                    if merge:
                        staged[g * top_k + r] = new
                    else:
                        ids_out[(base + g) * top_k + r] = new
            cuda.syncthreads()  # chunk_ids is rewritten by the next chunk; merge: every new id is staged

        if merge:  # 4. a thread per slot: its expert and merged weight, or -1 and 0 for a repeat
            merge_staged(staged, staged_w, ids_out, weights_out, T, top_k, E, tid)

    return topk_reroute_kernel
