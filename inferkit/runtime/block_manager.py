"""A pool of fixed-size KV blocks: per-sequence block tables, reference counts, prefix caching.

Prefix caching: a full block is identified by a hash chained over every token before it and in
it. A hit is only taken after checking the candidate holds exactly these tokens and follows
exactly the block already matched for the previous position (the same physical block, not
since reused), so a hash collision can never serve another prompt's K/V.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from inferkit.runtime.sequence import Sequence

HashFn = Callable[[int, tuple], int]


def chain_hash(parent_hash: int, tokens: tuple) -> int:
    return hash((parent_hash, tokens))


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the block is full and its K/V computed
    tokens: tuple = ()
    parent: int = -1  # physical block before this one in the chain (-1: first block)
    parent_epoch: int = 0
    epoch: int = 0  # bumped whenever the block is given new contents
    num_tokens: int = 0  # slots holding computed K/V


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 hash_fn: HashFn = chain_hash) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_fn = hash_fn
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # oldest first
        self.cached: dict[int, int] = {}  # hash → block id
        self.num_hits = 0  # prefix-cache hits, in blocks
        self.num_queries = 0
        self.num_stored_tokens = 0  # computed slots in blocks in use

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache -------------------------------------------------------------------------
    def _lookup(self, tokens: tuple, parent: int, parent_hash: int) -> tuple[int, Block | None]:
        h = self.hash_fn(parent_hash, tokens)
        block_id = self.cached.get(h)
        if block_id is None:
            return h, None
        block = self.blocks[block_id]
        parent_epoch = self.blocks[parent].epoch if parent >= 0 else 0
        if block.tokens != tokens or block.parent != parent or block.parent_epoch != parent_epoch:
            return h, None  # a collision: same hash, other contents
        return h, block

    def _prefix_hits(self, seq: Sequence) -> list[Block]:
        """Cached blocks holding a prefix of ``seq``; never the block of its last token, whose
        logits are needed to continue."""
        hits: list[Block] = []
        if not self.enable_prefix_caching:
            return hits
        bs = self.block_size
        parent, parent_hash = -1, 0
        for i in range((len(seq) - 1) // bs):
            h, block = self._lookup(tuple(seq.token_ids[i * bs:(i + 1) * bs]), parent, parent_hash)
            if block is None:
                break
            hits.append(block)
            parent, parent_hash = block.block_id, h
        return hits

    # -- allocation ---------------------------------------------------------------------------
    def _take_free(self) -> Block:
        block_id, _ = self.free_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]  # evict its cached contents
        block.hash, block.tokens, block.parent, block.num_tokens = None, (), -1, 0
        block.epoch += 1
        block.ref_count = 1
        return block

    def _share(self, block: Block) -> None:
        if block.ref_count == 0:
            del self.free_ids[block.block_id]
            self.num_stored_tokens += block.num_tokens
        block.ref_count += 1

    def can_allocate(self, seq: Sequence) -> bool:
        hits = self._prefix_hits(seq)
        in_free = sum(1 for b in hits if b.ref_count == 0)
        return self.blocks_for(len(seq)) - len(hits) + in_free <= self.num_free_blocks

    def allocate(self, seq: Sequence) -> None:
        """Blocks for every token of ``seq`` (a new or preempted sequence), sharing cached ones."""
        assert not seq.block_table
        hits = self._prefix_hits(seq)
        self.num_queries += (len(seq) - 1) // self.block_size if self.enable_prefix_caching else 0
        self.num_hits += len(hits)
        for block in hits:
            self._share(block)
        seq.block_table = [b.block_id for b in hits]
        # Committed blocks hold the draft model's K/V too (see ``commit``'s limit).
        seq.num_cached_tokens = seq.num_computed_tokens = seq.num_draft_computed = len(hits) * self.block_size
        for _ in range(self.blocks_for(len(seq)) - len(hits)):
            seq.block_table.append(self._take_free().block_id)

    def can_append(self, seq: Sequence, lookahead: int = 0) -> bool:
        return self.blocks_for(len(seq) + lookahead) - len(seq.block_table) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, lookahead: int = 0) -> None:
        """Blocks for tokens appended since allocation (one per ``block_size`` decoded tokens),
        plus ``lookahead`` slots past the end for speculative tokens."""
        for _ in range(self.blocks_for(len(seq) + lookahead) - len(seq.block_table)):
            seq.block_table.append(self._take_free().block_id)

    def free(self, seq: Sequence) -> None:
        # Last blocks first, so a prefix outlives its continuations in the free list's LRU order.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self.free_ids[block_id] = None
                self.num_stored_tokens -= block.num_tokens
        seq.block_table = []

    def commit(self, seq: Sequence, limit: int | None = None) -> None:
        """Record computed slots, and hash blocks that became full so later requests can share
        them. ``limit``: with a draft model, only slots both models have computed count."""
        bs = self.block_size
        computed = seq.num_computed_tokens if limit is None else min(limit, seq.num_computed_tokens)
        parent, parent_hash = -1, 0
        for i, block_id in enumerate(seq.block_table):
            block = self.blocks[block_id]
            filled = min(bs, computed - i * bs)
            if filled <= 0:
                break
            if filled > block.num_tokens:
                self.num_stored_tokens += filled - block.num_tokens
                block.num_tokens = filled
            if filled == bs and self.enable_prefix_caching:
                if block.hash is None:
                    block.tokens = tuple(seq.token_ids[i * bs:(i + 1) * bs])
                    block.parent = parent
                    block.parent_epoch = self.blocks[parent].epoch if parent >= 0 else 0
                    block.hash = self.hash_fn(parent_hash, block.tokens)
                    self.cached.setdefault(block.hash, block_id)
                parent, parent_hash = block_id, block.hash

    # -- accounting ---------------------------------------------------------------------------
    def usage(self) -> tuple[int, int]:
        """(blocks in use, token slots in them holding computed K/V)."""
        return self.num_blocks - len(self.free_ids), self.num_stored_tokens

    def check_invariants(self, seqs: list[Sequence]) -> None:
        """Reference counts equal the block tables' claims; free blocks are exactly the unclaimed."""
        claims = [0] * self.num_blocks
        for seq in seqs:
            for block_id in seq.block_table:
                claims[block_id] += 1
        for block in self.blocks:
            assert block.ref_count == claims[block.block_id], f"block {block.block_id}: ref {block.ref_count} != {claims[block.block_id]} claims"
            assert (block.ref_count == 0) == (block.block_id in self.free_ids), f"block {block.block_id} free-list mismatch"
        for h, block_id in self.cached.items():
            assert self.blocks[block_id].hash == h
        assert self.num_stored_tokens == sum(b.num_tokens for b in self.blocks if b.ref_count > 0)
