"""Dequantizing matmul (Triton): ``x @ dequant(W).T`` reading W in the artifact's packing.

W is stored as compressed-tensors ``pack-quantized`` words: int32 ``[N, K * bits / 32]``, value
``8w + j`` (4 bits; ``4w + j`` for 8 bits) at bit ``bits * j`` of word ``w``, offset by
``2**(bits-1)``. Scales ``[N, G]`` per output channel and group of ``group_size`` inputs
(``G = 1``: per channel); optional zero points ``[N, G]`` (unpacked, any dtype). Dequantized
``W[n, k] = (q - zero[n, g]) * scale[n, g]`` with ``g = k // group_size``.

The packed words are read once, coalesced along K, and taken apart in registers without ever
laying out an unpacked tile: value ``j`` of each word is shifted out and meets the inputs
``VALS * w + j`` (a sum over K may visit K in any order). Nothing is written but the output.

- ``gemv``: 1-4 rows (decode). Each program owns BN output channels; multiply-and-sum on the
  CUDA cores, zero points folded in once per word (a 16-row MMA tile would be mostly padding).
- ``mma``: more rows: one ``tl.dot`` per value position, on weights dequantized to the
  activation dtype.

Both split K across programs when the output alone has too few tiles to fill the GPU (split-K
partial sums are added atomically into a float32 buffer).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _scale_zero(s_ptr, z_ptr, offs_n, n_mask, offs_kw, kw_mask, k0, stride_sn, stride_zn,
                VALS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, ONE_GROUP: tl.constexpr):
    """Scale and zero point of every word of the tile: [BN, 1] when the tile lies in one group,
    else gathered per word [BN, BKW] (a word's VALS inputs always share a group)."""
    if ONE_GROUP:
        g = k0 // GROUP
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=n_mask, other=0).to(tl.float32)[:, None]
        z = tl.load(z_ptr + offs_n * stride_zn + g, mask=n_mask, other=0).to(tl.float32)[:, None] if HAS_ZP else 0.0
    else:
        g = (offs_kw * VALS) // GROUP
        m = n_mask[:, None] & kw_mask[None, :]
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=m, other=0).to(tl.float32)
        z = tl.load(z_ptr + offs_n[:, None] * stride_zn + g[None, :], mask=m, other=0).to(tl.float32) if HAS_ZP else 0.0
    return s, z


@triton.jit
def _k_range(K, pid_k, SPLIT_K: tl.constexpr, BK: tl.constexpr):
    """The inputs [k_lo, k_hi) of split ``pid_k``, in whole tiles of BK."""
    per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BK) * BK
    k_lo = pid_k * per_split
    return k_lo, tl.minimum(k_lo + per_split, K)


@triton.jit
def _load_words(w_ptr, offs_n, n_mask, k0, KW, stride_wn, VALS: tl.constexpr, BKW: tl.constexpr):
    """The packed words [BN, BKW] holding inputs k0..k0+BKW*VALS, coalesced along K."""
    offs_kw = k0 // VALS + tl.arange(0, BKW)
    kw_mask = offs_kw < KW
    words = tl.load(w_ptr + offs_n[:, None] * stride_wn + offs_kw[None, :],
                    mask=n_mask[:, None] & kw_mask[None, :], other=0)
    return offs_kw, kw_mask, words


@triton.jit
def _finish(acc, out_ptr, s_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, stride_sn,
            PER_CHANNEL: tl.constexpr, SPLIT_K: tl.constexpr):
    if PER_CHANNEL:
        acc = acc * tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0).to(tl.float32)[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if SPLIT_K == 1:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(ptrs, acc, mask=mask)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, KW, G,
                 stride_xm, stride_wn, stride_sn, stride_zn, stride_om,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, PER_CHANNEL: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr):
    """Works on the packed words in place: value j of every word meets input ``VALS*w + j``, so
    no unpacked tile is ever laid out; sum_j (q - offset - zero) x_j = sum_j q x_j - (offset + zero) sum_j x_j."""
    VALS: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // VALS
    OFF: tl.constexpr = 1 << (BITS - 1)
    MASK: tl.constexpr = (1 << BITS) - 1
    ONE_GROUP: tl.constexpr = (not PER_CHANNEL) and BK <= GROUP and GROUP % BK == 0
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BM)
    m_mask = offs_m < M
    k_lo, k_hi = _k_range(K, pid_k, SPLIT_K, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    z_ch = 0.0
    if PER_CHANNEL and HAS_ZP:
        z_ch = tl.load(z_ptr + offs_n * stride_zn, mask=n_mask, other=0).to(tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        offs_kw, kw_mask, words = _load_words(w_ptr, offs_n, n_mask, k0, KW, stride_wn, VALS, BKW)
        if not PER_CHANNEL:
            s, z = _scale_zero(s_ptr, z_ptr, offs_n, n_mask, offs_kw, kw_mask, k0, stride_sn, stride_zn,
                               VALS, GROUP, HAS_ZP, ONE_GROUP)
        for m in tl.static_range(BM):
            row_ok = tl.full([BKW], m, tl.int32) < M
            t = tl.zeros([BN, BKW], tl.float32)
            xsum = tl.zeros([BKW], tl.float32)
            for j in tl.static_range(VALS):
                xj = tl.load(x_ptr + m * stride_xm + offs_kw * VALS + j, mask=kw_mask & row_ok, other=0).to(tl.float32)
                t += ((words >> (j * BITS)) & MASK).to(tl.float32) * xj[None, :]
                xsum += xj
            if PER_CHANNEL:
                part = tl.sum(t, 1) - (OFF + z_ch) * tl.sum(xsum, 0)
            elif ONE_GROUP:
                part = tl.sum(t, 1) * tl.reshape(s, [BN]) - tl.reshape((OFF + z) * s, [BN]) * tl.sum(xsum, 0)
            else:
                part = tl.sum(s * (t - (OFF + z) * xsum[None, :]), 1)
            acc = tl.where(offs_m[:, None] == m, acc + part[None, :], acc)
    _finish(acc, out_ptr, s_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, stride_sn, PER_CHANNEL, SPLIT_K)


@triton.jit
def _mma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, out_ptr, M, N, K, KW, G,
                stride_xm, stride_wn, stride_sn, stride_zn, stride_om,
                BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, PER_CHANNEL: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, IEEE: tl.constexpr):
    """K is visited in word order: the dot for value j of every word takes the inputs
    ``VALS*w + j`` of x, so the dequantized operand is never reshaped (a sum over K in any order)."""
    VALS: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // VALS
    OFF: tl.constexpr = 1 << (BITS - 1)
    MASK: tl.constexpr = (1 << BITS) - 1
    ONE_GROUP: tl.constexpr = (not PER_CHANNEL) and BK <= GROUP and GROUP % BK == 0
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    n_mask = offs_n < N
    m_mask = offs_m < M
    k_lo, k_hi = _k_range(K, pid_k, SPLIT_K, BK)
    acc = tl.zeros([BM, BN], tl.float32)
    if PER_CHANNEL:
        s = 1.0
        z = tl.load(z_ptr + offs_n * stride_zn, mask=n_mask, other=0).to(tl.float32)[:, None] if HAS_ZP else 0.0
    for k0 in range(k_lo, k_hi, BK):
        offs_kw, kw_mask, words = _load_words(w_ptr, offs_n, n_mask, k0, KW, stride_wn, VALS, BKW)
        if not PER_CHANNEL:
            s, z = _scale_zero(s_ptr, z_ptr, offs_n, n_mask, offs_kw, kw_mask, k0, stride_sn, stride_zn,
                               VALS, GROUP, HAS_ZP, ONE_GROUP)
        for j in tl.static_range(VALS):
            w = (((words >> (j * BITS)) & MASK).to(tl.float32) - OFF - z) * s  # [BN, BKW]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (offs_kw * VALS + j)[None, :],
                        mask=m_mask[:, None] & kw_mask[None, :], other=0)
            if IEEE:
                acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w).to(x.dtype))
    _finish(acc, out_ptr, s_ptr, offs_m, offs_n, m_mask, n_mask, stride_om, stride_sn, PER_CHANNEL, SPLIT_K)


_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def pick_config(M: int, N: int, K: int, group_size: int, device: torch.device, bits: int = 4) -> dict:
    """Tile sizes and split-K for a problem: a heuristic from the H100 sweep of
    benchmarks/gpu_kernels.py (batch 1: BN 64, BK 512; split K until the tiles cover the SMs)."""
    gemv = M <= 4
    bn = 64 if gemv or M <= 32 else 128
    bk = (512 if K >= 2048 else 256) if gemv else 16 * (32 // bits)  # MMA: >= 16 words per dot
    tiles = -(-N // bn) * (1 if gemv else -(-M // (16 if M <= 16 else 32 if M <= 32 else 64)))
    split = 1
    while tiles * split < 0.9 * _sm_count(device) and split < 4 and K // (bk * split * 2) >= 2:
        split *= 2
    return {"BN": bn, "BK": bk, "SPLIT_K": split, "num_warps": 4}


def quant_matmul(x: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 bits: int, group_size: int | None = None, bias: torch.Tensor | None = None,
                 config: dict | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) @ dequant(W [N, K]).T → [M, N] in x's dtype.

    ``group_size`` None or >= K: per-channel scales ``[N, 1]``."""
    assert bits in (4, 8) and w_packed.dtype == torch.int32 and x.dim() == 2
    M, K = x.shape
    N, KW = w_packed.shape
    vals = 32 // bits
    assert K % vals == 0 and KW == K // vals, f"packed width {KW} does not match {K} inputs at {bits} bits"
    per_channel = group_size is None or group_size >= K
    G = scale.shape[1]
    group = K if per_channel else group_size
    assert per_channel or (group % vals == 0 and G == -(-K // group)), "group size: a multiple of the values per word"
    x = x if x.stride(-1) == 1 else x.contiguous()
    cfg = {**pick_config(M, N, K, group, x.device, bits), **(config or {})}
    assert cfg["BK"] // vals >= (16 if M > 4 else 1), "BK too small for the MMA kernel"
    split = cfg["SPLIT_K"]
    out = torch.zeros((M, N), dtype=torch.float32, device=x.device) if split > 1 else \
        torch.empty((M, N), dtype=x.dtype, device=x.device)
    z = zero_point if zero_point is not None else scale
    common = dict(BITS=bits, GROUP=group, HAS_ZP=zero_point is not None, PER_CHANNEL=per_channel,
                  BN=cfg["BN"], BK=cfg["BK"], SPLIT_K=split, num_warps=cfg["num_warps"])
    args = (x, w_packed, scale, z, out, M, N, K, KW, G, x.stride(0), w_packed.stride(0), scale.stride(0),
            z.stride(0), out.stride(0))
    if M <= 4:
        _gemv_kernel[(triton.cdiv(N, cfg["BN"]), split)](*args, BM=triton.next_power_of_2(M), **common)
    else:
        ieee = x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16)
        bm = 16 if M <= 16 else 32 if M <= 32 or ieee else 64  # float32 tiles: keep shared memory small
        if ieee:
            common["BN"] = min(common["BN"], 64)
        _mma_kernel[(triton.cdiv(N, common["BN"]), triton.cdiv(M, bm), split)](*args, BM=bm, IEEE=ieee, num_stages=2,
                                                                                **common)
    out = out.to(x.dtype) if split > 1 else out
    return out if bias is None else out + bias


def reference_quant_matmul(x: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor,
                           zero_point: torch.Tensor | None, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Unpack with the project's own unpacker, dequantize in float32, matmul in float64."""
    from inferkit.quant.pack import unpack_int32

    K = w_packed.shape[1] * 32 // bits
    q = unpack_int32(w_packed.cpu(), bits, K, dim=1).double()
    group = K if group_size is None or group_size >= K else group_size
    idx = torch.arange(K) // group
    s = scale.cpu().double()[:, idx]
    z = zero_point.cpu().double()[:, idx] if zero_point is not None else 0
    w = (q - z) * s
    return (x.cpu().double() @ w.T).to(x.device)
