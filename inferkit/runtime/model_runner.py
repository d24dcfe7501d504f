"""Turns a scheduled batch into the model's flat inputs, runs it, samples the next tokens."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from inferkit.runtime.attention import AttentionMetadata, KVCache, PrefillChunk, decode_slots
from inferkit.runtime.model import RuntimeModel
from inferkit.runtime.sampler import sample
from inferkit.runtime.scheduler import ScheduledSeq


SHORT_CHUNK = 8  # chunks up to this many tokens (after a cached prefix) take the decode path


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
    def __init__(self, model: RuntimeModel, cache: KVCache, attention_backend: str = "torch",
                 cuda_graphs: bool = False, max_model_len: int = 0, max_graph_batch: int = 0) -> None:
        self.model, self.cache = model, cache
        self.block_size = cache.block_size
        self.device = model.device
        self.triton = attention_backend == "triton"
        self.graphs = None
        if cuda_graphs and self.triton and self.device.type == "cuda" and max_graph_batch > 0:
            self.graphs = DecodeGraphs(self, max_model_len, max_graph_batch)

    def prepare(self, chunks: list[Chunk]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flat token ids, positions, attention metadata, and the rows whose logits are kept.
        Host-side arrays are filled through numpy and cross to the device in one copy per dtype
        (eager steps, mixed prefill/decode ones included, pay this every step)."""
        bs = self.block_size
        total = sum(item.num_tokens for item in chunks)
        sample_rows: list[int] = []
        decode_rows, decode_tables, decode_lens, prefills = [], [], [], []
        flat = np.empty((3, total), dtype=np.int64)  # token ids, positions, cache slots
        ids, positions, slots = flat
        row = 0
        for item in chunks:
            seq, start, n = item.seq, item.start, item.num_tokens
            table = seq.block_table
            if n == 1:
                ids[row] = seq.token_ids[start]
                positions[row] = start
                slots[row] = table[start // bs] * bs + start % bs
            else:
                ps = np.arange(start, start + n)
                first = start // bs
                ids[row:row + n] = seq.token_ids[start:start + n]
                positions[row:row + n] = ps
                slots[row:row + n] = np.asarray(table[first:(start + n - 1) // bs + 1])[ps // bs - first] * bs + ps % bs
            if n <= SHORT_CHUNK and (n == 1 or start > 0):
                # Each token attends as a decode row over positions 0..p: one batched attention
                # call for a speculative verify (k+1 tokens) instead of a masked prefill.
                for p in range(start, start + n):
                    decode_rows.append(row + p - start)
                    decode_tables.append(table[: p // bs + 1])
                    decode_lens.append(p + 1)
            elif self.triton:  # one kernel launch for every chunk: tables and (row, start, n) gathered below
                prefills.append(PrefillChunk(row, n, start, table[: -(-(start + n) // bs)]))
            else:
                blocks = torch.tensor(table[: -(-(start + n) // bs)], dtype=torch.int64, device=self.device)
                prefills.append(PrefillChunk(row, n, start, blocks))
            if item.logits == "last":
                sample_rows.append(row + n - 1)
            elif item.logits == "all":
                sample_rows.extend(range(row, row + n))
            row += n
        num_decodes = len(decode_rows)
        if num_decodes:  # decode rows ride along with the flat int64 inputs
            flat = np.concatenate([flat.ravel(), np.asarray(decode_rows, dtype=np.int64)])
        dev64 = torch.from_numpy(flat.ravel()).to(self.device)
        meta = AttentionMetadata(dev64[2 * total:3 * total], prefills=prefills, triton=self.triton)
        if prefills and self.triton:  # block tables [C, width] then (row, start, n) per chunk: one int32 copy
            width = max(len(c.block_table) for c in prefills)
            host = np.zeros(len(prefills) * (width + 3), dtype=np.int32)
            tables = host[: len(prefills) * width].reshape(len(prefills), width)
            info = host[len(prefills) * width:].reshape(len(prefills), 3)
            for i, c in enumerate(prefills):
                tables[i, : len(c.block_table)] = c.block_table
                info[i] = (c.row, c.start, c.num_tokens)
            dev32 = torch.from_numpy(host).to(self.device)
            meta.prefill_tables = dev32[: len(prefills) * width].view(len(prefills), width)
            meta.prefill_info = dev32[len(prefills) * width:].view(len(prefills), 3)
            meta.max_prefill_len = max(c.num_tokens for c in prefills)
        if num_decodes:
            meta.decode_rows = dev64[3 * total:]
            meta.all_decode = num_decodes == total
            width = max(len(t) for t in decode_tables)
            host = np.zeros(num_decodes * (width + 1), dtype=np.int32 if self.triton else np.int64)
            tables = host[: num_decodes * width].reshape(num_decodes, width)
            for i, t in enumerate(decode_tables):
                tables[i, : len(t)] = t
            host[num_decodes * width:] = decode_lens
            dev = torch.from_numpy(host).to(self.device)
            dev_tables, dev_lens = dev[: num_decodes * width].view(num_decodes, width), dev[num_decodes * width:]
            if self.triton:  # the kernel walks the block tables itself
                meta.decode_tables, meta.decode_lens = dev_tables, dev_lens
                meta.max_decode_len = max(decode_lens)
            else:
                meta.decode_slots, meta.decode_mask = decode_slots(dev_tables, dev_lens, bs, self.cache.zero_slot)
        return dev64[:total], dev64[total:2 * total], meta, sample_rows

    def compute(self, chunks: list[Chunk], on_host: bool = True) -> torch.Tensor:
        """Run the chunks; logits (float32) of the rows they asked for, in order, on the CPU
        (``on_host=False``: where the model runs)."""
        if self.graphs is not None and self.graphs.fits(chunks):
            logits = self.graphs.run(chunks)
        else:
            ids, positions, meta, rows = self.prepare(chunks)
            logits = self.model.forward(ids, positions, meta, self.cache,
                                        torch.tensor(rows, dtype=torch.int64, device=self.device))
        return logits.cpu() if on_host else logits

    def run(self, batch: list[ScheduledSeq]) -> dict[int, list[int]]:
        """Compute the batch; return the sampled next token of every sequence whose chunk ended.
        The logits stay on the device: greedy rows are decided there and only their token ids
        cross (a batch of 32 over a 128k vocabulary is 16 MB of logits per step otherwise)."""
        logits = self.compute([Chunk.of(item) for item in batch], on_host=False)
        seqs = [item.seq for item in batch if item.samples]
        if not seqs:
            return {}
        tokens = sample(logits, seqs)
        return {seq.seq_id: [t] for seq, t in zip(seqs, tokens)}

    def logits(self, batch: list[ScheduledSeq]) -> torch.Tensor:
        """Logits of every computed token [T, V] (scoring; nothing is sampled)."""
        return self.compute([Chunk(item.seq, item.start, item.num_tokens, "all") for item in batch])


class DecodeStaging:
    """Host-side inputs of a graphed decode step, in (pinned) buffers reused every step and
    filled through numpy views: one upload per buffer, instead of building a tensor per row.
    Table entries past a row's last block are left as they were: the attention kernel reads
    none past the context length. Padding rows: token 0, position 0, slot -1 (no write),
    length 1 over the pool's zero block."""

    def __init__(self, max_batch: int, width: int, zero_block: int, pin: bool = False) -> None:
        self.vec = torch.zeros((3, max_batch), dtype=torch.int64)  # token ids, positions, slots
        self.lens = torch.ones(max_batch, dtype=torch.int32)
        self.tables = torch.full((max_batch, width), zero_block, dtype=torch.int32)
        if pin:
            self.vec, self.lens, self.tables = self.vec.pin_memory(), self.lens.pin_memory(), self.tables.pin_memory()
        self._vec, self._lens, self._tables = self.vec.numpy(), self.lens.numpy(), self.tables.numpy()
        self.zero_block = zero_block

    def fill(self, chunks: list[Chunk], size: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One row per token of the chunks (a chunk of n tokens: n rows at positions start..start+n-1,
        each attending to everything up to itself), then padding rows up to ``size``."""
        vec, lens, tables = self._vec, self._lens, self._tables
        i = 0
        for c in chunks:
            seq = c.seq
            for p in range(c.start, c.start + c.num_tokens):
                used = p // block_size + 1
                vec[0, i] = seq.token_ids[p]
                vec[1, i] = p
                vec[2, i] = seq.block_table[used - 1] * block_size + p % block_size
                lens[i] = p + 1
                tables[i, :used] = seq.block_table[:used]
                i += 1
        n = i
        vec[0, n:size] = 0
        vec[1, n:size] = 0
        vec[2, n:size] = -1
        lens[n:size] = 1
        tables[n:size, 0] = self.zero_block
        return self.vec, self.lens, self.tables


class DecodeGraphs:
    """CUDA graphs of decode-shaped steps, captured per padded row count (1, 2, 4, 8, then
    multiples of 16) on first use, then replayed: one launch instead of a few hundred. A row is
    one token attending to its sequence up to itself: plain decodes, and the short chunks that
    take the decode path in eager steps too (a speculative verify's k+1 tokens, a draft catching
    up by a token or two). Inputs live in static buffers; padding rows write no K/V (slot -1) and
    read the pool's zero block. The attention kernel's split count is fixed by ``max_model_len``."""

    def __init__(self, runner: ModelRunner, max_model_len: int, max_batch: int) -> None:
        self.runner, self.max_len = runner, max_model_len
        self.sizes = [b for b in (1, 2, 4, 8) if b < max_batch] + list(range(16, max_batch + 16, 16))
        self.sizes = sorted({min(b, max_batch) for b in self.sizes} | {max_batch})
        self.max_batch = max_batch
        dev = runner.device
        width = -(-max_model_len // runner.block_size)
        self.zero_block = runner.cache.zero_slot // runner.block_size
        self.ids = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(max_batch, dtype=torch.int64, device=dev)
        self.slots = torch.full((max_batch,), -1, dtype=torch.int64, device=dev)
        self.tables = torch.full((max_batch, width), self.zero_block, dtype=torch.int32, device=dev)
        self.lens = torch.ones(max_batch, dtype=torch.int32, device=dev)
        self.staging = DecodeStaging(max_batch, width, self.zero_block, pin=dev.type == "cuda")
        self.copied = None  # event after the last upload of the staging buffers
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None

    def fits(self, chunks: list[Chunk]) -> bool:
        """Every chunk is decode-shaped (one token, or a short chunk after its sequence's start, as
        ``prepare`` lays out as decode rows) and the rows fit the largest graph."""
        rows = 0
        for c in chunks:
            if c.num_tokens != 1 and not (c.start > 0 and c.num_tokens <= SHORT_CHUNK):
                return False
            rows += c.num_tokens
        return 0 < rows <= self.max_batch

    @staticmethod
    def kept_rows(chunks: list[Chunk]) -> list[int] | None:
        """The rows whose logits a step returns, in order (None: every row, as for plain decodes)."""
        keep, row, every = [], 0, True
        for c in chunks:
            if c.logits == "all":
                keep.extend(range(row, row + c.num_tokens))
            elif c.logits == "last":
                keep.append(row + c.num_tokens - 1)
                every = every and c.num_tokens == 1
            else:
                every = False
            row += c.num_tokens
        return None if every else keep

    def _meta(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(self.slots[:size], all_decode=True, triton=True, decode_tables=self.tables[:size],
                                 decode_lens=self.lens[:size], max_decode_len=self.max_len)

    def _capture(self, size: int) -> None:
        model, cache = self.runner.model, self.runner.cache
        args = (self.ids[:size], self.positions[:size], self._meta(size), cache, None)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile the kernels and settle the allocator first
            for _ in range(2):
                model.forward(*args)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits = model.forward(*args)
        self.pool = graph.pool()
        self.graphs[size] = (graph, logits)

    def run(self, chunks: list[Chunk]) -> torch.Tensor:
        n = sum(c.num_tokens for c in chunks)
        size = next(b for b in self.sizes if b >= n)
        if size not in self.graphs:
            self.slots.fill_(-1)  # capture runs must not write the cache
            self.tables.fill_(self.zero_block)
            self.lens.fill_(1)
            self._capture(size)
        if self.copied is not None:
            self.copied.synchronize()  # the previous step's uploads have left the staging buffers
        vec, lens, tables = self.staging.fill(chunks, size, self.runner.block_size)
        self.ids[:size].copy_(vec[0, :size], non_blocking=True)
        self.positions[:size].copy_(vec[1, :size], non_blocking=True)
        self.slots[:size].copy_(vec[2, :size], non_blocking=True)
        self.lens[:size].copy_(lens[:size], non_blocking=True)
        self.tables[:size].copy_(tables[:size], non_blocking=True)
        self.copied = torch.cuda.Event()
        self.copied.record()
        graph, logits = self.graphs[size]
        graph.replay()
        keep = self.kept_rows(chunks)
        return logits[:n].float() if keep is None else logits[keep].float()
