"""Block manager: the paged KV cache's bookkeeping, on integer block ids (no torch).

The model runner owns the actual K/V tensors; this module decides which block of the pool each
token of each sequence lives in, counts references to blocks, and remembers the contents of full
blocks so that later requests with the same prefix can reuse them (prefix caching).
"""
from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass

from server.engine.sequence import Sequence


def hash_block_tokens(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Chained hash of a full block: it depends on the whole prefix through `parent_hash`."""
    return hash((parent_hash, token_ids))


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    # Set only while the block is registered in the prefix cache (full, computed, immutable).
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None   # compared on every hit: collisions never match
    prefix_id: int | None = None               # unique id of the prefix that ends in this block
    parent_prefix_id: int | None = None        # the prefix id of the block before it


class BlockManager:
    """Fixed pool of `num_blocks` blocks of `block_size` token slots, shared by all sequences.

    A sequence's `block_table` lists its blocks in order; token position p lives in slot

        slot(p) = block_table[p // block_size] * block_size + p % block_size

        block_size = 4, block_table = [7, 2, 9], token position p = 9:

        positions   0 1 2 3 | 4 5 6 7 | 8 9 . .
        block id       7    |    2    |    9
        pool slots  28....31| 8....11 |36 37 ..    -> p = 9 is in block 9, offset 1: slot 37

    Prefix caching: once every token of a full block is computed, the block is registered under
    hash(parent block hash, its token ids). A new sequence walks its own blocks' hashes from the
    start and reuses the longest run of registered blocks (ref_count + 1), checking each hit's
    stored tokens and parent, so a hash collision is a miss, never wrong K/V. Freed blocks keep
    their registration and go to the back of the free list; a fresh block is taken from the
    front, so cached blocks are evicted least-recently-freed first, unregistered ones before them.
    Only full, computed blocks are ever shared, and writes only go past `num_computed_tokens`,
    so a shared block is never written to (asserted) and no copy-on-write is needed.
    """

    def __init__(self, num_blocks: int, block_size: int = 16, enable_prefix_caching: bool = True):
        assert num_blocks >= 1 and block_size >= 1
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self._hash_to_block_id: dict[int, int] = {}
        # Per sequence: (hash, prefix id) of each of its full blocks already committed.
        self._seq_chains: dict[int, list[tuple[int, int]]] = {}
        self._prefix_ids = itertools.count()
        self.num_prefix_queried_tokens = 0   # cumulative, in tokens
        self.num_prefix_hit_tokens = 0

    # ---- capacity ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks no live sequence holds, cached-but-free ones included."""
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction (0..1) of the pool held by live sequences (ref_count > 0)."""
        return (self.num_blocks - len(self._free)) / self.num_blocks

    def num_blocks_needed(self, num_tokens: int) -> int:
        """Args: num_tokens: token slots to cover. Returns: blocks that covers them (ceil)."""
        return -(-num_tokens // self.block_size)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Side-effect-free check that `allocate(seq, num_new_tokens)` would succeed.

        Args:
            seq: the sequence to grow.
            num_new_tokens: tokens to compute next, after its `num_computed_tokens`.
        Returns:
            True when enough free blocks exist.
        """
        return self._num_missing_blocks(seq, num_new_tokens) <= len(self._free)

    def _num_missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        num_slots = seq.num_computed_tokens + num_new_tokens
        return max(0, self.num_blocks_needed(num_slots) - len(seq.block_table))

    # ---- allocation and release ---------------------------------------------------------------

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow `seq.block_table` to cover `seq.num_computed_tokens + num_new_tokens` slots.

        Args:
            seq: the sequence to grow; check `can_allocate` first.
            num_new_tokens: tokens the coming step computes for it (>= 1).
        """
        num_missing = self._num_missing_blocks(seq, num_new_tokens)
        assert num_missing <= len(self._free), "allocate() without can_allocate()"
        self._assert_writable(seq)
        for _ in range(num_missing):
            seq.block_table.append(self._take_free_block())

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references and clear its block table; calling it twice is a no-op.

        Args:
            seq: a finished, aborted or preempted sequence.
        """
        # Tail blocks first, so that they are evicted before the prefix blocks others may share.
        for block_id in reversed(seq.block_table):
            self._release(self.blocks[block_id])
        seq.block_table.clear()
        self._seq_chains.pop(seq.seq_id, None)

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the tail blocks past what `num_tokens` slots need (speculative lookahead
        that was not kept). They hold no computed token, so they are never shared or cached.

        Args:
            seq: a running sequence.
            num_tokens: slots to keep, at least its computed tokens.
        """
        assert num_tokens >= seq.num_computed_tokens
        keep = self.num_blocks_needed(num_tokens)
        while len(seq.block_table) > keep:
            block = self.blocks[seq.block_table.pop()]
            assert block.ref_count == 1 and block.block_hash is None, "trimming a shared block"
            self._release(block)

    def _take_free_block(self) -> int:
        block_id, _ = self._free.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:   # evict: its cached contents are about to be overwritten
            self._unregister(block)
        block.ref_count = 1
        return block_id

    def _acquire(self, block: Block) -> None:
        if block.ref_count == 0:
            del self._free[block.block_id]
        block.ref_count += 1

    def _release(self, block: Block) -> None:
        block.ref_count -= 1
        assert block.ref_count >= 0, f"block {block.block_id} released too often"
        if block.ref_count == 0:
            self._free[block.block_id] = None          # most recently used: evicted last
            if block.block_hash is None:
                self._free.move_to_end(block.block_id, last=False)  # nothing to keep: reuse first

    def _assert_writable(self, seq: Sequence) -> None:
        index = seq.num_computed_tokens // self.block_size
        if index < len(seq.block_table):
            block = self.blocks[seq.block_table[index]]
            assert block.ref_count == 1 and block.block_hash is None, "write into a shared block"

    # ---- prefix caching -----------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> int:
        """Attach the longest run of cached blocks matching the sequence's leading tokens.

        Called on admission (first time or after a preemption), while nothing is computed. At
        least one token is always left to compute, so hits stop at `num_tokens - 1`, rounded
        down to a block boundary. Sets `seq.num_computed_tokens` and `seq.num_cached_tokens`.

        Args:
            seq: a sequence with `num_computed_tokens == 0` and an empty block table.
        Returns:
            The number of hit tokens (a multiple of `block_size`).
        """
        assert seq.num_computed_tokens == 0 and not seq.block_table
        seq.num_cached_tokens = 0
        if not self.enable_prefix_caching:
            return 0
        chain = self._seq_chains[seq.seq_id] = []
        parent_hash, parent_id = None, None
        for index in range((seq.num_tokens - 1) // self.block_size):
            token_ids = self._block_token_ids(seq, index)
            block_hash = hash_block_tokens(parent_hash, token_ids)
            block = self._lookup(block_hash, parent_id, token_ids)
            if block is None:
                break
            self._acquire(block)
            seq.block_table.append(block.block_id)
            parent_hash, parent_id = block_hash, block.prefix_id
            chain.append((block_hash, parent_id))
        num_hit_tokens = len(seq.block_table) * self.block_size
        seq.num_computed_tokens = seq.num_cached_tokens = num_hit_tokens
        self.num_prefix_queried_tokens += seq.num_tokens
        self.num_prefix_hit_tokens += num_hit_tokens
        return num_hit_tokens

    def undo_match_prefix(self, seq: Sequence) -> None:
        """Take back a `match_prefix` whose admission then failed (no blocks for the rest).

        Releases the hit blocks and withdraws the tokens from the counters, so that a request
        retried at every step is counted once, when it is finally admitted.

        Args:
            seq: a sequence right after `match_prefix`, before any `allocate`.
        """
        assert seq.num_computed_tokens == len(seq.block_table) * self.block_size
        if self.enable_prefix_caching:
            self.num_prefix_queried_tokens -= seq.num_tokens
            self.num_prefix_hit_tokens -= seq.num_computed_tokens
        self.free(seq)
        seq.num_computed_tokens = seq.num_cached_tokens = 0

    def commit_computed_blocks(self, seq: Sequence) -> None:
        """Register the sequence's blocks that became full and fully computed since last time.

        A block whose twin (same parent, same tokens) is already registered stays unregistered.

        Args:
            seq: a sequence whose `num_computed_tokens` was just advanced by a step.
        """
        if not self.enable_prefix_caching:
            return
        chain = self._seq_chains.setdefault(seq.seq_id, [])
        for index in range(len(chain), seq.num_computed_tokens // self.block_size):
            parent_hash, parent_id = chain[-1] if chain else (None, None)
            token_ids = self._block_token_ids(seq, index)
            block_hash = hash_block_tokens(parent_hash, token_ids)
            block = self.blocks[seq.block_table[index]]
            chain.append((block_hash, self._register(block, block_hash, parent_id, token_ids)))

    def _register(
        self, block: Block, block_hash: int, parent_id: int | None, token_ids: tuple[int, ...]
    ) -> int:
        """Register `block` unless its hash is taken; return the prefix id it now stands for."""
        twin = self._lookup(block_hash, parent_id, token_ids)
        if twin is not None:
            return twin.prefix_id          # duplicate contents: same prefix, leave unregistered
        prefix_id = next(self._prefix_ids)
        if block_hash not in self._hash_to_block_id:   # else a collision: stays unregistered
            assert block.block_hash is None and block.ref_count >= 1
            block.block_hash, block.token_ids = block_hash, token_ids
            block.prefix_id, block.parent_prefix_id = prefix_id, parent_id
            self._hash_to_block_id[block_hash] = block.block_id
        return prefix_id

    def _unregister(self, block: Block) -> None:
        assert self._hash_to_block_id[block.block_hash] == block.block_id
        del self._hash_to_block_id[block.block_hash]
        block.block_hash = block.token_ids = block.prefix_id = block.parent_prefix_id = None

    def _lookup(
        self, block_hash: int, parent_id: int | None, token_ids: tuple[int, ...]
    ) -> Block | None:
        block_id = self._hash_to_block_id.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.token_ids != token_ids or block.parent_prefix_id != parent_id:
            return None                    # hash collision: different contents
        return block

    def _block_token_ids(self, seq: Sequence, index: int) -> tuple[int, ...]:
        start = index * self.block_size
        return tuple(seq.token_ids[start : start + self.block_size])
