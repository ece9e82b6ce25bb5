"""Block manager tests: allocation, ref counts, prefix caching, eviction; no model, no torch."""
from __future__ import annotations

import itertools
import random

import pytest

from server.engine import kv_cache
from server.engine.kv_cache import BlockManager
from server.engine.sampling_params import SamplingParams
from server.engine.sequence import Sequence

_seq_ids = itertools.count()


def make_seq(prompt: list[int] | int, max_tokens: int | None = 16, request_id: str | None = None,
             seq_id: int | None = None) -> Sequence:
    """A sequence with the given prompt (or `range(prompt)` when an int)."""
    prompt_ids = list(range(prompt)) if isinstance(prompt, int) else list(prompt)
    seq_id = next(_seq_ids) if seq_id is None else seq_id
    return Sequence(seq_id, request_id or f"req-{seq_id}", prompt_ids,
                    SamplingParams(max_tokens=max_tokens))


def compute(bm: BlockManager, seq: Sequence, num_new_tokens: int | None = None) -> None:
    """What one engine step does for a chunk: allocate, run (nothing here), commit."""
    num_new_tokens = seq.num_uncomputed_tokens if num_new_tokens is None else num_new_tokens
    assert bm.can_allocate(seq, num_new_tokens)
    bm.allocate(seq, num_new_tokens)
    seq.num_computed_tokens += num_new_tokens
    bm.commit_computed_blocks(seq)


def admit(bm: BlockManager, seq: Sequence) -> int:
    hit = bm.match_prefix(seq)
    compute(bm, seq)
    return hit


def check_pool(bm: BlockManager, live: list[Sequence]) -> None:
    """Pool invariants: refs match block tables, free + held = total, sharing only when full."""
    holders: dict[int, list[tuple[Sequence, int]]] = {}
    for seq in live:
        assert len(seq.block_table) >= bm.num_blocks_needed(seq.num_computed_tokens)
        for index, block_id in enumerate(seq.block_table):
            holders.setdefault(block_id, []).append((seq, index))
    for block in bm.blocks:
        assert block.ref_count == len(holders.get(block.block_id, [])) >= 0
        if block.ref_count > 1:   # shared: registered, and full and computed in every holder
            assert block.block_hash is not None
            for seq, index in holders[block.block_id]:
                assert (index + 1) * bm.block_size <= seq.num_computed_tokens
    num_held = sum(1 for block in bm.blocks if block.ref_count > 0)
    assert bm.num_free_blocks + num_held == bm.num_blocks
    assert bm.usage == pytest.approx(num_held / bm.num_blocks)


def test_allocate_covers_slots_and_free_is_idempotent():
    bm = BlockManager(num_blocks=8, block_size=16)
    seq = make_seq(40)
    assert bm.match_prefix(seq) == 0 and bm.can_allocate(seq, 40)
    bm.allocate(seq, 40)
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 5
    seq.num_computed_tokens = 40
    bm.allocate(seq, 8)                      # 48 slots still fit in 3 blocks
    assert len(seq.block_table) == 3
    bm.allocate(seq, 9)
    assert len(seq.block_table) == 4 and bm.usage == 0.5
    assert bm.can_allocate(seq, 88) and not bm.can_allocate(seq, 89)   # 128 slots in all
    bm.free(seq)
    bm.free(seq)
    assert seq.block_table == [] and bm.num_free_blocks == 8 and bm.usage == 0.0


def test_prefix_hit_counts_full_blocks_in_tokens():
    bm = BlockManager(num_blocks=16, block_size=16)
    shared = list(range(1000, 1040))                       # 40 shared tokens
    a, b = make_seq(shared + [1, 2, 3]), make_seq(shared + [7, 8, 9, 10])
    assert admit(bm, a) == 0
    assert admit(bm, b) == 32                              # 2 full blocks, not the partial one
    assert b.num_cached_tokens == 32 and b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] != a.block_table[2]
    assert bm.num_prefix_queried_tokens == a.num_tokens + b.num_tokens
    assert bm.num_prefix_hit_tokens == 32
    check_pool(bm, [a, b])
    assert bm.blocks[a.block_table[0]].ref_count == 2


def test_hits_leave_at_least_one_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=16)
    admit(bm, make_seq(33))
    assert bm.match_prefix(make_seq(32)) == 16     # whole prompt cached, last block recomputed
    assert bm.match_prefix(make_seq(33)) == 32
    assert bm.match_prefix(make_seq(5)) == 0


def test_freed_blocks_stay_cached_and_count_as_free():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = make_seq(9)
    admit(bm, a)
    bm.free(a)
    assert bm.num_free_blocks == 4 and bm.usage == 0.0
    again = make_seq(9)
    assert bm.match_prefix(again) == 8 and bm.num_free_blocks == 2
    check_pool(bm, [again])


def test_lru_eviction_order():
    bm = BlockManager(num_blocks=6, block_size=4)
    a, b = make_seq([1, 1, 1, 1, 0]), make_seq([2, 2, 2, 2, 0])
    admit(bm, a)
    admit(bm, b)
    a_full, b_full = a.block_table[0], b.block_table[0]
    bm.free(a)                                  # a freed before b: a's block is evicted first
    bm.free(b)
    c = make_seq(list(range(100, 120)))         # needs 5 of the 6 blocks
    bm.match_prefix(c)
    bm.allocate(c, 20)
    assert a_full in c.block_table and b_full not in c.block_table
    assert bm.match_prefix(make_seq([1, 1, 1, 1, 0])) == 0
    assert bm.match_prefix(make_seq([2, 2, 2, 2, 0])) == 4


def test_unregistered_free_blocks_are_reused_before_cached_ones():
    bm = BlockManager(num_blocks=3, block_size=4)
    a = make_seq([5, 5, 5, 5, 5])               # block 0 full (cached), block 1 partial
    admit(bm, a)
    cached, partial = a.block_table
    bm.free(a)
    b = make_seq([9])
    bm.match_prefix(b)
    bm.allocate(b, 1)
    assert b.block_table == [partial]
    assert bm.blocks[cached].block_hash is not None


def test_hash_collision_is_a_miss(monkeypatch):
    monkeypatch.setattr(kv_cache, "hash_block_tokens", lambda parent, tokens: 42)
    bm = BlockManager(num_blocks=16, block_size=4)
    admit(bm, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    assert bm.match_prefix(make_seq([9, 9, 9, 9, 5, 6, 7, 8, 9])) == 0
    assert bm.match_prefix(make_seq([1, 2, 3, 4, 0, 0, 0, 0, 9])) == 4
    assert bm.num_prefix_hit_tokens == 4


def test_same_block_after_a_different_parent_is_a_miss(monkeypatch):
    # A hash that ignores the parent: the tokens of block 1 match, its prefix does not.
    monkeypatch.setattr(kv_cache, "hash_block_tokens", lambda parent, tokens: hash(tokens))
    bm = BlockManager(num_blocks=16, block_size=4)
    admit(bm, make_seq([1, 1, 1, 1, 7, 7, 7, 7, 0]))
    admit(bm, make_seq([2, 2, 2, 2, 7, 7, 7, 7, 0]))   # its block 1 collides: left unregistered
    assert bm.match_prefix(make_seq([2, 2, 2, 2, 7, 7, 7, 7, 3])) == 4


def test_duplicate_full_block_stays_unregistered():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(9), make_seq(9)
    bm.match_prefix(a)
    bm.match_prefix(b)                          # both admitted before either computed
    compute(bm, a)
    compute(bm, b)
    assert a.block_table[:2] != b.block_table[:2]
    assert all(bm.blocks[i].block_hash is None for i in b.block_table)
    check_pool(bm, [a, b])
    bm.free(a)
    bm.free(b)
    assert bm.match_prefix(make_seq(9)) == 8


def test_disabled_prefix_caching_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    a = make_seq(9)
    admit(bm, a)
    assert all(block.block_hash is None for block in bm.blocks)
    assert admit(bm, make_seq(9)) == 0
    assert bm.num_prefix_queried_tokens == 0 and bm.num_prefix_hit_tokens == 0


def test_undo_match_prefix_restores_blocks_and_counters():
    bm = BlockManager(num_blocks=8, block_size=4)
    a = make_seq(9)
    admit(bm, a)
    queried, hit = bm.num_prefix_queried_tokens, bm.num_prefix_hit_tokens
    b = make_seq(9)
    assert bm.match_prefix(b) == 8
    bm.undo_match_prefix(b)
    assert (bm.num_prefix_queried_tokens, bm.num_prefix_hit_tokens) == (queried, hit)
    assert b.block_table == [] and b.num_computed_tokens == b.num_cached_tokens == 0
    check_pool(bm, [a])


def test_writing_into_a_shared_block_is_refused():
    bm = BlockManager(num_blocks=8, block_size=4)
    admit(bm, make_seq(9))
    b = make_seq(9)
    bm.match_prefix(b)
    b.num_computed_tokens = 3                   # pretend the next write lands in shared block 0
    with pytest.raises(AssertionError):
        bm.allocate(b, 1)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("enable_prefix_caching", [True, False])
def test_random_operations_keep_the_pool_consistent(seed, enable_prefix_caching):
    """Thousands of admit / chunk / decode / preempt / finish ops on a tiny pool.

    A fake K/V pool stores, in each slot, the whole prefix its token saw; every cache hit and
    every computed token must read back exactly the seq's own prefix, so a wrong reuse shows.
    """
    rng = random.Random(seed)
    bm = BlockManager(num_blocks=12, block_size=4, enable_prefix_caching=enable_prefix_caching)
    stems = [[rng.randrange(3) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    kv: dict[int, tuple[int, ...]] = {}
    live: list[Sequence] = []

    def slot(seq: Sequence, pos: int) -> int:
        return seq.block_table[pos // bm.block_size] * bm.block_size + pos % bm.block_size

    def check_reads(seq: Sequence) -> None:
        for pos in range(seq.num_computed_tokens):
            assert kv[slot(seq, pos)] == tuple(seq.token_ids[: pos + 1])

    def step(seq: Sequence) -> None:
        num_new = rng.randint(1, seq.num_uncomputed_tokens)
        if not bm.can_allocate(seq, num_new):
            return
        start = seq.num_computed_tokens
        compute(bm, seq, num_new)
        for pos in range(start, start + num_new):
            kv[slot(seq, pos)] = tuple(seq.token_ids[: pos + 1])
        check_reads(seq)
        if seq.num_uncomputed_tokens == 0:
            seq.append_token(rng.randrange(3))                      # decode append

    waiting: list[Sequence] = []
    for _ in range(3000):
        op = rng.random()
        if op < 0.15:
            waiting.append(make_seq(rng.choice(stems) + [rng.randrange(3)]))
        elif op < 0.35 and waiting:
            seq = waiting.pop(0)
            bm.match_prefix(seq)
            check_reads(seq)
            if bm.can_allocate(seq, 1):
                live.append(seq)
            else:
                bm.undo_match_prefix(seq)
                waiting.insert(0, seq)
        elif op < 0.85 and live:
            step(rng.choice(live))
        elif op < 0.93 and live:                                    # finish or abort
            bm.free(live.pop(rng.randrange(len(live))))
        elif live:                                                  # preempt: recompute later
            seq = live.pop()
            bm.free(seq)
            seq.num_computed_tokens = 0
            waiting.insert(0, seq)
        check_pool(bm, live)
    for seq in live:
        bm.free(seq)
    check_pool(bm, [])
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0
    if enable_prefix_caching:
        assert bm.num_prefix_hit_tokens > 0
        assert bm.num_prefix_hit_tokens % bm.block_size == 0
