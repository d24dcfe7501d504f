"""Paged decode attention (Triton), split-KV with a log-sum-exp merge (flash-decoding).

One query token per sequence attends to its ``context_len`` cached tokens, found through its
block table: token ``p`` lives in row ``block_tables[b, p // block_size]`` of the cache, slot
``p % block_size``. Cache layout (one layer): ``[num_blocks, block_size, num_kv_heads, head_dim]``.

A program handles one (sequence, KV head, split): the query heads sharing that KV head are its
rows (grouped-query attention reads each K/V once for the whole group). Long contexts are cut
into splits that run in parallel, each keeping a running max ``m``, a sum ``l`` and an
unnormalised output; a second kernel merges them (skipped when there is one split).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from inferkit.kernels import FP_FUSION, pdl

INTERPRET = pdl.INTERPRET  # one reading of TRITON_INTERPRET for the kernels


@triton.jit
def _attend_tile(q, m_i, l_i, acc, k_ptr, v_ptr, table_ptr, n0, end, pos, kvh, stride_kblock, stride_kslot,
                 stride_khead, offs_d, d_mask, scale, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
                 IEEE: tl.constexpr, MASK: tl.constexpr):
    """Keys n0..n0+BLOCK_N-1 of one KV head, found through the sequence's block table, into the
    running softmax of the query rows ``q``. MASK 0: every key is below ``end`` and seen by every
    row; 1: keys from ``end`` on are not seen; 2: nor keys past each row's position ``pos``
    (causal). IEEE: exact float32 products (float32, or the interpreter, whose bf16 dot is wrong)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    valid = offs_n < end
    block = tl.load(table_ptr + offs_n // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
    rows = block * stride_kblock + (offs_n % BLOCK_SIZE).to(tl.int64) * stride_kslot + kvh * stride_khead
    kv_mask = d_mask[None, :] if MASK == 0 else valid[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    if IEEE:
        s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
    else:
        s = tl.dot(q, tl.trans(k)) * scale
    if MASK == 1:
        s = tl.where(valid[None, :], s, float("-inf"))
    elif MASK == 2:
        s = tl.where(valid[None, :] & (offs_n[None, :] <= pos[:, None]), s, float("-inf"))
    v = tl.load(v_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    return _online_softmax(s, v, m_i, l_i, acc, IEEE)


@triton.jit
def _online_softmax(s, v, m_i, l_i, acc, IEEE: tl.constexpr):
    """One K/V tile into the running max, sum and unnormalised output (rows that have seen no
    key yet stay at zero)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


# Eager steps' tables widen as contexts grow, and the (max, sum) strides follow the split count
# (2 x splits: divisible by 16 from 8 splits on): neither is specialized, so neither recompiles.
@triton.jit(do_not_specialize=["stride_tb", "stride_mb", "stride_mh"])
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, tables_ptr, lens_ptr, out_ptr, part_ptr, ml_ptr,
    scale, tokens_per_split,
    stride_qb, stride_qh, stride_kblock, stride_kslot, stride_khead, stride_tb,
    stride_ob, stride_oh, stride_pb, stride_ph, stride_ps, stride_mb, stride_mh, stride_ms,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, MULTI: tl.constexpr, IEEE: tl.constexpr,
    SIGNAL: tl.constexpr = False,
):
    pdl.signal(SIGNAL)  # a matmul launched for PDL next may start (it reads only weights until this one ends)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    ctx = tl.load(lens_ptr + b)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, ctx)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, D_PAD)
    heads = kvh * GROUP + offs_g
    g_mask = offs_g < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_ptr, v_ptr, tables_ptr + b * stride_tb, n0, end, 0, kvh,
                                     stride_kblock, stride_kslot, stride_khead, offs_d, d_mask, scale,
                                     BLOCK_SIZE, BLOCK_N, IEEE, MASK=1)
    out_mask = g_mask[:, None] & d_mask[None, :]
    if not MULTI:
        o = acc / l_i[:, None]
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        base = b * stride_pb + heads * stride_ph + split * stride_ps  # [GROUP_PAD]
        tl.store(part_ptr + base[:, None] + offs_d[None, :], acc, mask=out_mask)
        ml = ml_ptr + b * stride_mb + heads * stride_mh + split * stride_ms
        tl.store(ml, m_i, mask=g_mask)
        tl.store(ml + 1, l_i, mask=g_mask)


@triton.jit(do_not_specialize=["stride_mb", "stride_mh"])  # as in the split kernel
def _merge_kernel(part_ptr, ml_ptr, out_ptr, num_splits, stride_pb, stride_ph, stride_ps, stride_mb, stride_mh,
                  stride_ms, stride_ob, stride_oh,
                  S_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, SIGNAL: tl.constexpr = False):
    pdl.signal(SIGNAL)  # the output projection after it may start
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_PAD)
    offs_d = tl.arange(0, D_PAD)
    s_mask = offs_s < num_splits
    d_mask = offs_d < HEAD_DIM
    ml = ml_ptr + b * stride_mb + h * stride_mh + offs_s * stride_ms
    m = tl.load(ml, mask=s_mask, other=float("-inf"))
    l = tl.load(ml + 1, mask=s_mask, other=0.0)
    m_max = tl.max(m, 0)
    w = tl.where(s_mask & (l > 0), tl.exp(m - m_max), 0.0)  # empty splits: m=-inf, l=0
    parts = tl.load(part_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * stride_ps + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    o = tl.sum(parts * w[:, None], 0) / tl.sum(l * w, 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(out_ptr.dtype.element_ty), mask=d_mask)


def num_splits_for(batch: int, num_kv_heads: int, max_context: int, block_n: int = 64, target_programs: int = 264) -> int:
    """Enough splits that batch x KV heads x splits fills the GPU (~2 programs per SM on an
    H100), none shorter than one tile; a power of two, so that as contexts grow the count takes
    a handful of values (the split count is a launch parameter, but the merge kernel compiles
    once per padded count). Also fixed per batch size under CUDA graphs."""
    want = max(1, -(-target_programs // (batch * num_kv_heads)))
    splits = max(1, min(want, -(-max_context // block_n), 64))
    return 1 << (splits.bit_length() - 1)


@functools.lru_cache(maxsize=256)
def _constants(num_heads: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
               block_n: int | None) -> tuple[int, dict]:
    """(block_n, the split kernel's constexprs) for a model's heads: worked out once, as
    eager steps call the kernel once per layer."""
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    block_n = block_n or (32 if dtype == torch.float32 and head_dim > 64 else 64)
    group = num_heads // num_kv_heads
    d_pad = max(16, 1 << (head_dim - 1).bit_length())
    consts = dict(GROUP=group, GROUP_PAD=max(16, 1 << (group - 1).bit_length()), HEAD_DIM=head_dim, D_PAD=d_pad,
                  BLOCK_SIZE=block_size, BLOCK_N=block_n,
                  IEEE=dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16), num_warps=4, num_stages=2,
                  **FP_FUSION)
    return block_n, consts


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           max_context: int, num_splits: int | None = None, block_n: int | None = None,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, H, D]; caches [num_blocks, block_size, KVH, D]; block_tables [B, max_blocks] int32;
    context_lens [B] int32 (each >= 1); ``max_context`` bounds the lengths (no device sync).
    Returns [B, H, D] in q's dtype. ``block_n``: tokens per step, 64 (32 for float32 with heads
    over 64 wide, whose 64-token tiles spill registers on sm_90)."""
    batch, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    if k_cache.stride(-1) != 1 or q.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("paged_decode_attention: q and the caches need unit stride along the head dimension, "
                         "and the two caches the same layout")
    block_n, consts = _constants(num_heads, num_kv_heads, head_dim, block_size, q.dtype, block_n)
    splits = num_splits or num_splits_for(batch, num_kv_heads, max_context, block_n)
    per_split = -(-max_context // splits)
    per_split = -(-per_split // block_n) * block_n
    out = torch.empty_like(q) if out is None else out
    if splits > 1:  # partial outputs, then (max, sum) pairs: one allocation
        size = batch * num_heads * splits * head_dim
        part = torch.empty(size + batch * num_heads * splits * 2, dtype=torch.float32, device=q.device)
        ml = part[size:]  # the kernels address both through the strides below
        s_p = (num_heads * splits * head_dim, splits * head_dim, head_dim)
        s_m = (num_heads * splits * 2, splits * 2, 2)
    else:
        part = ml = out  # unused
        s_p = s_m = (0, 0, 0)
    q_s, k_s, o_s = q.stride(), k_cache.stride(), out.stride()
    o_b, o_h = o_s[0], o_s[1]
    signal = pdl.capable(q.device)  # the last kernel lets a PDL matmul after it start (inferkit.kernels.pdl)
    _decode_split_kernel[(batch, num_kv_heads, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, part, ml,
        scale, per_split, q_s[0], q_s[1], k_s[0], k_s[1], k_s[2], block_tables.stride(0),
        o_b, o_h, *s_p, *s_m, MULTI=splits > 1, SIGNAL=signal and splits == 1, **consts,
    )
    if splits > 1:
        _merge_kernel[(batch, num_heads)](
            part, ml, out, splits, *s_p, *s_m, o_b, o_h,
            S_PAD=max(2, 1 << (splits - 1).bit_length()), HEAD_DIM=head_dim, D_PAD=consts["D_PAD"], SIGNAL=signal,
            num_warps=4, **FP_FUSION,
        )
    return out


@triton.jit(do_not_specialize=["stride_tb"])  # the tables' width follows the step's longest chunk
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, info_ptr, scale,
    stride_qt, stride_qh, stride_kblock, stride_kslot, stride_khead, stride_tb, stride_ot, stride_oh,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    SIGNAL: tl.constexpr = False,
):
    """Causal attention of a chunk of new tokens over its sequence's cached prefix and itself,
    through the block table (flash-attention with paged K/V). Program (chunk, query tile, KV
    head): BLOCK_M tokens x the GROUP query heads of that KV head are the tile's rows, so each K/V
    tile is read once for all of them; K/V tiles run up to the tile's last position only."""
    pdl.signal(SIGNAL)  # the output projection after it may start
    c = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    kvh = tl.program_id(2)
    row0 = tl.load(info_ptr + c * 3)
    start = tl.load(info_ptr + c * 3 + 1)
    n = tl.load(info_ptr + c * 3 + 2)
    if m0 < n:
        R: tl.constexpr = BLOCK_M * GROUP_PAD
        offs_r = tl.arange(0, R)
        tok = m0 + offs_r // GROUP_PAD  # row r: token m0 + r // GROUP_PAD, query head r % GROUP_PAD
        head = kvh * GROUP + offs_r % GROUP_PAD
        r_mask = (tok < n) & (offs_r % GROUP_PAD < GROUP)
        offs_d = tl.arange(0, D_PAD)
        d_mask = offs_d < HEAD_DIM
        qo_mask = r_mask[:, None] & d_mask[None, :]
        q = tl.load(q_ptr + (row0 + tok)[:, None].to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                    mask=qo_mask, other=0.0)
        pos = start + tok  # each row's position: it sees keys 0..pos
        m_i = tl.full([R], float("-inf"), tl.float32)
        l_i = tl.zeros([R], tl.float32)
        acc = tl.zeros([R, D_PAD], tl.float32)
        end = tl.minimum(start + m0 + BLOCK_M, start + n)
        # Whole K/V tiles that every row of the tile sees (keys up to start + m0) need no masks:
        # 28% fewer instructions per tile in 16-bit dtypes on sm_90. Float32 keeps one masked loop
        # (two spill registers there).
        if IEEE:
            full = 0
        else:
            full = (start + m0 + 1) // BLOCK_N * BLOCK_N
        table = tables_ptr + c * stride_tb
        for n0 in range(0, full, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_ptr, v_ptr, table, n0, full, pos, kvh, stride_kblock,
                                         stride_kslot, stride_khead, offs_d, d_mask, scale, BLOCK_SIZE, BLOCK_N, IEEE,
                                         MASK=0)
        # The rest, up to the tile's last token: causal masks
        for n0 in range(full, end, BLOCK_N):
            m_i, l_i, acc = _attend_tile(q, m_i, l_i, acc, k_ptr, v_ptr, table, n0, end, pos, kvh, stride_kblock,
                                         stride_kslot, stride_khead, offs_d, d_mask, scale, BLOCK_SIZE, BLOCK_N, IEEE,
                                         MASK=2)
        o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + (row0 + tok)[:, None].to(tl.int64) * stride_ot + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=qo_mask)


def prefill_tiles(group: int, head_dim: int, dtype: torch.dtype, interpret: bool = INTERPRET) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_N) of the prefill kernel. Tiles of 64 (token, query head) rows by 64 keys
    in 16-bit dtypes (warpgroup MMAs on sm_90); float32's exact products run on the CUDA cores,
    in 16 x 32 tiles (larger ones spill registers); the interpreter takes 16 rows, to keep tests
    quick."""
    group_pad = 1 << (group - 1).bit_length()
    fp32 = dtype == torch.float32
    rows = 16 if interpret or fp32 else 64
    return max(1, rows // group_pad), 32 if fp32 else 64


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, tables: torch.Tensor,
                            info: torch.Tensor, max_len: int, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Every prefill chunk of a step in one launch. q [T, H, D] (the step's rows; K/V of these
    tokens already stored); tables [C, max_blocks] int32, chunk c's block table; info [C, 3] int32:
    (first row in q, position of its first token, number of tokens); ``max_len`` bounds the
    token counts. Writes the chunks' rows of ``out`` [T, H, D] and returns it."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    _, block_size, num_kv_heads, _ = k_cache.shape
    if k_cache.stride(-1) != 1 or q.stride(-1) != 1 or out.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("paged_prefill_attention: unit stride along the head dimension, caches of one layout")
    if num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not group over {num_kv_heads} KV heads")
    group = num_heads // num_kv_heads
    block_m, block_n = prefill_tiles(group, head_dim, q.dtype)
    k_s = k_cache.stride()
    _prefill_kernel[(info.shape[0], -(-max_len // block_m), num_kv_heads)](
        q, k_cache, v_cache, out, tables, info, scale,
        q.stride(0), q.stride(1), k_s[0], k_s[1], k_s[2], tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=1 << (group - 1).bit_length(), HEAD_DIM=head_dim,
        D_PAD=max(16, 1 << (head_dim - 1).bit_length()), BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n,
        IEEE=q.dtype == torch.float32 or (INTERPRET and q.dtype == torch.bfloat16), SIGNAL=pdl.capable(q.device),
        num_warps=4, num_stages=2, **FP_FUSION,
    )
    return out


def reference_paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """The same function in plain PyTorch, one sequence at a time, in float32."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    outs = []
    for b in range(batch):
        n = int(context_lens[b])
        blocks = block_tables[b, : -(-n // block_size)].long()
        k = k_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(num_heads // num_kv_heads, dim=1)
        v = v_cache[blocks].flatten(0, 1)[:n].float().repeat_interleave(num_heads // num_kv_heads, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].float(), k) * scale
        outs.append(torch.einsum("hn,nhd->hd", torch.softmax(s, -1), v))
    return torch.stack(outs).to(q.dtype)
