"""Speculative decoding: a draft model proposes k tokens per sequence, the target model scores
all k+1 positions in one forward pass, and the rejection rule keeps the target's distribution
exactly (Leviathan et al. 2023; Chen et al. 2023).

The draft has its own paged KV cache addressed by the same block tables as the target's, so a
sequence's blocks hold both models' K/V for the same positions. Rejected positions are rolled
back by moving each model's computed-token count back; their slots are overwritten later.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from inferkit.errors import InferkitError
from inferkit.runtime.model_runner import Chunk, ModelRunner
from inferkit.runtime.sampler import filtered_probs, logprob_entry, sample
from inferkit.runtime.scheduler import ScheduledSeq
from inferkit.runtime.sequence import Sequence


DRAFT_VOCAB_FILE = "draft_vocab.safetensors"


def read_draft_vocab(folder: Path, vocab_size: int) -> torch.Tensor | None:
    """A draft's reduced vocabulary: ``d2t`` [N], the target token id of each draft logit
    (strictly ascending), stored beside the draft as ``draft_vocab.safetensors``; None if absent."""
    path = Path(folder) / DRAFT_VOCAB_FILE
    if not path.is_file():
        return None
    from safetensors.torch import load_file

    try:
        d2t = load_file(str(path)).get("d2t")
    except Exception as err:  # a truncated or foreign file
        raise InferkitError(f"{path} is not a readable draft vocabulary: {err}") from None
    if d2t is None or d2t.dim() != 1 or d2t.dtype not in (torch.int32, torch.int64) or len(d2t) < 2:
        raise InferkitError(f"{path} must hold 'd2t', a 1-D integer tensor of at least 2 target token ids")
    d2t = d2t.long()
    if int(d2t.min()) < 0 or int(d2t.max()) >= vocab_size or not bool((d2t[1:] > d2t[:-1]).all()):
        raise InferkitError(f"{path}: token ids must be distinct, ascending and below the model's vocabulary "
                            f"size {vocab_size}")
    return d2t


def accept_or_resample(p: torch.Tensor, q: torch.Tensor | None, drafts: list[int], generator: torch.Generator | None,
                       greedy: bool) -> list[int]:
    """Tokens to append given target probs ``p`` [k+1, V], draft probs ``q`` [k, V] and the
    ``k`` drafted tokens: the accepted drafts, then one token from the target (the correction at
    the first rejection, or the bonus token after k acceptances). Greedy needs no ``q``."""
    out: list[int] = []
    for i, d in enumerate(drafts):
        if greedy:
            best = int(p[i].argmax())
            if best != d:
                return out + [best]
        else:
            # q: draft prob, p: target prob. Accept with min(1, p/q); else resample from (p - q)+.
            u = float(torch.rand((), generator=generator))
            if u * float(q[i, d]) > float(p[i, d]):
                residual = (p[i] - q[i]).clamp(min=0)
                total = float(residual.sum())
                probs = residual / total if total > 0 else p[i]
                return out + [int(torch.multinomial(probs, 1, generator=generator))]
        out.append(d)
    last = p[len(drafts)]
    bonus = int(last.argmax()) if greedy else int(torch.multinomial(last, 1, generator=generator))
    return out + [bonus]


@dataclass
class SpecStats:
    steps: int = 0  # sequence-steps that speculated
    proposed: list[int] = field(default_factory=list)  # per draft position
    accepted: list[int] = field(default_factory=list)
    emitted: int = 0  # tokens appended by speculative steps (accepted + 1 each)

    def record(self, num_proposed: int, num_accepted: int) -> None:
        while len(self.proposed) < num_proposed:
            self.proposed.append(0)
            self.accepted.append(0)
        for i in range(num_proposed):
            self.proposed[i] += 1
            self.accepted[i] += i < num_accepted
        self.steps += 1
        self.emitted += num_accepted + 1

    def summary(self) -> dict:
        return {
            "speculative_steps": self.steps,
            "acceptance_rate": sum(self.accepted) / sum(self.proposed) if sum(self.proposed) else 0.0,
            "acceptance_by_position": [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)],
            "tokens_per_step": self.emitted / self.steps if self.steps else 0.0,
        }


class SpeculativeRunner:
    """Runs one engine step with drafts: same interface as ``ModelRunner.run``."""

    def __init__(self, target: ModelRunner, draft: ModelRunner) -> None:
        self.target, self.draft = target, draft
        self.stats = SpecStats()
        self.d2t = draft.model.head_ids.cpu() if draft.model.head_ids is not None else None
        self.vocab_size = target.model.num_logits

    def run(self, batch: list[ScheduledSeq]) -> dict[int, list[int]]:
        spec = [item for item in batch if item.num_spec > 0]
        # 1. The draft catches up on every token the target computes this step (prefill chunks,
        #    and any lag behind a decode), and proposes its first token for speculating sequences.
        chunks = []
        for item in batch:
            seq = item.seq
            end = item.start + item.num_tokens
            if seq.num_draft_computed < end:
                chunks.append(Chunk(seq, seq.num_draft_computed, end - seq.num_draft_computed,
                                    "last" if item.num_spec else "none"))
        logits = self.draft.compute(chunks) if chunks else None
        for item in batch:
            item.seq.num_draft_computed = max(item.seq.num_draft_computed, item.start + item.num_tokens)
        q: dict[int, list[torch.Tensor]] = {item.seq.seq_id: [] for item in spec}
        base = {item.seq.seq_id: len(item.seq) for item in spec}  # length before drafting
        self._propose(spec, logits, q)
        # 2. Rounds 2..k: one token each for the sequences still drafting.
        for r in range(1, max((item.num_spec for item in spec), default=0)):
            active = [item for item in spec if item.num_spec > r]
            chunks = [Chunk(item.seq, len(item.seq) - 1, 1) for item in active]
            logits = self.draft.compute(chunks)
            for item in active:
                item.seq.num_draft_computed = len(item.seq)
            self._propose(active, logits, q)
        # 3. The target scores everything in one pass: prefill chunks as usual, and for each
        #    speculating sequence its last token plus the drafts (k+1 positions).
        chunks = [Chunk(item.seq, item.start, item.num_tokens + item.num_spec,
                        "all" if item.num_spec else ("last" if item.samples else "none")) for item in batch]
        logits = self.target.compute(chunks)
        out: dict[int, list[int]] = {}
        row = 0
        plain_rows, plain_seqs = [], []
        for item, chunk in zip(batch, chunks):
            seq = item.seq
            if item.num_spec:
                n = base[seq.seq_id]
                drafts = seq.token_ids[n:]
                del seq.token_ids[n:]  # the scheduler appends what is accepted
                target = logits[row: row + item.num_spec + 1]
                row += item.num_spec + 1
                tokens = self._verify(seq, target, torch.stack(q[seq.seq_id]) if q[seq.seq_id] else None, drafts)
                accepted = len(tokens) - 1
                self.stats.record(len(drafts), accepted)
                item.num_tokens = 1 + accepted  # the last token's and the accepted drafts' K/V are valid
                seq.num_draft_computed = min(seq.num_draft_computed, n + accepted)
                out[seq.seq_id] = tokens
            elif chunk.logits == "last":
                plain_rows.append(row)
                plain_seqs.append(seq)
                row += 1
        if plain_seqs:
            for seq, token in zip(plain_seqs, sample(logits[plain_rows], plain_seqs)):
                out[seq.seq_id] = [token]
        return out

    def _propose(self, items: list[ScheduledSeq], logits: torch.Tensor, q: dict) -> None:
        """Sample one draft token per sequence from the draft's distribution (greedy: argmax).
        With a reduced draft vocabulary the draft's choice is mapped to the target's id and its
        distribution is zero outside the draft's tokens."""
        for i, item in enumerate(items):
            seq: Sequence = item.seq
            p = seq.params
            if p.greedy:  # greedy verification compares argmaxes: no draft distribution is kept
                choice = int(logits[i].argmax())
                seq.token_ids.append(choice if self.d2t is None else int(self.d2t[choice]))
                continue
            probs = filtered_probs(logits[i], p.temperature, p.top_k, p.top_p)
            choice = int(torch.multinomial(probs, 1, generator=seq.generator))
            if self.d2t is None:
                token = choice
            else:
                token = int(self.d2t[choice])
                probs = torch.zeros(self.vocab_size).index_copy_(0, self.d2t, probs)
            q[seq.seq_id].append(probs)
            seq.token_ids.append(token)

    def _verify(self, seq: Sequence, logits: torch.Tensor, q: torch.Tensor | None, drafts: list[int]) -> list[int]:
        p = seq.params
        if p.greedy:
            probs = logits
        else:
            probs = torch.stack([filtered_probs(row, p.temperature, p.top_k, p.top_p) for row in logits])
        tokens = accept_or_resample(probs, q, drafts, seq.generator, p.greedy)
        if p.logprobs is not None:
            seq.logprobs += [logprob_entry(logits[i], token, p.logprobs) for i, token in enumerate(tokens)]
        return tokens
