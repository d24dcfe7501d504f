"""Continuous batching without a model: chunked prefill, mixed steps, preemption and resume."""

from inferkit.runtime.block_manager import BlockManager
from inferkit.runtime.sampling_params import SamplingParams
from inferkit.runtime.scheduler import Scheduler
from inferkit.runtime.sequence import Sequence, Status


def make(num_blocks=64, block_size=4, max_seqs=8, max_tokens=8) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), max_seqs, max_tokens)


def next_token(seq: Sequence) -> int:
    """A deterministic stand-in for the model: depends only on the sequence's tokens."""
    return (sum(seq.token_ids) * 31 + len(seq)) % 97


def run_step(sched: Scheduler, max_new: int):
    batch = sched.schedule()
    tokens = {item.seq.seq_id: [next_token(item.seq)] for item in batch if item.samples}
    done = sched.postprocess(batch, tokens, lambda s: "length" if s.num_output_tokens >= max_new else None)
    sched.block_manager.check_invariants(sched.running)
    return batch, done


def test_long_prompt_is_prefilled_in_chunks_then_decoded():
    sched = make(max_tokens=8)
    s = Sequence(0, list(range(20)), SamplingParams())
    sched.add(s)
    sizes = []
    for _ in range(5):
        batch, _ = run_step(sched, 10)
        sizes.append([(item.start, item.num_tokens) for item in batch])
    assert sizes == [[(0, 8)], [(8, 8)], [(16, 4)], [(20, 1)], [(21, 1)]]
    assert s.num_output_tokens == 3  # the first token comes from the prefill's last chunk


def test_new_request_is_prefilled_while_others_decode():
    sched = make(max_tokens=6)
    a = Sequence(0, [1, 2, 3], SamplingParams())
    sched.add(a)
    run_step(sched, 10)
    b = Sequence(1, list(range(10)), SamplingParams())
    sched.add(b)
    batch, _ = run_step(sched, 10)
    assert [(item.seq.seq_id, item.num_tokens) for item in batch] == [(0, 1), (1, 5)]  # decode + prefill chunk
    batch, _ = run_step(sched, 10)
    assert [(item.seq.seq_id, item.num_tokens) for item in batch] == [(0, 1), (1, 5)]


def test_max_num_seqs_limits_admission():
    sched = make(max_seqs=2, max_tokens=64)
    for i in range(3):
        sched.add(Sequence(i, [i + 1] * 3, SamplingParams()))
    batch, _ = run_step(sched, 10)
    assert [item.seq.seq_id for item in batch] == [0, 1] and len(sched.waiting) == 1


def outputs(num_blocks: int, prompts, max_new: int):
    sched = make(num_blocks=num_blocks, max_seqs=8, max_tokens=64)
    seqs = [Sequence(i, list(p), SamplingParams()) for i, p in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    steps = 0
    while sched.has_unfinished():
        run_step(sched, max_new)
        steps += 1
        assert steps < 1000
    assert sched.block_manager.num_free_blocks == num_blocks
    return [s.output_ids for s in seqs], sched.num_preemptions, seqs


def test_preemption_frees_the_newest_and_resumes_with_the_same_tokens():
    prompts = [[i + 1] * (3 + i) for i in range(4)]
    full, n_full, _ = outputs(64, prompts, 12)
    tight, n_tight, seqs = outputs(8, prompts, 12)  # 8 blocks of 4: not enough for four 15-18 token sequences
    assert n_full == 0 and n_tight > 0
    assert tight == full
    assert seqs[-1].num_preemptions > 0 and seqs[0].num_preemptions == 0  # the newest goes first


def test_preempted_sequence_loses_its_blocks_and_goes_first_in_line():
    sched = make(num_blocks=4, max_tokens=64)
    a, b = Sequence(0, [1] * 7, SamplingParams()), Sequence(1, [2] * 7, SamplingParams())
    sched.add(a)
    sched.add(b)
    run_step(sched, 100)  # both prefilled: 2 blocks each, pool full
    a.token_ids.append(5)  # a's next decode needs a third block
    a.num_computed_tokens = len(a) - 1
    batch = sched.schedule()
    assert b.status is Status.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert list(sched.waiting) == [b] and [item.seq for item in batch] == [a]
