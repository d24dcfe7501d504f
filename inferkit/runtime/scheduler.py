"""Continuous batching: which sequences compute how many tokens in the next step.

Each step first continues the running sequences (one token for a decode, the next chunk for a
prefill split over steps), then admits waiting ones while the token budget
(``max_num_batched_tokens``) and the block pool allow. When a running sequence needs a block
and none is free, the newest running sequence is preempted: its blocks are freed and it goes
back to the front of the queue, to be recomputed (prompt and generated tokens) later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Callable

from inferkit.runtime.block_manager import BlockManager
from inferkit.runtime.sequence import Sequence, Status


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens computed this step
    num_spec: int = 0  # draft tokens to propose and verify after it (a decode, speculative mode)
    start: int = -1  # position of the first of them (the sequence's computed count when scheduled)
    samples: bool = False  # the chunk reaches the sequence's end: a next token is sampled from it

    def __post_init__(self) -> None:
        self.start = self.seq.num_computed_tokens
        self.samples = self.start + self.num_tokens == len(self.seq)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 num_speculative_tokens: int = 0, max_model_len: int | None = None) -> None:
        self.block_manager = block_manager
        # Speculative decoding: a decode may verify up to this many draft tokens, which need
        # KV slots (and token budget) beyond the sequence's end.
        self.num_speculative_tokens = num_speculative_tokens
        self.has_draft = num_speculative_tokens > 0
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledSeq]:
        budget = self.max_num_batched_tokens
        batch: list[ScheduledSeq] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            spec = self._num_spec(seq)
            while not self.block_manager.can_append(seq, spec):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                break
            self.block_manager.append_slots(seq, spec)
            n = min(seq.num_uncomputed_tokens, budget)
            spec = min(spec, budget - n)
            batch.append(ScheduledSeq(seq, n, spec))
            budget -= n + spec
            i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted:
            seq = self.waiting[0]
            if not self.block_manager.can_allocate(seq):
                break
            self.waiting.popleft()
            self.block_manager.allocate(seq)
            seq.status = Status.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            batch.append(ScheduledSeq(seq, n))
            budget -= n
        return batch

    def _num_spec(self, seq: Sequence) -> int:
        """Draft tokens worth proposing for a decoding ``seq``: none while it prefills, and never
        past its max_tokens or the context."""
        if not self.has_draft or seq.num_uncomputed_tokens != 1:
            return 0
        room = seq.params.max_tokens - seq.num_output_tokens - 1
        if self.max_model_len is not None:
            room = min(room, self.max_model_len - len(seq) - 1)
        return max(0, min(self.num_speculative_tokens, room))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.status = Status.WAITING
        seq.num_computed_tokens = seq.num_draft_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def postprocess(self, batch: list[ScheduledSeq], next_tokens: dict[int, list[int]],
                    finish_reason: Callable[[Sequence], str | None]) -> list[Sequence]:
        """Advance each sequence by its computed tokens, append its new tokens (several when
        speculative drafts were accepted) until a stop condition, retire finished sequences
        (returned) and free their blocks."""
        finished = []
        for item in batch:
            seq = item.seq
            seq.num_computed_tokens += item.num_tokens
            self.block_manager.commit(seq, limit=seq.num_draft_computed if self.has_draft else None)
            if seq.num_computed_tokens < len(seq):
                continue
            for token in next_tokens[seq.seq_id]:
                seq.token_ids.append(token)
                reason = finish_reason(seq)
                if reason is not None:
                    self.finish(seq, reason)
                    finished.append(seq)
                    break
        return finished

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        seq.status = Status.FINISHED
        if seq in self.running:
            self.running.remove(seq)
            self.block_manager.free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
