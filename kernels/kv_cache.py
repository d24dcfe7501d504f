"""KV-cache write (Triton): scatter each new token's K and V into its cache slot.

Cache layout (one layer): ``[num_blocks, block_size, num_kv_heads, head_dim]``, addressed as flat
slots ``block * block_size + offset``. A negative slot skips the token (padding rows of a
CUDA-graph batch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slots_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                     stride_cslot, stride_chead, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot >= 0:
        offs = tl.arange(0, D_PAD)
        mask = offs < HEAD_DIM
        dst = slot * stride_cslot + h * stride_chead + offs
        tl.store(kc_ptr + dst, tl.load(k_ptr + t * stride_kt + h * stride_kh + offs, mask=mask), mask=mask)
        tl.store(vc_ptr + dst, tl.load(v_ptr + t * stride_vt + h * stride_vh + offs, mask=mask), mask=mask)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k, v [T, KVH, D] (any row stride, unit stride in D); caches [num_blocks, block_size, KVH, D]
    contiguous; slot_mapping [T] (int32/int64, -1: skip)."""
    tokens, num_kv_heads, head_dim = k.shape
    if tokens == 0:
        return
    if k.stride(-1) != 1 or v.stride(-1) != 1 or not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        raise ValueError("store_kv: contiguous caches, and K/V with unit stride along the head dimension")
    _store_kv_kernel[(tokens, num_kv_heads)](
        k, v, k_cache, v_cache, slot_mapping, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        num_kv_heads * head_dim, head_dim, HEAD_DIM=head_dim, D_PAD=1 << (head_dim - 1).bit_length(), num_warps=1,
    )


def reference_store_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache.view(-1, *k_cache.shape[2:])[slots] = k[keep]
    v_cache.view(-1, *v_cache.shape[2:])[slots] = v[keep]
