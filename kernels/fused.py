"""The decoder layer's small element-wise steps as one kernel each (Triton).

A decode step at batch 1 reads every weight once, but around each matmul PyTorch launches a
kernel per element-wise operation: a bf16 RMSNorm written as transformers writes it is eight
(cast, square, mean, add, rsqrt, multiply, cast, weight), RoPE four, SwiGLU two, and each
residual add one more. That is about twenty small kernels per layer besides the matmuls and the
attention, a few microseconds each even replayed from a CUDA graph. Here:

- ``rms_norm``: optionally adds the pending residual update into the residual stream (in place),
  then normalizes it: one kernel for ``h += update; x = norm(h)``.
- ``rope_store``: rotates the query and key heads of the fused QKV output, writes the rotated
  queries out and scatters the rotated keys and the values into their KV-cache slots.
- ``silu_mul``: ``silu(gate) * up`` from the fused gate/up output.

The arithmetic is the reference's (transformers' Llama modules), rounding where it rounds: the
residual sum and the normalized vector to the activation dtype before the weight multiplies it,
each RoPE product and their sum, the SiLU before the product. Only the order of the RMSNorm's sum
of squares (and the exponential's last bit in SiLU) differ from PyTorch's kernels.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from inferkit.kernels import FP_FUSION, pdl

INTERPRET = pdl.INTERPRET  # one reading of TRITON_INTERPRET for the kernels


@triton.jit
def _round(x, dtype: tl.constexpr, BY_HAND: tl.constexpr):
    """float32 ``x`` to ``dtype``, to nearest even. Triton's CPU interpreter truncates float32 to
    bfloat16; BY_HAND (set there) rounds with integer operations first, so the interpreter gives
    the GPU's bits."""
    if BY_HAND:
        b = x.to(tl.int32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & -65536
        return b.to(tl.float32, bitcast=True).to(dtype)
    return x.to(dtype)


@functools.lru_cache(maxsize=256)
def _consts(kind: str, dtype: torch.dtype, *sizes: int) -> dict:
    """Compile-time constants of a launch, worked out once per shape (eager steps call these
    wrappers for every layer: the Python work per call is kept to checks, allocation, launch)."""
    by_hand = INTERPRET and dtype == torch.bfloat16
    if kind == "norm":
        block = triton.next_power_of_2(sizes[0])
        return dict(BLOCK=block, BY_HAND=by_hand, num_warps=min(16, max(1, block // 256)), **FP_FUSION)
    if kind == "rope":
        num_heads, num_kv, head_dim = sizes
        # 8 heads of 128 per program at most (register use does not grow with the model's heads)
        d_pad = triton.next_power_of_2(head_dim)
        per_program = max(1, min(triton.next_power_of_2(num_heads + 2 * num_kv), 1024 // d_pad))
        return dict(NUM_HEADS=num_heads, NUM_KV=num_kv, HEAD_DIM=head_dim, D_PAD=d_pad,
                    HEADS_PER_PROGRAM=per_program, BY_HAND=by_hand, num_warps=4,
                    enable_fp_fusion=False)  # no multiply-add contraction: float32 rounds each product, as PyTorch
    return dict(BLOCK=min(1024, triton.next_power_of_2(sizes[0])), BY_HAND=by_hand, num_warps=4, **FP_FUSION)


@triton.jit
def _rms_norm_kernel(h_ptr, u_ptr, w_ptr, out_ptr, H, stride_h, stride_u, stride_o, eps,
                     HAS_UPDATE: tl.constexpr, BLOCK: tl.constexpr, BY_HAND: tl.constexpr,
                     SIGNAL: tl.constexpr = False):
    pdl.signal(SIGNAL)  # a matmul launched for PDL next may start (it reads only weights until this one ends)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < H
    dtype = out_ptr.dtype.element_ty
    h = tl.load(h_ptr + row * stride_h + offs, mask=mask, other=0.0)
    if HAS_UPDATE:  # the residual stream's in-place add, rounded as PyTorch's add_ rounds
        u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0)
        h = _round(h.to(tl.float32) + u.to(tl.float32), dtype, BY_HAND)
        tl.store(h_ptr + row * stride_h + offs, h, mask=mask)
    x = h.to(tl.float32)
    var = tl.sum(x * x, 0) / H
    y = _round(x * tl.math.rsqrt(var + eps), dtype, BY_HAND)  # rounded before the weight, as transformers does
    w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row * stride_o + offs, _round(w.to(tl.float32) * y.to(tl.float32), dtype, BY_HAND), mask=mask)


def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float, update: torch.Tensor | None = None) -> torch.Tensor:
    """``norm(h) * weight`` for h [T, H]; with ``update`` [T, H], first ``h += update`` in place.
    Rows need unit stride; the result is a new contiguous tensor in h's dtype."""
    tokens, hidden = h.shape
    if h.stride(-1) != 1 or weight.shape != (hidden,) or not weight.is_contiguous():
        raise ValueError("rms_norm: h [T, H] with unit stride along H, and a contiguous weight [H]")
    if update is not None and (update.shape != h.shape or update.stride(-1) != 1):
        raise ValueError(f"rms_norm: update of shape {tuple(update.shape)} for h of {tuple(h.shape)}")
    out = torch.empty((tokens, hidden), dtype=h.dtype, device=h.device)
    if tokens == 0:
        return out
    u = update if update is not None else h
    _rms_norm_kernel[(tokens,)](h, u, weight, out, hidden, h.stride(0), u.stride(0), out.stride(0), eps,
                                HAS_UPDATE=update is not None, SIGNAL=pdl.capable(h.device),
                                **_consts("norm", h.dtype, hidden))
    return out


@triton.jit
def _rope_store_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slots_ptr, q_ptr, kc_ptr, vc_ptr,
                       stride_t, stride_cos, stride_sin, stride_qt, stride_cslot,
                       NUM_HEADS: tl.constexpr, NUM_KV: tl.constexpr, HEAD_DIM: tl.constexpr,
                       D_PAD: tl.constexpr, HEADS_PER_PROGRAM: tl.constexpr, BY_HAND: tl.constexpr):
    """Token ``program_id(0)``, heads ``HEADS_PER_PROGRAM * program_id(1) + ...`` of the QKV row
    (query heads, then key heads, then value heads): queries rotated to q, keys rotated and the
    values as they are to the caches."""
    t = tl.program_id(0).to(tl.int64)
    dtype = q_ptr.dtype.element_ty
    half: tl.constexpr = HEAD_DIM // 2
    d = tl.arange(0, D_PAD)
    d_mask = d < HEAD_DIM
    heads = tl.program_id(1) * HEADS_PER_PROGRAM + tl.arange(0, HEADS_PER_PROGRAM)
    mask = (heads < NUM_HEADS + 2 * NUM_KV)[:, None] & d_mask[None, :]
    row = qkv_ptr + t * stride_t + heads[:, None] * HEAD_DIM
    x = tl.load(row + d[None, :], mask=mask, other=0.0)
    rotate = (heads < NUM_HEADS + NUM_KV)[:, None]
    pos = tl.load(pos_ptr + t).to(tl.int64)
    c = tl.load(cos_ptr + pos * stride_cos + d, mask=d_mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_sin + d, mask=d_mask, other=0.0).to(tl.float32)  # first half negated
    swapped = tl.load(row + tl.where(d < half, d + half, d - half)[None, :], mask=mask & rotate, other=0.0)
    # x * cos + rotate_half(x) * sin, each product and the sum rounded to the activation dtype
    a = _round(x.to(tl.float32) * c[None, :], dtype, BY_HAND)
    b = _round(swapped.to(tl.float32) * s[None, :], dtype, BY_HAND)
    out = tl.where(rotate, _round(a.to(tl.float32) + b.to(tl.float32), dtype, BY_HAND), x)
    is_q = (heads < NUM_HEADS)[:, None]
    tl.store(q_ptr + t * stride_qt + heads[:, None] * HEAD_DIM + d[None, :], out, mask=mask & is_q)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    if slot >= 0:  # padding rows of a CUDA-graph batch carry slot -1: no write
        v_head = heads >= NUM_HEADS + NUM_KV
        kv_head = tl.where(v_head, heads - NUM_HEADS - NUM_KV, heads - NUM_HEADS)
        dst = slot * stride_cslot + kv_head[:, None] * HEAD_DIM + d[None, :]
        is_v = v_head[:, None]
        tl.store(kc_ptr + dst, out, mask=mask & rotate & ~is_q)
        tl.store(vc_ptr + dst, out, mask=mask & is_v)


def rope_store(qkv: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, positions: torch.Tensor,
               num_heads: int, num_kv_heads: int, k_cache: torch.Tensor, v_cache: torch.Tensor,
               slot_mapping: torch.Tensor) -> torch.Tensor:
    """qkv [T, (H + 2 KVH) * D] (query heads, key heads, value heads; unit stride along a row);
    cos, sin_signed [max_len, D] or [max_len, 1, D] (sin with its first half negated; row
    ``positions[t]`` is token t's); caches [num_blocks, block_size, KVH, D] contiguous; slot_mapping [T] (-1: skip).
    Returns the rotated queries [T, H, D]; the rotated keys and the values go to the caches."""
    tokens = qkv.shape[0]
    head_dim = k_cache.shape[-1]
    if qkv.stride(-1) != 1 or qkv.shape[-1] != (num_heads + 2 * num_kv_heads) * head_dim:
        raise ValueError(f"rope_store: qkv of shape {tuple(qkv.shape)} for {num_heads}/{num_kv_heads} heads of {head_dim}")
    if head_dim % 2 or not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.shape[-2] != num_kv_heads:
        raise ValueError("rope_store: contiguous caches [blocks, block_size, KVH, D] with an even head size")
    cos2 = cos if cos.dim() == 2 else cos.view(cos.shape[0], -1)
    sin2 = sin_signed if sin_signed.dim() == 2 else sin_signed.view(sin_signed.shape[0], -1)
    if cos2.shape[1] != head_dim or sin2.shape[1] != head_dim or cos2.stride(1) != 1 or sin2.stride(1) != 1:
        raise ValueError(f"rope_store: cos/sin tables of {head_dim} per position")
    q = torch.empty((tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if tokens == 0:
        return q
    consts = _consts("rope", qkv.dtype, num_heads, num_kv_heads, head_dim)
    blocks = -(-(num_heads + 2 * num_kv_heads) // consts["HEADS_PER_PROGRAM"])
    _rope_store_kernel[(tokens, blocks)](
        qkv, cos2, sin2, positions, slot_mapping, q, k_cache, v_cache, qkv.stride(0), cos2.stride(0),
        sin2.stride(0), q.stride(0), num_kv_heads * head_dim, **consts)
    return q


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, I, stride_x, stride_o, BLOCK: tl.constexpr, BY_HAND: tl.constexpr,
                     SIGNAL: tl.constexpr = False):
    pdl.signal(SIGNAL)  # as in _rms_norm_kernel: the down projection may start
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < I
    dtype = out_ptr.dtype.element_ty
    g = tl.load(x_ptr + t * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + t * stride_x + I + offs, mask=mask, other=0.0).to(tl.float32)
    act = _round(g / (1.0 + tl.exp(-g)), dtype, BY_HAND)  # silu, rounded before the product as in PyTorch
    tl.store(out_ptr + t * stride_o + offs, _round(act.to(tl.float32) * u, dtype, BY_HAND), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2I] (gate columns, then up) → silu(gate) * up [T, I]."""
    tokens, width = gate_up.shape
    if width % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"silu_mul: gate_up [T, 2I] with unit stride, got {tuple(gate_up.shape)}")
    inter = width // 2
    out = torch.empty((tokens, inter), dtype=gate_up.dtype, device=gate_up.device)
    if tokens == 0:
        return out
    consts = _consts("silu", gate_up.dtype, inter)
    _silu_mul_kernel[(tokens, -(-inter // consts["BLOCK"]))](gate_up, out, inter, gate_up.stride(0), out.stride(0),
                                                            SIGNAL=pdl.capable(gate_up.device), **consts)
    return out
