"""Turns a scheduled batch into the model's flat inputs, runs it, samples the next tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from inferkit.runtime.attention import AttentionMetadata, KVCache, PrefillChunk, decode_slots
from inferkit.runtime.model import RuntimeModel
from inferkit.runtime.sampler import sample
from inferkit.runtime.scheduler import ScheduledSeq


@dataclass(slots=True)
class Chunk:
    """Tokens ``start .. start+num_tokens-1`` of ``seq`` to compute, and which logits to keep."""

    seq: object
    start: int
    num_tokens: int
    logits: str = "last"  # "last", "all" or "none"

    @classmethod
    def of(cls, item: ScheduledSeq) -> "Chunk":
        return cls(item.seq, item.start, item.num_tokens, "last" if item.samples else "none")


class ModelRunner:
    def __init__(self, model: RuntimeModel, cache: KVCache) -> None:
        self.model, self.cache = model, cache
        self.block_size = cache.block_size
        self.device = model.device

    def prepare(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flat token ids, positions, attention metadata, and the rows whose logits are kept."""
        bs = self.block_size
        ids, positions, slots, sample_rows = [], [], [], []
        decode_rows, decode_tables, decode_lens, prefills = [], [], [], []
        for item in chunks:
            seq, start, n = item.seq, item.start, item.num_tokens
            row = len(ids)
            ids += seq.token_ids[start:start + n]
            for p in range(start, start + n):
                positions.append(p)
                slots.append(seq.block_table[p // bs] * bs + p % bs)
            if n == 1:
                decode_rows.append(row)
                decode_tables.append(seq.block_table[: (start + bs) // bs])
                decode_lens.append(start + 1)
            else:
                table = torch.tensor(seq.block_table[: -(-(start + n) // bs)], dtype=torch.int64, device=self.device)
                prefills.append(PrefillChunk(row, n, start, table))
            if item.logits == "last":
                sample_rows.append(row + n - 1)
            elif item.logits == "all":
                sample_rows.extend(range(row, row + n))
        meta = AttentionMetadata(torch.tensor(slots, dtype=torch.int64, device=self.device), prefills=prefills)
        if decode_rows:
            width = max(len(t) for t in decode_tables)
            padded = [t + [0] * (width - len(t)) for t in decode_tables]
            meta.decode_rows = torch.tensor(decode_rows, dtype=torch.int64, device=self.device)
            meta.decode_slots, meta.decode_mask = decode_slots(
                torch.tensor(padded, dtype=torch.int64, device=self.device),
                torch.tensor(decode_lens, dtype=torch.int64, device=self.device), bs, self.cache.zero_slot)
            meta.all_decode = len(decode_rows) == len(ids)
        tensor = lambda xs: torch.tensor(xs, dtype=torch.int64, device=self.device)  # noqa: E731
        return tensor(ids), tensor(positions), meta, sample_rows

    def compute(self, chunks: list[Chunk]) -> torch.Tensor:
        """Run the chunks; logits (float32, on the CPU) of the rows they asked for, in order."""
        ids, positions, meta, rows = self.prepare(chunks)
        logits = self.model.forward(ids, positions, meta, self.cache,
                                    torch.tensor(rows, dtype=torch.int64, device=self.device))
        return logits.cpu()

    def run(self, batch: list[ScheduledSeq]) -> dict[int, list[int]]:
        """Compute the batch; return the sampled next token of every sequence whose chunk ended."""
        logits = self.compute([Chunk.of(item) for item in batch])
        seqs = [item.seq for item in batch if item.samples]
        if not seqs:
            return {}
        tokens = sample(logits, seqs)
        return {seq.seq_id: [t] for seq, t in zip(seqs, tokens)}

    def logits(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Logits of every computed token [T, V] (scoring; nothing is sampled)."""
        return self.compute([Chunk(item.seq, item.start, item.num_tokens, "all") for item in batch])
