"""The KV block pool: allocation invariants, prefix-cache hits, collisions, eviction."""

import random

from inferkit.runtime.block_manager import BlockManager
from inferkit.runtime.sampling_params import SamplingParams
from inferkit.runtime.sequence import Sequence

BS = 4


def seq(tokens, seq_id=0) -> Sequence:
    return Sequence(seq_id, list(tokens), SamplingParams())


def computed(bm: BlockManager, s: Sequence) -> Sequence:
    """Pretend the model computed every token of ``s``."""
    s.num_computed_tokens = len(s)
    bm.commit(s)
    return s


PREFIXES = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 0, 0, 0, 0, 0], [4, 4, 4, 4, 4, 4, 4, 4, 4]]


def test_random_allocate_append_free_keeps_invariants():
    rng = random.Random(0)
    bm = BlockManager(32, BS)
    live: list[Sequence] = []
    for step in range(400):
        action = rng.random()
        if action < 0.35:
            prefix = PREFIXES[rng.randrange(3)][: rng.randint(0, 9)]  # shared prefixes make hits
            s = seq(prefix + [rng.randrange(5) for _ in range(rng.randint(1, 6))], step)
            if bm.can_allocate(s):
                free_before = bm.num_free_blocks
                bm.allocate(s)
                assert len(s.block_table) == bm.blocks_for(len(s))
                assert s.num_computed_tokens % BS == 0 and s.num_computed_tokens < len(s)
                assert bm.num_free_blocks <= free_before
                live.append(s)
        elif action < 0.8 and live:
            s = rng.choice(live)
            computed(bm, s)
            s.token_ids.append(rng.randrange(5))
            if bm.can_append(s):
                bm.append_slots(s)
        elif live:
            s = live.pop(rng.randrange(len(live)))
            bm.free(s)
            assert s.block_table == []
        bm.check_invariants(live)
        used, stored = bm.usage()
        assert used + bm.num_free_blocks == bm.num_blocks and stored <= used * BS
    assert bm.num_hits > 20


def test_shared_prefix_reuses_blocks_and_counts_references():
    bm = BlockManager(16, BS)
    a = seq(range(10))
    bm.allocate(a)
    computed(bm, a)
    b = seq(list(range(8)) + [99, 98], 1)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 8 and b.num_computed_tokens == 8
    assert [bm.blocks[i].ref_count for i in a.block_table[:2]] == [2, 2]
    bm.check_invariants([a, b])


def test_block_holding_the_last_token_is_never_a_hit():
    """A prompt that is a whole number of blocks keeps its last block to compute: its logits are needed."""
    bm = BlockManager(16, BS)
    a = seq(range(8))
    bm.allocate(a)
    computed(bm, a)
    b = seq(range(8), 1)
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]


def test_freed_blocks_stay_cached_until_reused():
    bm = BlockManager(4, BS)
    a = seq(range(9))
    bm.allocate(a)
    computed(bm, a)
    bm.free(a)
    b = seq(range(9), 1)
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached_tokens == 8  # served from free blocks that still held the K/V
    bm.free(b)
    c = seq([7] * 16, 2)  # takes all four blocks: the cached contents are evicted
    bm.allocate(c)
    bm.free(c)
    d = seq(range(9), 3)
    bm.allocate(d)
    assert d.num_cached_tokens == 0
    bm.check_invariants([d])


def test_hash_collision_is_not_a_hit():
    bm = BlockManager(16, BS, hash_fn=lambda parent, tokens: 12345)  # every block collides
    a = seq(range(9))
    bm.allocate(a)
    computed(bm, a)
    b = seq([50, 51, 52, 53, 54, 55, 56, 57, 58], 1)
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and not set(b.block_table) & set(a.block_table)
    c = seq(range(9), 2)  # the genuine repeat still hits
    bm.allocate(c)
    assert c.num_cached_tokens == 4  # block 1 of a is not registered: its hash was taken by block 0


def test_same_tokens_at_another_position_are_not_a_hit():
    """A hash that forgot the prefix would serve block 1's K/V (computed at positions 4-7) for a
    prompt starting with the same four tokens; the parent check refuses it."""
    bm = BlockManager(16, BS, hash_fn=lambda parent, tokens: hash(tokens))
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate(a)
    computed(bm, a)
    b = seq([5, 6, 7, 8, 0], 1)
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_prefix_caching_off_never_shares():
    bm = BlockManager(16, BS, enable_prefix_caching=False)
    a = seq(range(9))
    bm.allocate(a)
    computed(bm, a)
    b = seq(range(9), 1)
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and not bm.cached
