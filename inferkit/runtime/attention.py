"""Paged attention, PyTorch reference: K/V live in a pool of blocks addressed by block tables.

Cache layout per layer: [num_blocks + 1, block_size, num_kv_heads, head_dim]; token ``p`` of a
sequence lives in slot ``block_table[p // block_size] * block_size + p % block_size``. The extra
last block is kept zero and never handed out: decode reads pad shorter sequences with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class PrefillChunk:
    row: int  # first row of the chunk in the step's flattened tokens
    num_tokens: int
    start: int  # position of its first token in the sequence
    block_table: torch.Tensor | list[int]  # [num_blocks] int64 (a list when the Triton kernel takes them all)


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] where each new token's K/V go
    decode_rows: torch.Tensor | None = None  # [B] rows of single-token decodes (None: no decodes)
    decode_slots: torch.Tensor | None = None  # [B, S] cache slot of each visible token, zero slot after
    decode_mask: torch.Tensor | None = None  # [B, 1, 1, S] visible tokens; None when all see S
    all_decode: bool = False  # every row is a decode, in order
    prefills: list[PrefillChunk] = field(default_factory=list)
    # The Triton decode kernel reads block tables directly instead of gathered slots:
    triton: bool = False
    decode_tables: torch.Tensor | None = None  # [B, max_blocks] int32
    decode_lens: torch.Tensor | None = None  # [B] int32
    max_decode_len: int = 0  # a bound on decode_lens, known without a device sync
    # The Triton prefill kernel takes every chunk of the step in one launch:
    prefill_tables: torch.Tensor | None = None  # [C, max_blocks] int32
    prefill_info: torch.Tensor | None = None  # [C, 3] int32: first row, first position, tokens
    max_prefill_len: int = 0


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_layers, num_blocks + 1, block_size, num_kv_heads, head_dim)
        # On the CPU, untouched pages of an empty tensor cost no memory until a block is used.
        make = torch.empty if torch.device(device).type == "cpu" else torch.zeros
        self.k = make(shape, dtype=dtype, device=device)
        self.v = make(shape, dtype=dtype, device=device)
        self.k[:, -1].zero_()
        self.v[:, -1].zero_()
        self.block_size = block_size
        self.zero_slot = num_blocks * block_size

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor,
              padded: bool = False) -> None:
        """K/V [T, KVH, D] of new tokens into their slots (the PyTorch path; with the Triton
        attention backend the RoPE kernel writes them, ``inferkit.kernels.fused.rope_store``).
        ``padded``: rows with slot -1 (a CUDA graph's padding rows) may occur; they write zeros
        into the pool's zero slot, which keeps it zero, instead of indexing out of bounds."""
        kc, vc = self.k[layer], self.v[layer]
        if padded:
            keep = slot_mapping >= 0
            slot_mapping = torch.where(keep, slot_mapping, self.zero_slot)
            keep = keep[:, None, None]
            k, v = torch.where(keep, k, 0), torch.where(keep, v, 0)
        kc.view(-1, *kc.shape[2:]).index_copy_(0, slot_mapping, k)
        vc.view(-1, *vc.shape[2:]).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, cache: KVCache, layer: int, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """q [T, num_heads, head_dim] (K/V of these tokens already stored) → [T, num_heads, head_dim]."""
    kc, vc = cache.k[layer], cache.v[layer]
    if meta.triton:
        from inferkit.kernels.paged_attention import paged_decode_attention

        decode = lambda qd: paged_decode_attention(qd, kc, vc, meta.decode_tables, meta.decode_lens,  # noqa: E731
                                                   scale, meta.max_decode_len)
    else:
        decode = lambda qd: decode_attention(qd, kc, vc, meta.decode_slots, meta.decode_mask, scale)  # noqa: E731
    if meta.all_decode:
        return decode(q)
    out = torch.empty_like(q)
    if meta.decode_rows is not None:
        out[meta.decode_rows] = decode(q[meta.decode_rows])
    if meta.prefill_info is not None:
        from inferkit.kernels.paged_attention import paged_prefill_attention

        return paged_prefill_attention(q, kc, vc, meta.prefill_tables, meta.prefill_info, meta.max_prefill_len,
                                       scale, out)
    for chunk in meta.prefills:
        rows = slice(chunk.row, chunk.row + chunk.num_tokens)
        out[rows] = prefill_attention(q[rows], kc, vc, chunk.block_table, chunk.start, scale)
    return out


def decode_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, slots: torch.Tensor,
                     mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One query token per sequence. q [B, H, D] → [B, H, D]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = kc.shape[2]
    k = kc.view(-1, num_kv_heads, head_dim)[slots].transpose(1, 2)  # [B, KVH, S, D]
    v = vc.view(-1, num_kv_heads, head_dim)[slots].transpose(1, 2)
    # Query heads sharing a KV head act as that head's queries: [B, KVH, H/KVH, D].
    qg = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    o = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return o.reshape(batch, num_heads, head_dim)


def decode_slots(block_tables: torch.Tensor, context_lens: torch.Tensor, block_size: int,
                 zero_slot: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Slots [B, S] of every visible token of each sequence (the zero slot past its end) and the
    visibility mask [B, 1, 1, S], None when every sequence sees all S."""
    width = int(context_lens.max())
    offsets = torch.arange(block_size, device=block_tables.device)
    slots = (block_tables[:, :, None] * block_size + offsets).flatten(1)[:, :width]
    visible = torch.arange(width, device=block_tables.device)[None, :] < context_lens[:, None]
    if bool(visible.all()):
        return slots, None
    return torch.where(visible, slots, zero_slot), visible[:, None, None, :]


def prefill_attention(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, block_table: torch.Tensor,
                      start: int, scale: float) -> torch.Tensor:
    """A chunk of ``n`` tokens at positions start..start+n-1, causal over everything before.
    q [n, H, D] → [n, H, D]."""
    n, num_heads, head_dim = q.shape
    context = start + n
    k = kc[block_table].flatten(0, 1)[:context]  # [ctx, KVH, D]
    v = vc[block_table].flatten(0, 1)[:context]
    groups = num_heads // k.shape[1]
    k = k.repeat_interleave(groups, dim=1).transpose(0, 1)  # [H, ctx, D]
    v = v.repeat_interleave(groups, dim=1).transpose(0, 1)
    qh = q.transpose(0, 1)  # [H, n, D]
    if start == 0:
        o = F.scaled_dot_product_attention(qh, k, v, is_causal=True, scale=scale)
    else:
        allowed = torch.arange(context, device=q.device)[None, :] <= torch.arange(start, context, device=q.device)[:, None]
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=allowed, scale=scale)
    return o.transpose(0, 1)
