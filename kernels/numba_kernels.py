"""The reroute kernel bodies (plain Python functions; numba_pointer and numba_numpy compile them).

The contract is written out in `sere.routing`; the oracle every test compares with is
`sere.kernels.reference.reroute_reference`. Index letters: T = tokens, k = experts per token,
E = experts, S = primary slots, K2 = k - S secondary slots per token, P = primary set.

How the kernel works (one launch, no other kernels, no host sync):
  1. Each warp (a group of `lanes` lanes, 32 on the GPU) owns one secondary slot (t, S + r) at a
     time and, before any barrier, loads the slot's expert e and the row sim[e, :] into
     registers (lane l holds columns l, l+32, ...): those loads fly while the block builds P.
  2. Every block builds P itself in shared memory from slots 0..S-1 of ALL tokens (a flag per
     expert: clear, barrier, set, barrier). Redundant across blocks, but at decode sizes it is
     a few hundred L2-resident ids, and it removes the separate clear/scatter launches of the
     research kernel. At prefill sizes this redundant read dominates (22 - 33 us at T = 4096),
     hence the two-launch path below.
  3. Each lane takes the best primary column among its own (value, then smallest index), a
     butterfly shuffle gives the warp's argmax, lane 0 writes the new id. Blocks loop over
     slots grid-stride, so the grid stays small for large T (each block rebuilds P once).
Large T (the shape rule in numba_launch picks it): two launches instead. Launch 1, one block,
builds P in shared memory from all head ids and writes all E flags to a per-call int32
workspace (no clearing launch needed); launch 2 is the kernel above with P copied from that
workspace (E reads per block instead of T*S), and a group reads its slot's flag BEFORE loading
the row, skipping the row for primary and invalid ids. Same ids, bit for bit. Measured on an
H100: 13 us at T = 4096 (S = 1, 2) against 22 / 33 us in one launch; the baseline is still
faster there (7 us): see bench/results/kernel.md. By default launch 1 is a zeroing fill plus a
thread per head slot over the grid (make_scatter_flags_kernel, numba_launch.FLAGS_BUILD =
"scatter"), the research kernel's structure: 5.4-5.5 us at T = 4096 (S = 1, 2) against 6.4 / 8.0
with one block building P (flags_build="block"), H100, bench/RESULTS.md section 17.
Invalid ids (< 0 or >= E) are never primary and pass through; S <= 0, S >= k, or an empty P
give the input back (the kernel then only copies).
Measured on an H100 (bench/results/kernel.md): 2.3 - 3.5 us per call in CUDA-graph replay for
T <= 256, E = 128, k = 8.
"""
from __future__ import annotations

import numpy as np

from sere.kernels import numba_device as device
from sere.kernels.numba_runtime import cuda, numba, simulator_enabled

WARP = 32
# Kernels are compiled for a fixed number of similarity columns per lane (the row prefetch
# lives in registers, so its length must be a compile-time constant): E <= 32 * bucket.
COLUMNS_PER_LANE_BUCKETS = (4, 8, 16, 32)
MAX_EXPERTS = WARP * COLUMNS_PER_LANE_BUCKETS[-1]  # 1024: beyond, the prefetch spills registers
DEFAULT_THREADS = 256  # 8 warps per block
FLAG_THREADS = 1024  # the one block of launch 1: T*S / 1024 head ids per thread
_NO_EXPERT = np.int32(0x7FFFFFFF)  # index sentinel: loses every tie against a real expert; int32 indices
# take one shuffle per step of a group argmax, where int64 take two


def device_function():
    """The decorator of the kernels' device functions: inlined at NVVM level on the GPU, so a
    local array passed to them (a similarity row) still lives in registers after unrolling."""
    return cuda.jit(device=True) if simulator_enabled() else cuda.jit(device=True, forceinline=True)


def make_row_helpers(sim_kind: str, cols: int, lanes: int):
    """(load_row, best_primary): a lane's columns of one similarity row, and its most similar
    primary column among them (shared by the reroute kernels and the fused top-k kernel)."""
    load_f32 = device.SIM_LOADERS[sim_kind]
    neg_inf = np.float32(-np.inf)
    no_expert = _NO_EXPERT
    device_fn = device_function()

    @device_fn
    def load_row(row, sim, e, E, lane):
        """This lane's columns of similarity row e: row[c] = sim[e, lane + lanes*c]."""
        for c in range(cols):
            j = lane + lanes * c
            if j < E:
                row[c] = load_f32(sim[e * E + j])

    @device_fn
    def best_primary(row, is_primary, E, lane):
        """(value, index) of this lane's most similar primary column; (-inf, no_expert) if none.
        Ascending columns with a strict > keep the smallest index among ties."""
        best_v = neg_inf
        best_i = no_expert
        for c in range(cols):
            j = lane + lanes * c
            # Branch-free (lanes disagree on every test): the flag is read unconditionally, j < mask
            # length always; flags past E are never cleared, so `j < E` masks them, as it masks
            # row[c], which load_row leaves unset there.
            take = (j < E) & (is_primary[j] != 0) & ((best_i == no_expert) | (row[c] > best_v))
            best_v = row[c] if take else best_v
            best_i = numba.int32(j) if take else best_i
        return best_v, best_i

    return load_row, best_primary


def make_merged_slot(top_k: int):
    """The merge step's per-slot device function for tokens of top_k slots (a compile-time k: the
    compare over a token's slots unrolls, the division by k is a multiply). Shared by the merging
    re-route kernel and the fused top-k kernel's merging variant."""
    device_fn = device_function()

    @device_fn
    def merged_slot(slot_ids, slot_w, s, E):
        """(expert, merged weight, repeat) of slot s: a slot whose valid expert sits in an earlier
        slot of its token is a repeat; the first slot of each expert takes its own weight plus its
        repeats', added in slot order. slot_ids / slot_w: the new ids and weights of every slot;
        a token's slots are top_k, fixed at compile time (each k has its own kernel). Branch-free, 32-bit index math:
        every slot of the token is read and selected, which the probe (bench.lab.probe_merge_step)
        times faster than the branchy compare."""
        s32 = numba.int32(s)
        row0 = numba.int32(s32 // top_k) * top_k
        j = s32 - row0
        e = slot_ids[s32]
        acc = slot_w[s32]
        valid = e >= 0 and e < E
        repeat = False
        for i in range(top_k):
            i32 = numba.int32(i)
            same = valid and slot_ids[row0 + i32] == e
            w_i = slot_w[row0 + i32]
            repeat = repeat or (same and i32 < j)
            acc = acc + w_i if same and i32 > j else acc
        return e, acc, repeat

    return merged_slot


def make_merge_staged(merged_slot, threads: int):
    """The merge step from shared memory for one block (`merged_slot`: make_merged_slot's device
    function), shared by the merging re-route kernel and the fused top-k kernel's merging variant."""
    device_fn = device_function()

    @device_fn
    def merge_staged(staged, staged_w, out, weights_out, T, k, E, tid):
        """After a block barrier, a thread per slot (T*k <= threads) merges from shared memory and
        writes its slot's id (-1 for a repeat) and weight (0 for a repeat). Nothing is written to
        shared memory here, so no second barrier."""
        for s in range(tid, T * k, threads):
            e, acc, repeat = merged_slot(staged, staged_w, s, E)
            out[s] = -1 if repeat else e
            weights_out[s] = np.float32(0.0) if repeat else acc

    return merge_staged


def make_kernel(sim_kind: str, cols: int, threads: int, lanes: int = WARP, two_launch: bool = False,
                weight_kind: str | None = None, merge: bool = False, top_k: int = 0):
    """The kernel body for one similarity kind, columns-per-lane bucket, block size and group
    size (`lanes` lanes share one secondary slot: 32 on the GPU, fewer under the simulator,
    where every block barrier is expensive). two_launch=True gives launch 2 of the large-T path
    (P read from a flags buffer) instead of the one-launch kernel.

    weight_kind ("float32", "float16" or "bfloat16"; one-launch only) gives the kernel for
    routers whose slots are NOT sorted by weight: it takes the weights [T*k] after the ids and
    applies the contract to each token's slots in weight order (descending, ties: the lower
    slot first, as a stable argsort), writing every id back to its own slot. The result equals
    sort -> contract -> scatter back (sere.rerouter.reroute_in_weight_order) bit for bit, with
    no sort, gather or scatter launches. A slot's rank is read from its token's k weights where
    it is needed: each lane of a group ranks its own slots and the group's argmax picks the one
    it owns; P comes from a thread per token taking its S heaviest slots. k <= 64; weights must
    be finite.

    merge=True (one-launch only, ONE block: the caller launches a grid of 1) gives the kernel that
    also merges each token's duplicate slots after re-routing (reference:
    merge_duplicate_slots_reference): it takes float32 weights [T*k] (with weight_kind, which must
    then be "float32", the same array orders the slots) and writes weights_out [T*k] float32. After
    the re-route loop a block barrier makes every new id visible, then a thread per slot compares its
    token's k slots: a repeat of an earlier slot's expert adds its weight there and becomes id -1,
    weight 0. Where T*k <= threads (every call vLLM's small-batch path makes, T k 4 <= E) the new ids
    and the weights wait in shared memory (a thread per slot loads its weight first thing) and
    reach global memory once, merged; larger T merges in global memory, in rounds of `threads` slots.
    The merging kernel is compiled for one k, top_k (its launch passes the same k): the per-slot compare
    over the token's slots is then unrolled, and the division by k is a multiply (on the H100 the merge
    step took 1.50 us with k a launch argument, 1.26 us with k fixed; bench.lab.probe_merge_step).
    Signature: (ids, weights, sim, out, weights_out, T, k, E, S, rho).

    Arrays are flat (1-D NumPy arrays under the simulator, raw pointers on the GPU):
    ids [T*k], weights [T*k], sim [E*E] (bfloat16 as int16 bits), out [T*k], flags [E] int32.
    """
    if lanes < 1 or lanes > WARP or lanes & (lanes - 1) or threads % lanes or threads % WARP:
        raise ValueError(f"lanes must be a power of two <= {WARP} and threads a multiple of {WARP}")
    if (weight_kind is not None or merge) and two_launch:
        raise ValueError("the weight-order and merging kernels have one launch only (large T: sort, then the plain kernel)")
    if merge and top_k < 1:
        raise ValueError(f"the merging kernel is compiled for one k: top_k must be >= 1, got {top_k}")
    if merge and weight_kind not in (None, "float32"):
        raise ValueError(f"the merging kernel takes float32 weights, got weight_kind {weight_kind!r}")
    load_w = device.SIM_LOADERS[weight_kind or "float32"]
    weighted = weight_kind is not None
    group_argmax = device.group_argmax
    mask_len = lanes * cols
    groups_per_block = threads // lanes
    neg_inf = np.float32(-np.inf)
    no_expert = _NO_EXPERT
    device_fn = device_function()  # the kernels share their per-slot work through device functions

    load_row, best_primary = make_row_helpers(sim_kind, cols, lanes)

    @device_fn
    def weight_rank(weights, row0, k, j):
        """Rank of slot j among its token's k slots (row0 = t*k): how many slots come before it
        in descending weight order, ties to the lower slot (a stable descending argsort)."""
        wj = load_w(weights[row0 + j])
        rank = 0
        for i in range(k):
            wi = load_w(weights[row0 + i])
            if wi > wj or (wi == wj and i < j):
                rank += 1
        return rank

    @device_fn
    def secondary_pos(weights, t, k, S, r, lane, scratch_v, scratch_i):
        """Flat position of token t's secondary slot r (0 <= r < k - S): slot S + r in contract
        order; for the weight-order kernel the slot of weight rank S + r, found by the group
        together (each lane ranks its own slots, the group's argmax picks the match). Every
        thread of the block calls it (the simulator's group argmax has block barriers)."""
        if not weighted:
            return t * k + S + r
        hit_v = neg_inf
        hit_j = no_expert
        for j in range(lane, k, lanes):
            if weight_rank(weights, t * k, k, j) == S + r:
                hit_v = np.float32(1.0)
                hit_j = j
        hit_v, hit_j = group_argmax(hit_v, hit_j, lanes, scratch_v, scratch_i)
        if hit_j == no_expert:  # only for non-finite weights: ranks are a permutation otherwise
            hit_j = S + r
        return t * k + hit_j

    @device_fn
    def build_primary(ids, weights, out, is_primary, T, k, E, S, tid, block, blocks):
        """Set P's flags from every token's S head slots (slots 0..S-1, or the S heaviest for the
        weight-order kernel: a thread per token picks them, S passes over its k weights, ties to
        the lower slot) and copy the head slots to out (each by one block)."""
        if not weighted:
            for i in range(tid, T * S, threads):
                t = i // S
                h = ids[t * k + (i - t * S)]
                if h >= 0 and h < E:
                    is_primary[h] = 1
                if (i // threads) % blocks == block:  # one block copies each primary slot
                    out[t * k + (i - t * S)] = h
        else:
            for t in range(tid, T, threads):
                picked = numba.int64(0)  # bit j: slot j already taken (k <= 64, checked at launch)
                for _ in range(S):
                    best_w = neg_inf
                    best_j = -1
                    for j in range(k):
                        if (picked >> j) & 1 == 0:
                            w = load_w(weights[t * k + j])
                            if best_j < 0 or w > best_w:
                                best_w = w
                                best_j = j
                    picked |= numba.int64(1) << best_j
                    h = ids[t * k + best_j]
                    if h >= 0 and h < E:
                        is_primary[h] = 1
                    if (t // threads) % blocks == block:
                        out[t * k + best_j] = h

    stage_len = threads if merge else 1  # the merging kernel's slots staged in shared memory

    if merge:
        merged_slot = make_merged_slot(top_k)
        merge_staged = make_merge_staged(merged_slot, threads)

        @device_fn
        def merge_in_global(out, weights, weights_out, T, k, E, tid):
            """After a block barrier, a thread per slot in rounds of `threads` slots merges from global
            memory. Every load of a round comes before its barrier and its stores after, so the loads
            are independent (no store between them) and need no ordering. Only repeats change, and a
            repeat is recognised through its expert's first slot, which never changes: a later round
            reads what it needs."""
            n = T * k
            for base in range(0, n, threads):  # a uniform trip count: every thread meets the barriers
                s = base + tid
                repeat = False
                if s < n:
                    _, acc, repeat = merged_slot(out, weights, s, E)
                    weights_out[s] = np.float32(0.0) if repeat else acc
                cuda.syncthreads()
                if repeat:
                    out[s] = -1
                cuda.syncthreads()

        @device_fn
        def merge_slots(out, weights, weights_out, staged, staged_w, staging, T, k, E, tid):
            if staging:
                merge_staged(staged, staged_w, out, weights_out, T, k, E, tid)
            else:
                merge_in_global(out, weights, weights_out, T, k, E, tid)
    else:
        @device_fn
        def merge_slots(out, weights, weights_out, staged, staged_w, staging, T, k, E, tid):
            """Never called (merge is a compile-time False); out stands in for weights_out there."""
            return

    def reroute_kernel_body(ids, weights, sim, out, weights_out, T, k, E, S, rho):
        is_primary = cuda.shared.array(mask_len, numba.int32)  # E flags
        scratch_v = cuda.shared.array(threads, numba.float32)  # used by the simulator only
        scratch_i = cuda.shared.array(threads, numba.int64)
        staged = cuda.shared.array(stage_len, numba.int64)  # merging kernel: new ids, then merged
        staged_w = cuda.shared.array(stage_len, numba.float32)
        tid = cuda.threadIdx.x
        lane = tid % lanes
        group = tid // lanes
        block = cuda.blockIdx.x
        blocks = cuda.gridDim.x
        staging = merge and T * k <= stage_len  # merging kernel, ONE block: stage in shared memory
        # Staging: slot tid's weight. Its load is issued here and stored to shared memory only just
        # before the first barrier, so no thread waits for it before issuing its other loads.
        my_weight = np.float32(0.0)
        if staging and tid < T * k:
            my_weight = weights[tid]

        if S <= 0 or S >= k:  # identity: copy, grid-stride
            for i in range(block * threads + tid, T * k, blocks * threads):
                if staging:
                    staged[i] = ids[i]
                else:
                    out[i] = ids[i]
            if staging and tid < T * k:
                staged_w[tid] = my_weight
            if merge:  # one block: the barrier covers every copied id
                cuda.syncthreads()
                merge_slots(out, weights, weights_out, staged, staged_w, staging, T, k, E, tid)
            return

        K2 = k - S
        n_sec = T * K2

        # 1. Prefetch this group's first secondary slot and its similarity row (before barriers).
        row = cuda.local.array(cols, numba.float32)  # registers after unrolling
        slot = block * groups_per_block + group
        live = slot < n_sec
        t = slot // K2 if live else 0
        pos = secondary_pos(weights, t, k, S, slot - t * K2 if live else 0, lane, scratch_v, scratch_i)
        e = ids[pos] if live else -1
        if e >= 0 and e < E:
            load_row(row, sim, e, E, lane)

        # 2. The primary set P, built by every block from the head slots of ALL tokens.
        for j in range(tid, E, threads):
            is_primary[j] = 0
        if staging and tid < T * k:
            staged_w[tid] = my_weight
        cuda.syncthreads()
        if staging:
            build_primary(ids, weights, staged, is_primary, T, k, E, S, tid, block, blocks)
        else:
            build_primary(ids, weights, out, is_primary, T, k, E, S, tid, block, blocks)
        cuda.syncthreads()

        # 3. Re-route: one group per secondary slot; the trip count is uniform per block.
        base = block * groups_per_block
        while base < n_sec:
            best_v = neg_inf
            best_i = no_expert
            if e >= 0 and e < E and is_primary[e] == 0:
                best_v, best_i = best_primary(row, is_primary, E, lane)
            best_v, best_i = group_argmax(best_v, best_i, lanes, scratch_v, scratch_i)
            if lane == 0 and slot < n_sec:
                if staging:  # (a compile-time False in the plain kernel, whose code stays as it was)
                    staged[pos] = best_i if best_i != no_expert and best_v >= rho else e
                elif best_i != no_expert and best_v >= rho:
                    out[pos] = best_i
                else:
                    out[pos] = e  # invalid, already primary, critical, or P empty

            base += blocks * groups_per_block  # this group's next slot, loaded after the barriers
            slot = base + group
            live = slot < n_sec
            t = slot // K2 if live else 0
            pos = secondary_pos(weights, t, k, S, slot - t * K2 if live else 0, lane, scratch_v, scratch_i)
            e = ids[pos] if live else -1
            if e >= 0 and e < E:
                load_row(row, sim, e, E, lane)

        if merge:  # 4. one block: after the barrier every new id of every token is in staged / out
            cuda.syncthreads()
            merge_slots(out, weights, weights_out, staged, staged_w, staging, T, k, E, tid)

    body = device_fn(reroute_kernel_body)

    def reroute_kernel(ids, sim, out, T, k, E, S, rho):
        body(ids, ids, sim, out, out, T, k, E, S, rho)  # ids and out stand in for the unused weights

    def reroute_weighted_kernel(ids, weights, sim, out, T, k, E, S, rho):
        body(ids, weights, sim, out, out, T, k, E, S, rho)

    def reroute_merge_kernel(ids, weights, sim, out, weights_out, T, k, E, S, rho):
        body(ids, weights, sim, out, weights_out, T, k, E, S, rho)

    def reroute_after_flags_kernel(ids, sim, flags, out, T, k, E, S, rho):
        """Launch 2 of the two-launch path: P comes from flags [E] (written by launch 1). A thread
        per slot first: a slot whose expert is primary or invalid is copied through at once (at
        prefill sizes nearly all of them: P covers nearly every expert), the others go to a
        per-block queue in shared memory; then a group per queued slot reads its row and takes
        the group argmax. Called only with 0 < S < k."""
        is_primary = cuda.shared.array(mask_len, numba.int32)  # E flags, copied from flags
        queue = cuda.shared.array(threads, numba.int32)  # this round's slots that need a row
        queued = cuda.shared.array(1, numba.int32)
        scratch_v = cuda.shared.array(threads, numba.float32)  # used by the simulator only
        scratch_i = cuda.shared.array(threads, numba.int64)
        row = cuda.local.array(cols, numba.float32)  # registers after unrolling
        tid = cuda.threadIdx.x
        lane = tid % lanes
        group = tid // lanes
        block = cuda.blockIdx.x
        blocks = cuda.gridDim.x
        K2 = k - S
        n_head = T * S
        n_sec = T * K2

        # P into shared memory (E reads per block, not T*S); the primary slots copy through.
        for j in range(tid, E, threads):
            is_primary[j] = flags[j]
        if tid == 0:
            queued[0] = 0
        for i in range(block * threads + tid, n_head, blocks * threads):
            t = i // S
            out[t * k + (i - t * S)] = ids[t * k + (i - t * S)]
        cuda.syncthreads()

        for base in range(block * threads, n_sec, blocks * threads):  # uniform trip count per block
            # 1. A thread per secondary slot: copy through, or queue the slot for a row scan.
            slot = base + tid
            if slot < n_sec:
                t = slot // K2
                pos = t * k + S + (slot - t * K2)
                e = ids[pos]
                if e >= 0 and e < E and is_primary[e] == 0:
                    queue[cuda.atomic.add(queued, 0, 1)] = slot
                else:
                    out[pos] = e  # invalid or already primary
            cuda.syncthreads()
            n_queued = queued[0]

            # 2. A group per queued slot (order in the queue does not matter: slots are independent).
            for q0 in range(0, n_queued, groups_per_block):
                q = q0 + group
                e = -1
                pos = 0
                if q < n_queued:
                    slot = queue[q]
                    t = slot // K2
                    pos = t * k + S + (slot - t * K2)
                    e = ids[pos]
                    load_row(row, sim, e, E, lane)
                best_v = neg_inf
                best_i = no_expert
                if e >= 0:
                    best_v, best_i = best_primary(row, is_primary, E, lane)
                best_v, best_i = group_argmax(best_v, best_i, lanes, scratch_v, scratch_i)
                if lane == 0 and q < n_queued:
                    if best_i != no_expert and best_v >= rho:
                        out[pos] = best_i
                    else:
                        out[pos] = e  # critical (below rho) or P empty
            cuda.syncthreads()  # everybody has read queued[0] and the queue
            if tid == 0:
                queued[0] = 0
            cuda.syncthreads()

    if two_launch:
        return reroute_after_flags_kernel
    if merge:
        return reroute_merge_kernel
    return reroute_weighted_kernel if weighted else reroute_kernel


def make_flags_kernel(threads: int):
    """Launch 1 of the two-launch path, ONE block of `threads` threads: the primary flags of all
    E experts from slots 0..S-1 of all tokens, built in shared memory and written out whole
    (every flag is written, so the buffer needs no clearing launch). Called only with 0 < S < k.
    ids [T*k], flags [E] int32."""

    def primary_flags_kernel(ids, flags, T, k, E, S):
        mask = cuda.shared.array(MAX_EXPERTS, numba.int32)
        tid = cuda.threadIdx.x
        for j in range(tid, E, threads):
            mask[j] = 0
        cuda.syncthreads()
        for i in range(tid, T * S, threads):
            t = i // S
            h = ids[t * k + (i - t * S)]
            if h >= 0 and h < E:
                mask[h] = 1
        cuda.syncthreads()
        for j in range(tid, E, threads):
            flags[j] = mask[j]

    return primary_flags_kernel


def make_scatter_flags_kernel():
    """Launch 1 of the two-launch path spread over the grid (the research kernel's scatter): a
    thread per head slot sets its expert's flag. The caller zeroes flags [E] first (a fill on the
    stream), so this is three kernels in all, each one load or store per thread, against the one
    block that walks all T*S head ids in make_flags_kernel (at T = 4096 on the H200 our two
    launches took 6.2-8.0 us where three such launches took 3.9-4.0; bench/RESULTS.md section 16).
    Concurrent stores of 1 to one flag are benign. Called only with 0 < S < k.
    ids [T*k], flags [E] int32 (zeroed)."""

    def scatter_flags_kernel(ids, flags, T, k, E, S):
        i = cuda.grid(1)
        if i < T * S:
            t = i // S
            h = ids[t * k + (i - t * S)]
            if h >= 0 and h < E:
                flags[h] = 1

    return scatter_flags_kernel
