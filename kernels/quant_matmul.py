"""Dequantizing matmul (Triton): ``x @ dequant(W).T`` reading W in the artifact's packing.

W is stored as compressed-tensors ``pack-quantized`` words: int32 ``[N, K * bits / 32]``, value
``8w + j`` (4 bits; ``4w + j`` for 8 bits) at bit ``bits * j`` of word ``w``, offset by
``2**(bits-1)``. Scales ``[N, G]`` per output channel and group of ``group_size`` inputs
(``G = 1``: per channel); optional zero points ``[N, G]`` (unpacked, any dtype). Dequantized
``W[n, k] = (q - zero[n, g]) * scale[n, g]`` with ``g = k // group_size``.

The packed words are read once, coalesced along K, and taken apart in registers without ever
laying out an unpacked tile: value ``j`` of each word is masked out, made a float without an
int-to-float conversion (``_field``), and meets the inputs ``VALS * w + j`` (a sum over K may
visit K in any order). Nothing is written but the output (and split-K partials).

- ``gemv``: 1-4 rows (decode). Each program owns BN output channels; multiply-and-sum on the
  CUDA cores (a 16-row MMA tile would be mostly padding), each thread into its own accumulator
  (summed across threads once, at the end); zero points enter the field constants (or, in
  tiles spanning groups, come off through the sum of each word's inputs).
- ``mma``: more rows: the tile's values dequantized to the activation dtype and joined back
  into the inputs' order for one ``tl.dot`` per tile (``ONE_DOT``; or one dot per value position).
- ``swap`` (opt-in, ``KERNEL: swap``; INT4, bf16/fp16 inputs): the weights as the first operand
  of the tensor-core dot, dequantized two at a time into 16-bit floats (``_pair_values``), K
  reordered inside a tile to match (the inputs permuted alike); any row count, 1-16 rows
  filling one 16-wide tile.

Tiles come from ``pick_config``'s heuristic, or from a measured table for the GPU model
(``inferkit.kernels.tuned``); each shape's launch is planned once (``_plan``).

Both split K across programs when the output alone has too few tiles to fill the GPU: each
split writes a float32 partial, and the last split of a tile adds them in split order
(deterministic) and stores (``_finish``).
"""

from __future__ import annotations

import functools
import warnings

import torch
import triton
import triton.language as tl

from inferkit.kernels import FP_FUSION, pdl, tuned

INTERPRET = pdl.INTERPRET
PTX = pdl.PTX  # inline PTX (_field's lop3, the swap kernel's prmt): NVIDIA GPUs, compiled


@triton.jit
def _scale_zero(s_ptr, z_ptr, offs_n, n_mask, offs_kw, kw_mask, k0, stride_sn, stride_zn, KW,
                VALS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, ONE_GROUP: tl.constexpr,
                WORDS_PER_GROUP: tl.constexpr = 0):
    """Scale and zero point of every word of the tile: [BN, 1] and [BN] when the tile lies in one
    group (the scale loaded as a column, which keeps it in the tile's layout). Else per word
    [BN, BKW] (a word's VALS inputs always share a group): when groups hold whole runs of 4 words
    (``WORDS_PER_GROUP``; the GEMV gives each thread 16 bytes of words), loaded once per run and
    repeated in registers; otherwise gathered word by word."""
    BKW: tl.constexpr = offs_kw.shape[0]
    if ONE_GROUP:
        g = k0 // GROUP
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g, mask=n_mask[:, None], other=0).to(tl.float32)
        z = tl.load(z_ptr + offs_n * stride_zn + g, mask=n_mask, other=0).to(tl.float32) if HAS_ZP else 0.0
    elif WORDS_PER_GROUP > 0 and WORDS_PER_GROUP % 4 == 0 and BKW % 4 == 0:
        g = (k0 // VALS + tl.arange(0, BKW // 4) * 4) * VALS // GROUP
        m = n_mask[:, None] & (k0 // VALS + tl.arange(0, BKW // 4) * 4 < KW)[None, :]
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=m, other=0).to(tl.float32)
        s = tl.reshape(tl.broadcast_to(s[:, :, None], [s.shape[0], BKW // 4, 4]), [s.shape[0], BKW])
        if HAS_ZP:
            z = tl.load(z_ptr + offs_n[:, None] * stride_zn + g[None, :], mask=m, other=0).to(tl.float32)
            z = tl.reshape(tl.broadcast_to(z[:, :, None], [z.shape[0], BKW // 4, 4]), [z.shape[0], BKW])
        else:
            z = 0.0
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
def _load_words(w_ptr, offs_n, mask, k0, KW, stride_wn, VALS: tl.constexpr, BKW: tl.constexpr,
                EVEN_K: tl.constexpr = False):
    """The packed words [BN, BKW] holding inputs k0..k0+BKW*VALS, coalesced along K; ``mask`` [BN]
    (rows, or the whole tile). EVEN_K: no fill value, what is masked off is never used (the GEMV);
    else the words past K are zero."""
    offs_kw = k0 // VALS + tl.arange(0, BKW)
    kw_mask = offs_kw < KW
    ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_kw[None, :]
    if EVEN_K:
        words = tl.load(ptrs, mask=mask[:, None])
    else:
        words = tl.load(ptrs, mask=mask[:, None] & kw_mask[None, :], other=0)
    return offs_kw, kw_mask, words


@triton.jit
def _finish(acc, out_ptr, ws_ptr, cnt_ptr, s_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, M, N, stride_om, stride_sn,
            tile, pid_k, BM: tl.constexpr, BN: tl.constexpr, PER_CHANNEL: tl.constexpr, SPLIT_K: tl.constexpr,
            HAS_BIAS: tl.constexpr):
    """Store the tile. Split K: each split writes its float32 partial to the workspace and counts
    itself in on the tile's counter; the last one in adds the SPLIT_K partials in split order
    (deterministic: the same bits whichever split finishes last), stores, and resets the counter
    to zero for the next call. No zeroing or casting kernel around the matmul."""
    if PER_CHANNEL:
        acc = acc * tl.load(s_ptr + offs_n * stride_sn, mask=n_mask, other=0).to(tl.float32)[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        ws = ws_ptr + offs_m[:, None] * N + offs_n[None, :]
        tl.store(ws + pid_k * M * N, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the count (release)
        arrived = tl.atomic_add(cnt_ptr + tile, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            total = tl.zeros([BM, BN], tl.float32)
            for k in tl.static_range(SPLIT_K):
                total += tl.load(ws + k * M * N, mask=mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(b_ptr + offs_n, mask=n_mask, other=0).to(tl.float32)[None, :]
            tl.store(ptrs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(cnt_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _field(src, j: tl.constexpr, BITS: tl.constexpr, HALF: tl.constexpr, MASK: tl.constexpr, c,
           LOP3: tl.constexpr = False):
    """Value ``j`` of each word as the float ``v - off``, without an int-to-float conversion
    (a quarter-rate instruction). The field's bits with the exponent bits of 2**23
    (``0x4B000000``) set are the float 2**23 + v * 2**sh (``sh = BITS * (j % HALF)``, the field's
    position); one multiply-add by ``2**-sh`` and ``c = -(2**(23 - sh) + off)``
    (``_negated_offsets``) leaves ``v - off``, exactly while ``off`` is an integer. ``src`` is
    the word (for the upper half of the values, the word shifted down 16 bits), as
    ``_exponent_words`` gives it. LOP3: ``(src & mask) | exponent`` is one PTX ``lop3`` per
    value on the raw word (ptxas does not fuse the two itself). Otherwise ``src`` comes already
    ORed with the exponent bits, and one AND per value with the mask plus those bits does it
    (the interpreter, which runs no PTX)."""
    if LOP3:
        bits = tl.inline_asm_elementwise("lop3.b32 $0, $1, $2, $3, 0xEA;", "=r,r,n,n",  # (a & b) | c
                                         [src, MASK << (BITS * (j % HALF)), 0x4B000000], dtype=tl.int32,
                                         is_pure=True, pack=1)
    else:
        bits = src & ((MASK << (BITS * (j % HALF))) | 0x4B000000)
    bits = bits.to(tl.float32, bitcast=True)
    if j % HALF == 0:
        return bits + c
    return tl.fma(bits, 1.0 / (1 << (BITS * (j % HALF))), c)


@triton.jit
def _negated_offsets(off, BITS: tl.constexpr):
    """``-(2**(23 - sh) + off)`` for each field position ``sh`` of a half word (see _field).
    ``off``: the code offset 2**(BITS-1) (a constant), or it plus the zero points (a tensor;
    integers, as compressed-tensors stores them, so every sum is exact)."""
    if BITS == 4:
        return -(8388608.0 + off), -(524288.0 + off), -(32768.0 + off), -(2048.0 + off)
    else:
        return -(8388608.0 + off), -(32768.0 + off)


@triton.jit
def _per_row(cs, BITS: tl.constexpr):
    """[BN] offsets as [BN, 1] columns."""
    if BITS == 4:
        return cs[0][:, None], cs[1][:, None], cs[2][:, None], cs[3][:, None]
    else:
        return cs[0][:, None], cs[1][:, None]


@triton.jit
def _exponent_words(words, LOP3: tl.constexpr = False):
    """The words and their upper halves shifted down, as _field takes them: as they are (LOP3) or
    ORed with the exponent bits of 2**23."""
    if LOP3:
        return words, words >> 16
    return words | 0x4B000000, (words >> 16) | 0x4B000000


@triton.jit
def _columns(xv, VALS: tl.constexpr):
    """The VALS (2, 4 or 8) columns of [R, VALS] as a tuple of [R] vectors (register splits, no
    shuffles)."""
    if VALS == 8:
        a, b = tl.split(tl.reshape(xv, [xv.shape[0], 4, 2]))  # even / odd columns
        a0, a1 = tl.split(tl.reshape(a, [xv.shape[0], 2, 2]))  # 0, 4 / 2, 6
        b0, b1 = tl.split(tl.reshape(b, [xv.shape[0], 2, 2]))  # 1, 5 / 3, 7
        c0, c4 = tl.split(a0)
        c2, c6 = tl.split(a1)
        c1, c5 = tl.split(b0)
        c3, c7 = tl.split(b1)
        return c0, c1, c2, c3, c4, c5, c6, c7
    elif VALS == 4:
        a, b = tl.split(tl.reshape(xv, [xv.shape[0], 2, 2]))  # 0, 2 / 1, 3
        c0, c2 = tl.split(a)
        c1, c3 = tl.split(b)
        return c0, c1, c2, c3
    else:
        c0, c1 = tl.split(xv)
        return c0, c1


@triton.jit
def _bf16_pair(p):
    """The two bf16 of an int32 word as float32: a bf16 is the upper half of its float32, so each
    is one shift or one AND (a bf16 load and convert takes two for the upper one)."""
    return (p << 16).to(tl.float32, bitcast=True), (p & -65536).to(tl.float32, bitcast=True)


@triton.jit
def _dequant(src, j: tl.constexpr, z, s, BITS: tl.constexpr, MASK: tl.constexpr, OFF: tl.constexpr,
             IEEE: tl.constexpr, dtype: tl.constexpr, LOP3: tl.constexpr):
    """Value ``j`` of each word dequantized, in float32 (IEEE) or the activations' dtype."""
    w = (_field(src, j, BITS, 16 // BITS, MASK, _negated_offsets(OFF, BITS)[j % (16 // BITS)], LOP3) - z) * s
    return w if IEEE else w.to(dtype)


@triton.jit
def _dequant_tile(lo, hi, z, s, BITS: tl.constexpr, MASK: tl.constexpr, OFF: tl.constexpr, IEEE: tl.constexpr,
                  dtype: tl.constexpr, LOP3: tl.constexpr):
    """The words' values dequantized as one [R, C * VALS] tile whose column ``VALS * c + j`` is
    value j of word c: the inputs' own order, so one dot per tile (register joins, the inverse
    of _columns)."""
    if BITS == 4:
        a = tl.join(tl.join(_dequant(lo, 0, z, s, BITS, MASK, OFF, IEEE, dtype, LOP3),
                            _dequant(hi, 4, z, s, BITS, MASK, OFF, IEEE, dtype, LOP3)),
                    tl.join(_dequant(lo, 2, z, s, BITS, MASK, OFF, IEEE, dtype, LOP3),
                            _dequant(hi, 6, z, s, BITS, MASK, OFF, IEEE, dtype, LOP3)))  # [R, C, 2, 2]: j = 4 d1 + 2 d2
        b = tl.join(tl.join(_dequant(lo, 1, z, s, BITS, MASK, OFF, IEEE, dtype, LOP3),
                            _dequant(hi, 5, z, s, BITS, MASK, OFF, IEEE, dtype, LOP3)),
                    tl.join(_dequant(lo, 3, z, s, BITS, MASK, OFF, IEEE, dtype, LOP3),
                            _dequant(hi, 7, z, s, BITS, MASK, OFF, IEEE, dtype, LOP3)))
        t = tl.join(a, b)  # [R, C, 2, 2, 2]: j = 4 d1 + 2 d2 + d3
        return tl.reshape(t, [t.shape[0], t.shape[1] * 8])
    else:
        t = tl.join(tl.join(_dequant(lo, 0, z, s, BITS, MASK, OFF, IEEE, dtype, LOP3),
                            _dequant(hi, 2, z, s, BITS, MASK, OFF, IEEE, dtype, LOP3)),
                    tl.join(_dequant(lo, 1, z, s, BITS, MASK, OFF, IEEE, dtype, LOP3),
                            _dequant(hi, 3, z, s, BITS, MASK, OFF, IEEE, dtype, LOP3)))  # j = 2 d1 + d2
        return tl.reshape(t, [t.shape[0], t.shape[1] * 4])


@triton.jit
def _load_inputs(ptrs, mask, EVEN_K: tl.constexpr):
    """Inputs, masked (past K: zero) unless K is a multiple of the tile (EVEN_K)."""
    if EVEN_K:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=mask, other=0)


@triton.jit
def _strided_columns(x_row, mask, VALS: tl.constexpr, EVEN_K: tl.constexpr):
    """Inputs ``VALS * w + j`` for each value position j, one strided load each, in float32."""
    c0 = _load_inputs(x_row, mask, EVEN_K).to(tl.float32)
    c1 = _load_inputs(x_row + 1, mask, EVEN_K).to(tl.float32)
    c2 = _load_inputs(x_row + 2, mask, EVEN_K).to(tl.float32)
    c3 = _load_inputs(x_row + 3, mask, EVEN_K).to(tl.float32)
    if VALS == 8:
        c4 = _load_inputs(x_row + 4, mask, EVEN_K).to(tl.float32)
        c5 = _load_inputs(x_row + 5, mask, EVEN_K).to(tl.float32)
        c6 = _load_inputs(x_row + 6, mask, EVEN_K).to(tl.float32)
        c7 = _load_inputs(x_row + 7, mask, EVEN_K).to(tl.float32)
        return c0, c1, c2, c3, c4, c5, c6, c7
    else:
        return c0, c1, c2, c3


@triton.jit
def _sum_columns(xs, VALS: tl.constexpr):
    if VALS == 8:
        return ((xs[0] + xs[1]) + (xs[2] + xs[3])) + ((xs[4] + xs[5]) + (xs[6] + xs[7]))
    else:
        return (xs[0] + xs[1]) + (xs[2] + xs[3])


@triton.jit
def _x_columns(x_row, offs_kw, kw_mask, VALS: tl.constexpr, EVEN_K: tl.constexpr, VEC_X: tl.constexpr):
    """The inputs ``VALS * w + j`` of the tile's words, one [BKW] float32 vector per value position
    j. VEC_X: 16-byte loads split into value positions in registers (bf16 read as int32 pairs, see
    _bf16_pair); else one strided load per position."""
    if not VEC_X:
        return _strided_columns(x_row + offs_kw * VALS, kw_mask, VALS, EVEN_K)
    elif x_row.dtype.element_ty == tl.bfloat16:
        PAIRS: tl.constexpr = VALS // 2
        xp = _load_inputs(x_row.to(tl.pointer_type(tl.int32)) + offs_kw[:, None] * PAIRS + tl.arange(0, PAIRS)[None, :],
                          kw_mask[:, None], EVEN_K)
        if VALS == 8:
            p0, p1, p2, p3 = _columns(xp, 4)
            c0, c1 = _bf16_pair(p0)
            c2, c3 = _bf16_pair(p1)
            c4, c5 = _bf16_pair(p2)
            c6, c7 = _bf16_pair(p3)
            return c0, c1, c2, c3, c4, c5, c6, c7
        else:
            p0, p1 = _columns(xp, 2)
            c0, c1 = _bf16_pair(p0)
            c2, c3 = _bf16_pair(p1)
            return c0, c1, c2, c3
    else:
        xv = _load_inputs(x_row + offs_kw[:, None] * VALS + tl.arange(0, VALS)[None, :], kw_mask[:, None], EVEN_K)
        return _columns(xv.to(tl.float32), VALS)


@triton.jit
def _row_update(acc, lo, hi, x_row, offs_kw, kw_mask, s, z, cs, BITS: tl.constexpr, PER_CHANNEL: tl.constexpr,
                ZP_SUM: tl.constexpr, EVEN_K: tl.constexpr, VEC_X: tl.constexpr, LOP3: tl.constexpr):
    """One activation row against the tile's words: value j of every word meets input
    ``VALS * w + j`` (one LOP3 and one multiply-add make it the float ``q - off``, ``_field``; one
    FMA uses it), and the [BN, BKW] products go into the row's accumulator of the same shape,
    each thread its own: no reduction across threads and no barrier until the end. ``cs``: the
    field constants (``_negated_offsets``), with the zero points where they are one per row;
    ZP_SUM (zero points per word, tiles spanning groups): ``z`` times the sum of each word's
    inputs comes off instead (fewer registers than four constants per word). Per channel
    the FMA chain runs on in the accumulator (the scales come at the end); with groups the tile's
    products are scaled in."""
    VALS: tl.constexpr = 32 // BITS
    HALF: tl.constexpr = VALS // 2
    MASK: tl.constexpr = (1 << BITS) - 1
    xs = _x_columns(x_row, offs_kw, kw_mask, VALS, EVEN_K, VEC_X)
    if PER_CHANNEL:
        t = tl.fma(_field(lo, 0, BITS, HALF, MASK, cs[0], LOP3), xs[0][None, :], acc)
    else:
        t = _field(lo, 0, BITS, HALF, MASK, cs[0], LOP3) * xs[0][None, :]
    for j in tl.static_range(1, VALS):
        t = tl.fma(_field(lo if j < HALF else hi, j, BITS, HALF, MASK, cs[j % HALF], LOP3), xs[j][None, :], t)
    if PER_CHANNEL:
        return t
    elif ZP_SUM:
        return tl.fma(t - z * _sum_columns(xs, VALS)[None, :], s, acc)
    else:
        return tl.fma(t, s, acc)


@triton.jit
def _gemv_tile(acc0, acc1, acc2, acc3, words, offs_kw, kw_mask, k0, x_ptr, s_ptr, z_ptr, offs_n, n_mask, M, KW,
               stride_xm, stride_sn, stride_zn, cs_off, cs_ch, BITS: tl.constexpr, GROUP: tl.constexpr,
               HAS_ZP: tl.constexpr, PER_CHANNEL: tl.constexpr, BM: tl.constexpr, BKW: tl.constexpr,
               VEC_X: tl.constexpr, EVEN_K: tl.constexpr, LOP3: tl.constexpr, X_STEP: tl.constexpr):
    """One K tile of the GEMV: the tile's scales (and zero points), then each activation row's
    update (``_row_update``) from the tile's words."""
    VALS: tl.constexpr = 32 // BITS
    OFF: tl.constexpr = 1 << (BITS - 1)
    ONE_GROUP: tl.constexpr = (not PER_CHANNEL) and BKW * VALS <= GROUP and GROUP % (BKW * VALS) == 0
    ZP_SUM: tl.constexpr = HAS_ZP and not PER_CHANNEL and not ONE_GROUP
    if PER_CHANNEL:  # scales at the end
        s = 1.0
        z = 0.0
        cs = cs_ch
    else:
        # One group per tile and no zero points: the scale as a [BN, 1] column. Else scales and
        # zero points per word, loaded once per thread's 4 words (_scale_zero): the zero points'
        # constants are then worked out once per row and group too (the 4 copies are one value).
        # Loaded as [BN] rows instead, they took a layout change per constant in 4-warp tiles.
        s, z = _scale_zero(s_ptr, z_ptr, offs_n, n_mask, offs_kw, kw_mask, k0, stride_sn, stride_zn, KW,
                           VALS, GROUP, HAS_ZP, ONE_GROUP and not HAS_ZP, GROUP // VALS)
        cs = _negated_offsets(z + OFF, BITS) if HAS_ZP and not ZP_SUM else cs_off
    lo, hi = _exponent_words(words, LOP3)
    if X_STEP:
        x_tile, x_kw = x_ptr + k0, tl.arange(0, BKW)
    else:
        x_tile, x_kw = x_ptr, offs_kw
    acc0 = _row_update(acc0, lo, hi, x_tile, x_kw, kw_mask, s, z, cs, BITS, PER_CHANNEL, ZP_SUM, EVEN_K, VEC_X,
                       LOP3)
    if BM > 1:
        acc1 = _row_update(acc1, lo, hi, x_tile + stride_xm, x_kw, kw_mask, s, z, cs, BITS, PER_CHANNEL, ZP_SUM,
                           EVEN_K, VEC_X, LOP3)
    if BM > 2:
        acc2 = _row_update(acc2, lo, hi, x_tile + 2 * stride_xm, x_kw, kw_mask, s, z, cs, BITS, PER_CHANNEL,
                           ZP_SUM, EVEN_K, VEC_X, LOP3)
        acc3 = _row_update(acc3, lo, hi, x_tile + tl.minimum(3, M - 1) * stride_xm, x_kw, kw_mask, s, z, cs,
                           BITS, PER_CHANNEL, ZP_SUM, EVEN_K, VEC_X, LOP3)
    return acc0, acc1, acc2, acc3


@triton.jit
def _words_before(w_ptr, offs_n, n_mask, k0, k_hi, KW, stride_wn, VALS: tl.constexpr, BKW: tl.constexpr,
                  EVEN_K: tl.constexpr):
    """``_load_words`` of the tile at k0, loading nothing when it starts at or past ``k_hi`` (a
    prefetch past the split's last tile)."""
    return _load_words(w_ptr, offs_n, n_mask & (offs_n * 0 + k0 < k_hi), k0, KW, stride_wn, VALS, BKW, EVEN_K)


@triton.jit
def _gemv_prefetching(acc0, acc1, acc2, acc3, k_lo, k_hi, w_ptr, x_ptr, s_ptr, z_ptr, offs_n, n_mask, M, KW, stride_xm,
                      stride_wn, stride_sn, stride_zn, cs_off, cs_ch, BITS: tl.constexpr, GROUP: tl.constexpr,
                      HAS_ZP: tl.constexpr, PER_CHANNEL: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr,
                      VEC_X: tl.constexpr, EVEN_K: tl.constexpr, LOP3: tl.constexpr, X_STEP: tl.constexpr,
                      PREFETCH: tl.constexpr, PDL: tl.constexpr):
    """The GEMV's K loop with the words of the tile PREFETCH (1-3) ahead loaded into registers
    before this one is used, under a predicate and with no fill value (rows past N and the
    prefetches past a split's last tile load nothing and are never stored). PDL: the first
    PREFETCH tiles' words are loaded before the wait for the kernel before."""
    VALS: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // VALS
    offs_kw, kw_mask, words = _words_before(w_ptr, offs_n, n_mask, k_lo, k_hi, KW, stride_wn, VALS, BKW, EVEN_K)
    kw1, m1, w1 = offs_kw, kw_mask, words  # the tiles 1 and 2 ahead (PREFETCH 2, 3)
    kw2, m2, w2 = offs_kw, kw_mask, words
    if PREFETCH >= 2:
        kw1, m1, w1 = _words_before(w_ptr, offs_n, n_mask, k_lo + BK, k_hi, KW, stride_wn, VALS, BKW, EVEN_K)
    if PREFETCH >= 3:
        kw2, m2, w2 = _words_before(w_ptr, offs_n, n_mask, k_lo + 2 * BK, k_hi, KW, stride_wn, VALS, BKW, EVEN_K)
    pdl.wait(PDL)
    for k0 in range(k_lo, k_hi, BK):
        nxt_kw, nxt_mask, nxt = _words_before(w_ptr, offs_n, n_mask, k0 + PREFETCH * BK, k_hi, KW, stride_wn, VALS,
                                              BKW, EVEN_K)
        acc0, acc1, acc2, acc3 = _gemv_tile(acc0, acc1, acc2, acc3, words, offs_kw, kw_mask, k0, x_ptr, s_ptr, z_ptr,
                                            offs_n, n_mask, M, KW, stride_xm, stride_sn, stride_zn, cs_off, cs_ch,
                                            BITS, GROUP, HAS_ZP, PER_CHANNEL, BM, BKW, VEC_X, EVEN_K, LOP3, X_STEP)
        if PREFETCH == 1:
            offs_kw, kw_mask, words = nxt_kw, nxt_mask, nxt
        elif PREFETCH == 2:
            offs_kw, kw_mask, words = kw1, m1, w1
            kw1, m1, w1 = nxt_kw, nxt_mask, nxt
        else:
            offs_kw, kw_mask, words = kw1, m1, w1
            kw1, m1, w1 = kw2, m2, w2
            kw2, m2, w2 = nxt_kw, nxt_mask, nxt
    return acc0, acc1, acc2, acc3


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, KW, G,
                 stride_xm, stride_wn, stride_sn, stride_zn, stride_om,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, VEC_X: tl.constexpr,
                 EVEN_K: tl.constexpr, LOP3: tl.constexpr = False, X_STEP: tl.constexpr = False,
                 PREFETCH: tl.constexpr = 1, STAGES: tl.constexpr = 0, PDL: tl.constexpr = False):
    """Works on the packed words in place (``_row_update``), for 1-4 activation rows (BM; rows past
    M repeat row M - 1 and are not stored), one K tile at a time (``_gemv_tile``). The loop either
    loads the words of the tile PREFETCH (1-3) ahead into registers (``_gemv_prefetching``), or,
    STAGES > 0, is Triton's pipelined loop: words, inputs and scales copied asynchronously
    (``cp.async``) into shared memory STAGES - 1 tiles ahead, without registers to hold them.
    In the compiled register loop ptxas issues the 1-ahead prefetch at the end of the iteration
    (its registers are the used tile's: ``python -m inferkit.kernels.sass``), so it overlaps the
    load with little of the work; 2 ahead overlaps at least one iteration's. EVEN_K (K a multiple
    of BK): the inputs load without masks. X_STEP: the inputs are addressed from a pointer that
    steps with the tile and offsets that do not change, which ptxas turns into one address and
    immediate offsets for a thread's input loads (without it, each load's address is worked out
    anew every tile); see ``gemv_input_step`` for where. PDL (``inferkit.kernels.pdl``): the
    kernel signals at once; the register loop loads its first tiles' words before waiting for the
    kernel before (nothing else is read before the wait, and nothing written); the pipelined loop
    waits first."""
    VALS: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // VALS
    OFF: tl.constexpr = 1 << (BITS - 1)
    pdl.signal(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    n_mask = offs_n < N
    offs_m = tl.arange(0, BM)
    m_mask = offs_m < M
    k_lo, k_hi = _k_range(K, pid_k, SPLIT_K, BK)
    acc0 = tl.zeros([BN, BKW], tl.float32)
    acc1 = acc0
    acc2 = acc0
    acc3 = acc0
    cs_off = _negated_offsets(OFF, BITS)  # the field constants without zero points in them
    cs_ch = cs_off
    if PER_CHANNEL and HAS_ZP:
        cs_ch = _per_row(_negated_offsets(tl.load(z_ptr + offs_n * stride_zn, mask=n_mask, other=0).to(tl.float32) + OFF,
                                          BITS), BITS)
    if STAGES > 0:  # Triton's pipeliner: cp.async into shared memory, STAGES - 1 tiles ahead
        pdl.wait(PDL)
        for k0 in tl.range(k_lo, k_hi, BK, num_stages=STAGES):
            offs_kw, kw_mask, words = _load_words(w_ptr, offs_n, n_mask, k0, KW, stride_wn, VALS, BKW, EVEN_K)
            acc0, acc1, acc2, acc3 = _gemv_tile(acc0, acc1, acc2, acc3, words, offs_kw, kw_mask, k0, x_ptr, s_ptr,
                                                z_ptr, offs_n, n_mask, M, KW, stride_xm, stride_sn, stride_zn, cs_off,
                                                cs_ch, BITS, GROUP, HAS_ZP, PER_CHANNEL, BM, BKW, VEC_X, EVEN_K, LOP3,
                                                X_STEP)
    else:
        acc0, acc1, acc2, acc3 = _gemv_prefetching(acc0, acc1, acc2, acc3, k_lo, k_hi, w_ptr, x_ptr, s_ptr, z_ptr,
                                                   offs_n, n_mask, M, KW, stride_xm, stride_wn, stride_sn, stride_zn,
                                                   cs_off, cs_ch, BITS, GROUP, HAS_ZP, PER_CHANNEL, BM, BK, VEC_X,
                                                   EVEN_K, LOP3, X_STEP, PREFETCH, PDL)
    acc = tl.where(offs_m[:, None] == 0, tl.sum(acc0, 1)[None, :], 0.0)
    if BM > 1:
        acc = tl.where(offs_m[:, None] == 1, tl.sum(acc1, 1)[None, :], acc)
    if BM > 2:
        acc = tl.where(offs_m[:, None] == 2, tl.sum(acc2, 1)[None, :], acc)
        acc = tl.where(offs_m[:, None] == 3, tl.sum(acc3, 1)[None, :], acc)
    _finish(acc, out_ptr, ws_ptr, cnt_ptr, s_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, M, N, stride_om, stride_sn,
            pid_n, pid_k, BM, BN, PER_CHANNEL, SPLIT_K, HAS_BIAS)


@triton.jit
def _tile(M, N, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr):
    """The program's tile of a (N tiles, M tiles, splits) grid: its ids, output columns and rows
    with their masks, and its split's inputs [k_lo, k_hi)."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_m = pid_m * BM + tl.arange(0, BM)
    k_lo, k_hi = _k_range(K, pid_k, SPLIT_K, BK)
    return pid_n, pid_m, pid_k, offs_n, offs_m, offs_n < N, offs_m < M, k_lo, k_hi


@triton.jit(do_not_specialize=["M"])  # mixed prefill/decode steps bring any row count: one compile, not three
def _mma_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, KW, G,
                stride_xm, stride_wn, stride_sn, stride_zn, stride_om,
                BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr, IEEE: tl.constexpr,
                ONE_DOT: tl.constexpr, LOP3: tl.constexpr = False, PDL: tl.constexpr = False):
    """Dequantize a [BN, BK] tile in registers and multiply on the tensor cores. ONE_DOT: the
    values are joined back into the inputs' order for a single dot per tile (2 barriers per tile
    in the compiled loop, inputs loaded asynchronously); otherwise one dot per value position
    over the inputs ``VALS*w + j`` (a sum over K in any order; 16 barriers per tile). The loop is
    Triton's pipelined one with the launch's ``num_stages`` (a config's ``STAGES``, default 2):
    at 2 stages the compiled loop waits for every copy before a tile's work (``DEPBAR.LE SB0,
    0``), so no load overlaps it; at 3 and 4, 1 and 2 tiles stay in flight. PDL: the kernel
    signals at once, and the loop waits for the kernel before (``inferkit.kernels.pdl``)."""
    VALS: tl.constexpr = 32 // BITS
    BKW: tl.constexpr = BK // VALS
    OFF: tl.constexpr = 1 << (BITS - 1)
    MASK: tl.constexpr = (1 << BITS) - 1
    ONE_GROUP: tl.constexpr = (not PER_CHANNEL) and BK <= GROUP and GROUP % BK == 0
    pdl.signal(PDL)
    pid_n, pid_m, pid_k, offs_n, offs_m, n_mask, m_mask, k_lo, k_hi = _tile(M, N, K, BM, BN, BK, SPLIT_K)
    acc = tl.zeros([BM, BN], tl.float32)
    if PER_CHANNEL:
        s = 1.0
        z = tl.load(z_ptr + offs_n * stride_zn, mask=n_mask, other=0).to(tl.float32)[:, None] if HAS_ZP else 0.0
    pdl.wait(PDL)
    for k0 in range(k_lo, k_hi, BK):
        offs_kw, kw_mask, words = _load_words(w_ptr, offs_n, n_mask, k0, KW, stride_wn, VALS, BKW)
        if not PER_CHANNEL:
            s, z = _scale_zero(s_ptr, z_ptr, offs_n, n_mask, offs_kw, kw_mask, k0, stride_sn, stride_zn, KW,
                               VALS, GROUP, HAS_ZP, ONE_GROUP, GROUP // VALS)
            if ONE_GROUP and HAS_ZP:
                z = z[:, None]
        lo, hi = _exponent_words(words, LOP3)
        if ONE_DOT:  # one [BN, BK] tile in the inputs' order, one dot (one layout change)
            w = _dequant_tile(lo, hi, z, s, BITS, MASK, OFF, IEEE, x_ptr.dtype.element_ty, LOP3)
            offs_k = k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=m_mask[:, None] & (offs_k < K)[None, :], other=0)
            if IEEE:
                acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w))
        else:  # one dot per value position over the inputs VALS*w + j (fewer instructions, more barriers)
            for j in tl.static_range(VALS):
                w = _dequant(lo if j < VALS // 2 else hi, j, z, s, BITS, MASK, OFF, IEEE, x_ptr.dtype.element_ty, LOP3)
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (offs_kw * VALS + j)[None, :],
                            mask=m_mask[:, None] & kw_mask[None, :], other=0)
                if IEEE:
                    acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
                else:
                    acc += tl.dot(x, tl.trans(w))
    _finish(acc, out_ptr, ws_ptr, cnt_ptr, s_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, M, N, stride_om, stride_sn,
            pid_m * tl.num_programs(0) + pid_n, pid_k, BM, BN, PER_CHANNEL, SPLIT_K, HAS_BIAS)


@triton.jit
def _word_pairs(words, ASM: tl.constexpr):
    """[R, 2C] words as two [R, C] words of nibble pairs: of each two neighbouring words (a, b),
    values 0-3 of a in the low half and values 0-3 of b in the high half (the first), values 4-7
    likewise (the second). Value j of a word and of its neighbour then sit 16 bits apart, where
    one lop3 makes them two 16-bit floats (``_pair_values``). ASM: one PTX ``prmt`` each (the
    bytes 1-0 of a and b, and 3-2)."""
    a, b = tl.split(tl.reshape(words, [words.shape[0], words.shape[1] // 2, 2]))
    if ASM:
        lo = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x5410;", "=r,r,r", [a, b], dtype=tl.int32,
                                       is_pure=True, pack=1)
        hi = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, 0x7632;", "=r,r,r", [a, b], dtype=tl.int32,
                                       is_pure=True, pack=1)
        return lo, hi
    return (a & 0xFFFF) | (b << 16), ((a >> 16) & 0xFFFF) | (b & -65536)


@triton.jit
def _pair_values(r0, r1, j: tl.constexpr, addend, F16: tl.constexpr, ASM: tl.constexpr):
    """Value j of each word pair (``_word_pairs``: r0 holds values 0-3, r1 values 4-7), the
    nibbles at bits sh and 16 + sh of a word (sh = 4 (j % 4)). ASM: as two 16-bit floats ``u - off`` in
    one int32: one lop3 puts each nibble u in the low mantissa bits of ``MAGIC`` (128 in bf16,
    1024 in fp16, whose unit in the last place is 1), which makes the float ``MAGIC + u``; one
    packed multiply-add with 1.0 and ``addend`` (the pair ``-(MAGIC + off)``) leaves ``u - off``,
    exactly (ptxas makes it an HADD2). Otherwise the two nibbles as int32 halves
    (``_pair_floats`` subtracts)."""
    src = r0 if j < 4 else r1
    if j % 4:
        src = src >> 4 * (j % 4)
    if ASM:
        if F16:
            return tl.inline_asm_elementwise(
                "{ .reg .b32 t, one; lop3.b32 t, $1, 983055, 1677747200, 0xEA; mov.b32 one, 1006648320;"
                " fma.rn.f16x2 $0, t, one, $2; }", "=r,r,r", [src, addend], dtype=tl.int32, is_pure=True, pack=1)
        return tl.inline_asm_elementwise(
            "{ .reg .b32 t, one; lop3.b32 t, $1, 983055, 1124090624, 0xEA; mov.b32 one, 1065369472;"
            " fma.rn.bf16x2 $0, t, one, $2; }", "=r,r,r", [src, addend], dtype=tl.int32, is_pure=True, pack=1)
    return src & 0x000F000F


@triton.jit
def _pair_floats(t, off, dtype: tl.constexpr, ASM: tl.constexpr):
    """[R, C] words of two values (``_pair_values``) as [R, 2C] values of ``dtype``, the low half
    of each word first: a reinterpretation (ASM), or ``u - off`` worked out in float32."""
    if ASM:
        lo = (t & 0xFFFF).to(tl.int16).to(dtype, bitcast=True)
        hi = (t >> 16).to(tl.int16).to(dtype, bitcast=True)
    else:
        lo = ((t & 0xFFFF).to(tl.float32) - off).to(dtype)
        hi = ((t >> 16).to(tl.float32) - off).to(dtype)
    return tl.reshape(tl.join(lo, hi), [t.shape[0], t.shape[1] * 2])


@triton.jit
def _position(r0, r1, j: tl.constexpr, addend, off, dtype: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr):
    """Value j of each of the tile's words, dequantized but for the scale: [R, words]."""
    return _pair_floats(_pair_values(r0, r1, j, addend, F16, ASM), off, dtype, ASM)


@triton.jit
def _pair_major(r0, r1, addend, off, dtype: tl.constexpr, F16: tl.constexpr, ASM: tl.constexpr):
    """The tile's [R, C/2] word pairs (``_word_pairs``) as one [R, 8C] tile of values, dequantized
    but for the scale, pair-major: column ``16 c + 2 j + e`` is value j of word ``2 c + e``, so
    that each thread's values of a word pair lie side by side (wide stores on their way to the
    tensor cores)."""
    v0, v1 = _pair_values(r0, r1, 0, addend, F16, ASM), _pair_values(r0, r1, 1, addend, F16, ASM)
    v2, v3 = _pair_values(r0, r1, 2, addend, F16, ASM), _pair_values(r0, r1, 3, addend, F16, ASM)
    v4, v5 = _pair_values(r0, r1, 4, addend, F16, ASM), _pair_values(r0, r1, 5, addend, F16, ASM)
    v6, v7 = _pair_values(r0, r1, 6, addend, F16, ASM), _pair_values(r0, r1, 7, addend, F16, ASM)
    t = tl.join(tl.join(tl.join(v0, v1), tl.join(v2, v3)), tl.join(tl.join(v4, v5), tl.join(v6, v7)))
    t = tl.permute(t, (0, 1, 4, 3, 2))  # [R, C/2, 2, 2, 2]: j = 4 d2 + 2 d3 + d4
    return _pair_floats(tl.reshape(t, [t.shape[0], t.shape[1] * 8]), off, dtype, ASM)


@triton.jit
def _swap_dot(w, x, acc, ASM: tl.constexpr):
    """``acc + w @ x`` on the tensor cores in the inputs' dtype (ASM), else in float32, exactly."""
    if ASM:
        out = tl.dot(w, x, acc)
    else:
        out = tl.dot(w, x.to(tl.float32), acc, input_precision="ieee")
    return out


@triton.jit
def _swap_tile(acc, words, offs_kw, kw_mask, k0, off, x_ptr, s_ptr, z_ptr, offs_n, n_mask, offs_m, m_mask, K, KW,
               stride_xm, stride_sn, stride_zn, GROUP: tl.constexpr, HAS_ZP: tl.constexpr,
               PER_CHANNEL: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr, ONE_DOT: tl.constexpr,
               EVEN_K: tl.constexpr, ASM: tl.constexpr):
    """One K tile of the swap kernel: its words [BN, BK / 8] made 16-bit floats against the inputs
    k0..k0+BK, the float32 product scaled into ``acc`` [BN, BM]. ``off`` [BN, 1]: the code offset
    (plus per-channel zero points)."""
    BKW: tl.constexpr = BK // 8
    BN: tl.constexpr = words.shape[0]
    F16: tl.constexpr = x_ptr.dtype.element_ty == tl.float16
    BASE: tl.constexpr = 1024.0 if F16 else 128.0  # the float whose low mantissa bits take a nibble
    dt: tl.constexpr = x_ptr.dtype.element_ty if ASM else tl.float32
    if not PER_CHANNEL:  # the tile lies in one group: s [BN, 1], z [BN]
        s, z = _scale_zero(s_ptr, z_ptr, offs_n, n_mask, offs_kw, kw_mask, k0, stride_sn, stride_zn, KW, 8,
                           GROUP, HAS_ZP, True)
        if HAS_ZP:
            off = 8.0 + z[:, None]
    c = (-(BASE + off)).to(x_ptr.dtype.element_ty).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    addend = c | (c << 16)
    r0, r1 = _word_pairs(words, ASM)
    if ONE_DOT:
        w = _pair_major(r0, r1, addend, off, dt, F16, ASM)
        xk = k0 + tl.arange(0, BK)
        x_mask = m_mask[:, None] if EVEN_K else m_mask[:, None] & (xk < K)[None, :]
        xn = tl.load(x_ptr + offs_m[:, None] * stride_xm + xk[None, :], mask=x_mask, other=0)
        # row 16 c + 2 j + e: input 8 (2 c + e) + j
        x = tl.reshape(tl.permute(tl.reshape(xn, [BM, BKW // 2, 2, 8]), (1, 3, 2, 0)), [BK, BM])
        part = _swap_dot(w, x, tl.zeros([BN, BM], tl.float32), ASM)
    else:
        part = tl.zeros([BN, BM], tl.float32)
        for j in tl.static_range(8):
            xk = offs_kw * 8 + j
            x_mask = m_mask[None, :] if EVEN_K else m_mask[None, :] & (xk < K)[:, None]
            x = tl.load(x_ptr + offs_m[None, :] * stride_xm + xk[:, None], mask=x_mask, other=0)
            part = _swap_dot(_position(r0, r1, j, addend, off, dt, F16, ASM), x, part, ASM)
    if PER_CHANNEL:
        return acc + part
    else:
        return acc + part * s


@triton.jit
def _swap_kernel(x_ptr, w_ptr, s_ptr, z_ptr, b_ptr, out_ptr, ws_ptr, cnt_ptr, M, N, K, KW, G,
                 stride_xm, stride_wn, stride_sn, stride_zn, stride_om,
                 BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZP: tl.constexpr, PER_CHANNEL: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLIT_K: tl.constexpr,
                 ONE_DOT: tl.constexpr, EVEN_K: tl.constexpr, ASM: tl.constexpr = False, PDL: tl.constexpr = False):
    """INT4 on the tensor cores with the weights as the dot's first operand: ``out.T = W x.T``, a
    [BN, BK] weight tile against a [BK, BM] input tile (BM 16-64: one to 16 activation rows fill
    one 16-column tile, where the MMA kernel's rows are the padded side of a 16-row tile). The
    words become 16-bit floats two at a time, in registers (``_pair_values``: a lop3 and an HADD2
    per two weights, no int-to-float conversion and no scale), and the scale multiplies each
    tile's float32 product (a tile lies inside one group: BK divides the group size). ONE_DOT:
    one [BN, BK] tile for one dot, K inside it pair-major (``_pair_major``: column
    ``16 c + 2 j + e`` is value j of word 2 c + e), the inputs loaded in order and permuted to
    match; otherwise a dot per value position j over the inputs ``8 w + j`` loaded for each.
    Either way the values reach the tensor cores through shared memory (Triton converts their
    layout there; joined, 16-byte stores). ASM (PTX): the word pairs by ``prmt``, the 16-bit
    floats as above and a dot in the inputs' dtype; otherwise (the interpreter) the same values
    in float32 and a float32 dot (``_swap_tile``). PDL (``inferkit.kernels.pdl``): the kernel
    signals at once, and loads the first tile's words before the wait for the kernel before."""
    BKW: tl.constexpr = BK // 8
    pdl.signal(PDL)
    pid_n, pid_m, pid_k, offs_n, offs_m, n_mask, m_mask, k_lo, k_hi = _tile(M, N, K, BM, BN, BK, SPLIT_K)
    acc = tl.zeros([BN, BM], tl.float32)
    off = tl.full([BN, 1], 8.0, tl.float32)  # the code offset, plus the zero point
    if PER_CHANNEL and HAS_ZP:
        off += tl.load(z_ptr + offs_n * stride_zn, mask=n_mask, other=0).to(tl.float32)[:, None]
    k_first = k_lo
    if PDL:  # the first tile's words before the wait for the kernel before (none past the split)
        offs_kw, kw_mask, words = _words_before(w_ptr, offs_n, n_mask, k_lo, k_hi, KW, stride_wn, 8, BKW, EVEN_K)
        pdl.wait(PDL)
        if k_lo < k_hi:
            acc = _swap_tile(acc, words, offs_kw, kw_mask, k_lo, off, x_ptr, s_ptr, z_ptr, offs_n, n_mask, offs_m,
                             m_mask, K, KW, stride_xm, stride_sn, stride_zn, GROUP, HAS_ZP, PER_CHANNEL, BM, BK,
                             ONE_DOT, EVEN_K, ASM)
        k_first = k_lo + BK
    for k0 in range(k_first, k_hi, BK):
        offs_kw, kw_mask, words = _load_words(w_ptr, offs_n, n_mask, k0, KW, stride_wn, 8, BKW, EVEN_K)
        acc = _swap_tile(acc, words, offs_kw, kw_mask, k0, off, x_ptr, s_ptr, z_ptr, offs_n, n_mask, offs_m, m_mask,
                         K, KW, stride_xm, stride_sn, stride_zn, GROUP, HAS_ZP, PER_CHANNEL, BM, BK, ONE_DOT, EVEN_K,
                         ASM)
    _finish(tl.trans(acc), out_ptr, ws_ptr, cnt_ptr, s_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, M, N, stride_om,
            stride_sn, pid_m * tl.num_programs(0) + pid_n, pid_k, BM, BN, PER_CHANNEL, SPLIT_K, HAS_BIAS)


_SM_COUNT: dict = {}
_DEVICE_NAME: dict = {}
_COUNTERS: dict = {}


def _counters(device: torch.device) -> torch.Tensor:
    """Split-K arrival counters, one per output tile, zero at rest (the last split of a tile resets
    its counter). Allocated once per device, outside any CUDA graph capture (the runtime's warm-up
    passes run first). Kernels on one stream only: concurrent streams would share the counters."""
    if device not in _COUNTERS:
        _COUNTERS[device] = torch.zeros(1 << 16, dtype=torch.int32, device=device)
    return _COUNTERS[device]


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    if device not in _SM_COUNT:
        _SM_COUNT[device] = torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_COUNT[device]


def _device_name(device: torch.device) -> str | None:
    if device.type != "cuda":
        return None
    if device not in _DEVICE_NAME:
        _DEVICE_NAME[device] = torch.cuda.get_device_name(device)
    return _DEVICE_NAME[device]


@functools.lru_cache(maxsize=4096)
def _picked(M: int, N: int, K: int, group_size: int, device: torch.device, bits: int) -> tuple:
    """The launch config: a measured one for this GPU model and shape if a table has it
    (``inferkit.kernels.tuned``), else the heuristic's."""
    cfg = tuned.lookup(M, N, K, group_size, bits, _device_name(device)) or pick_config(M, N, K, group_size, device, bits)
    return tuple(cfg.items())


def reset_configs() -> None:
    """Forget picked configs and loaded tables (after changing ``INFERKIT_KERNEL_CONFIGS``)."""
    _picked.cache_clear()
    _plan.cache_clear()
    tuned.clear_cache()


def gemv_tile_k(K: int, group_size: int, bits: int = 4) -> int:
    """Inputs per GEMV tile: one quantization group of 64-512 (one scale per row per tile), 256
    per channel, else 128; at most K rounded up to a power of two (and at least 4 words)."""
    per_channel = group_size >= K
    bk = 256 if per_channel else group_size if 64 <= group_size <= 512 and group_size & (group_size - 1) == 0 else 128
    return min(bk, max(32 // bits * 4, triton.next_power_of_2(K)))


def pick_config(M: int, N: int, K: int, group_size: int, device: torch.device, bits: int = 4) -> dict:
    """Tile sizes and split-K for a problem: the heuristic (``config=`` overrides it; a measured
    table for the GPU model takes precedence, see ``inferkit.kernels.tuned``). Its choices follow
    the H100 sweeps (``benchmarks/results/gpu_kernels_h100.json``, ``tune_demo_w4_h100.json``).

    1-2 rows (the GEMV kernel): a tile spans one quantization group along K when groups are
    64-512 inputs (one scale per row per tile), 256 inputs per channel, 128 otherwise. Each
    thread loads 16-byte pieces of 4 words, so ``BK / 32`` threads share a row. At 1 row with
    groups each thread takes 2 rows (8 warps from 128-input tiles, else 4): half the registers
    of 4 rows per thread, so twice the loads in flight per SM, for more instructions per weight
    (4.55 at g128 on sm_90; ``gemv_register_cap`` keeps it at 64 registers). In the sweeps (of
    the kernel before the per-thread accumulators) this was the fastest config or within 8%
    of it in all 7 shapes (Llama-3-8B's at g128, the demo's at g64), and 1.06-1.35x faster than
    4 rows per thread with 4 warps, which per-channel tiles and 2 activation rows keep (not
    swept). K is then split until there are about four programs per SM, down to one tile per
    split (for every kernel; it was two): a decode GEMV is bound by memory once the unpacking is
    cheap (``python -m inferkit.kernels.sass`` shows the instruction mix), and the demo's narrow
    layers were fastest with 8-16 splits of one or two tiles each.
    3 rows and more (the MMA kernel): BN 64/128, 16 words per dot; up to 32 rows, K split up to
    4 ways toward four programs per SM. The GEMV pads 3 rows to 4, and at 4 rows the MMA kernel
    was the faster in 6 of the 7 shapes measured, by up to 1.4x."""
    vals = 32 // bits
    sms = _sm_count(device)
    per_channel = group_size >= K
    if M <= 2:
        bk = gemv_tile_k(K, group_size, bits)
        threads_per_row = max(1, bk // vals // 4)
        if per_channel or M > 1:  # not in the sweeps: as before them
            rows_per_thread, warps = (4 if M == 1 else 2), 4
        else:
            rows_per_thread, warps = 2, 8 if bk >= 128 else 4
        bn = min(256, rows_per_thread * 32 * warps // threads_per_row)
        bn = max(16, min(bn, triton.next_power_of_2(N)))
        tiles, want = -(-N // bn), 4 * sms
        cfg = {}
    else:
        warps = 4
        bn = 64 if M <= 32 else 128
        bk = 16 * vals  # >= 16 words per MMA step
        # Up to 32 rows, split K toward four programs per SM, at most 4 ways: on an H100 (4096 and
        # 14336 inputs, 8 and 32 rows) 4 splits beat 1 and 2 in every case, by up to 1.8x. Above
        # 32 rows, no split: mixed prefill/decode steps bring every row count, and each
        # (rows tile, split) pair is a separate compile
        tiles, want = -(-N // bn) * -(-M // (16 if M <= 16 else 32)), 4 * sms if M <= 32 else 0
        cfg = {"KERNEL": "mma"} if M <= 4 else {}
    split, most = 1, 16 if M <= 2 else 4
    while tiles * split < want and split < most and K // (bk * split * 2) >= 1:
        split *= 2
    return {"BN": bn, "BK": bk, "SPLIT_K": split, "num_warps": warps, **cfg}


def gemv_register_cap(M: int, bits: int, BN: int, BK: int, num_warps: int, has_zp: bool, per_channel: bool,
                      group: int, prefetch: int = 1, stages: int = 0) -> int | None:
    """The register cap the GEMV launches with, or None: the registers of the kernel the H100
    sweeps measured, for the heuristic's decode tiles of 8 warps (one activation row, at most 2
    output rows per thread, tiles inside one group). Without zero points 64, so 4 programs fit
    an SM: uncapped, ptxas takes 76-80 and an SM holds 3, for 0.2 instructions per weight fewer
    (4.34 against 4.55, the uncapped tile also stepping its input pointer, ``gemv_input_step``;
    no spills either way, Triton 3.6 and 3.9). With zero points 80 (Triton
    3.6 takes 96 uncapped: 2 programs per SM instead of 3; no spills with the two-instruction
    field form, see ``field_lop3``). Not capped: 4-warp tiles
    (70-80 registers, 6-7 programs per SM; a cap of 64 spills inside the loop), tiles spanning
    groups (a cap spills with 3.6), tiles loaded more than one ahead (``PREFETCH``: at 64 registers
    2 ahead spills 40 bytes, uncapped it takes 80), the pipelined loop (``STAGES``: uncapped it
    takes 64 at 3-4 stages and steps its input pointer; capped, 0.14 more instructions per weight)."""
    threads_per_row = max(1, BK * bits // 32 // 4)
    rows_per_thread = BN * threads_per_row / (32 * num_warps)
    if M != 1 or prefetch > 1 or stages or num_warps < 8 or rows_per_thread > 2 \
            or not _tiles_in_one_group(per_channel, group, BK):
        return None
    return 80 if has_zp else 64


def _tiles_in_one_group(per_channel: bool, group: int, BK: int) -> bool:
    """Whether every K tile lies inside one quantization group (the kernels' ``ONE_GROUP``)."""
    return not per_channel and BK <= group and group % BK == 0


def gemv_input_step(reg_cap: int | None, per_channel: bool, group: int, BK: int) -> bool:
    """Whether the GEMV addresses its inputs from a pointer stepping with the tile (``X_STEP``):
    in uncapped tiles inside one group. On sm_90 that is 0.1-0.4 fewer instructions per weight
    there (the demo's g64 tiles with zero points: 5.27 -> 5.11 with Triton 3.6, in 80 registers
    instead of 93; 4.86 -> 4.73 with 3.9, 96 instead of 104), mostly in as many registers or
    fewer (2 activation rows with 3.9: 80 instead of 72). Under a register cap the extra live pointer
    makes ptxas spill (16-24 bytes at 64 registers); in tiles spanning groups Triton 3.9 takes 99
    registers instead of 80 for it (3 programs of 8 warps per SM become 2)."""
    return not reg_cap and _tiles_in_one_group(per_channel, group, BK)


def field_lop3(kernel: str, has_zp: bool, reg_cap: int | None, ptx: bool = PTX) -> bool:
    """Whether the kernel takes each value out of its word with one inline PTX ``lop3`` (``_field``):
    on sm_90 that is 0.3-0.5 fewer instructions per weight in the GEMV (g128: 5.05 -> 4.55) and
    0.2-0.5 in the MMA kernel, with Triton 3.6 and 3.9 alike. Not in the GEMV with zero points
    under a register cap, whose 80 registers then spill 80 bytes with Triton 3.9 (none with the
    two-instruction form), nor where no PTX runs (the interpreter, AMD GPUs)."""
    return ptx and not (kernel == "gemv" and has_zp and bool(reg_cap))


def gemv_options(M: int, bits: int, BN: int, BK: int, num_warps: int, has_zp: bool, per_channel: bool, group: int,
                 even_k: bool, reg_cap: int | None = None, ptx: bool = PTX, prefetch: int = 1, stages: int = 0) -> dict:
    """The GEMV's launch options that follow from its tile: ``EVEN_K``, ``LOP3``, ``X_STEP``,
    ``PREFETCH``, ``STAGES`` and ``maxnreg`` (absent when uncapped). ``reg_cap``: a config's
    ``REG_CAP`` (0: none); None lets ``gemv_register_cap`` decide. ``prefetch``, ``stages``: a
    config's ``PREFETCH`` and ``STAGES``."""
    cap = (gemv_register_cap(M, bits, BN, BK, num_warps, has_zp, per_channel, group, prefetch, stages)
           if reg_cap is None else reg_cap)
    return {"EVEN_K": even_k, "LOP3": field_lop3("gemv", has_zp, cap, ptx), "PREFETCH": prefetch, "STAGES": stages,
            "X_STEP": gemv_input_step(cap, per_channel, group, BK), **({"maxnreg": cap} if cap else {})}


def swap_tile_k(BK: int, group: int, per_channel: bool) -> int | None:
    """The swap kernel's K tile for a config's BK: inside one group (the largest power of two up
    to BK that divides the group size), at least 16 values (a dot's depth); None if there is none."""
    bk = 1 << (min(BK, 128 if per_channel else group).bit_length() - 1)  # a power of two
    while bk >= 16 and not per_channel and group % bk:
        bk //= 2
    return bk if bk >= 16 else None


def swap_one_dot(requested: bool, BK: int) -> bool:
    """Whether the swap kernel joins its [BN, BK] tile for one dot (``ONE_DOT``) as ``requested``.
    A dot per value position is BK / 8 deep, and the tensor cores take 16 at least: under 128
    values per K tile (groups of 32 or 64) the compiler rejects it ("K >= 16", seen on an H100;
    the interpreter runs it), so those take the joined tile, BK deep."""
    return requested or BK // 8 < 16


def mma_one_dot(requested: bool, BM: int, BN: int, BK: int, num_warps: int, per_channel: bool, group: int) -> bool:
    """Whether the MMA kernel joins a tile for one dot (``ONE_DOT``) as ``requested``. Triton 3.6
    and 3.9 alike fail to compile the joined tile ("Illegal shared layout") at 64-row tiles with one
    scale group per K tile (the group a multiple of BK) when a warp spans 32 output columns (BN /
    num_warps == 32); every other 64-row tile of BN 64-256, BK 64-128, groups 32-128 and 4 or 8
    warps compiles, as checked for sm_90 without a GPU. Those take a dot per value position (and
    ``quant_matmul`` falls back to it too if a joined tile fails to compile anyway)."""
    return requested and not (BM == 64 and _tiles_in_one_group(per_channel, group, BK) and BN // num_warps == 32)


@functools.lru_cache(maxsize=4096)
def _plan(M: int, N: int, K: int, KW: int, G: int, bits: int, group_size: int | None, dtype: torch.dtype,
          device: torch.device, has_zp: bool, has_bias: bool, config: tuple | None,
          pdl_launch: bool | None = None) -> tuple:
    """Everything about a launch that depends only on shapes, dtypes and the config, worked out
    once: (kernel, grid, split, counters, constexprs). Eager steps call the matmul hundreds of
    times per step, so the per-call Python work is kept to allocating the output and launching."""
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    vals = 32 // bits
    if K % vals or KW != K // vals:
        raise ValueError(f"packed width {KW} does not match {K} inputs at {bits} bits")
    per_channel = group_size is None or group_size >= K
    group = K if per_channel else group_size
    if not per_channel and (group % vals or G != -(-K // group)):
        raise ValueError(f"group size {group}: must be a multiple of {vals} values per word, with {-(-K // group)} "
                         f"scales per row (got {G})")
    cfg = dict(_picked(M, N, K, group, device, bits))
    if config:  # a config names its kernel or takes the default for M rows, not the heuristic's choice
        override = dict(config)
        if "KERNEL" not in override:
            cfg.pop("KERNEL", None)
        cfg.update(override)
    # a launch property, not a tile: kept whichever kernel and tiles the plan ends with
    launch_pdl = cfg.get("PDL", False) if pdl_launch is None else pdl_launch  # quant_matmul's pdl= over the config's
    kernel = tuned.kernel_for(M, cfg)
    if kernel is None:
        raise ValueError(f"KERNEL {cfg['KERNEL']!r}: 'mma', 'swap', or 'gemv' for up to 4 rows")
    if kernel == "swap":
        if bits != 4:
            raise ValueError(f"KERNEL 'swap' takes 4-bit weights, not {bits}")
        swap_bk = swap_tile_k(cfg["BK"], group, per_channel)
        if dtype == torch.float32 or swap_bk is None:  # float32 inputs, or groups under 16 values: the heuristic's
            cfg = pick_config(M, N, K, group, device, bits)
            kernel = tuned.kernel_for(M, cfg)
        else:
            cfg = {**cfg, "BK": swap_bk}
    if cfg["BK"] // vals < (16 if kernel == "mma" else 1):
        raise ValueError(f"BK {cfg['BK']} too small: the MMA kernel needs 16 words per step")
    ieee = kernel == "mma" and (dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16))
    split = cfg["SPLIT_K"]
    gemv = kernel == "gemv"
    bm = 1 << (M - 1).bit_length() if gemv else 16 if M <= 16 else 32 if M <= 32 or ieee else 64
    bn = min(cfg["BN"], 64) if ieee else cfg["BN"]  # float32 MMA tiles: keep shared memory small
    tiles_n, tiles_m = -(-N // bn), -(-M // bm)
    counters = _counters(device) if split > 1 else None
    if split > 1 and tiles_n * tiles_m > counters.numel():
        split, counters = 1, None
    consts = dict(BITS=bits, GROUP=group, HAS_ZP=has_zp, PER_CHANNEL=per_channel, HAS_BIAS=has_bias, BM=bm, BN=bn,
                  BK=cfg["BK"],
                  SPLIT_K=split, num_warps=cfg["num_warps"], **FP_FUSION)
    if launch_pdl and pdl.capable(device):  # before sm_90 and on other GPUs a plain launch
        consts.update(PDL=True, launch_pdl=True)
    elif launch_pdl and INTERPRET:  # PDL's loops without the waits (nothing runs concurrently there)
        consts["PDL"] = True
    if gemv:
        prefetch, stages = cfg.get("PREFETCH", 1), cfg.get("STAGES", 0)
        if prefetch not in tuned.PREFETCH_AHEAD:
            raise ValueError(f"PREFETCH {prefetch!r}: the GEMV loads 1, 2 or 3 tiles ahead")
        if stages not in (0, *tuned.PIPELINE_STAGES) or (stages and prefetch != 1):
            raise ValueError(f"STAGES {stages!r}: 0 (PREFETCH's loop) or 2-5 (the pipelined loop, without PREFETCH)")
        options = gemv_options(M, bits, bn, cfg["BK"], cfg["num_warps"], has_zp, per_channel, group,
                               K % cfg["BK"] == 0, cfg.get("REG_CAP"), prefetch=prefetch, stages=stages)
        return _gemv_kernel, (tiles_n, split), split, counters, {**consts, "VEC_X": cfg.get("VEC_X", True), **options}
    if kernel == "swap":
        stages = cfg.get("STAGES", 1)
        if stages not in tuned.SWAP_STAGES:
            raise ValueError(f"STAGES {stages!r}: the swap kernel's loop takes 1-5 stages")
        return _swap_kernel, (tiles_n, tiles_m, split), split, counters, {
            **consts, "ONE_DOT": swap_one_dot(cfg.get("ONE_DOT", True), cfg["BK"]), "EVEN_K": K % cfg["BK"] == 0,
            "ASM": PTX, "num_stages": stages}
    one_dot = mma_one_dot(cfg.get("ONE_DOT", True), bm, bn, cfg["BK"], cfg["num_warps"], per_channel, group)
    stages = cfg.get("STAGES", 2)
    if stages not in tuned.PIPELINE_STAGES:
        raise ValueError(f"STAGES {stages!r}: the MMA kernel's pipelined loop takes 2-5 stages")
    return _mma_kernel, (tiles_n, tiles_m, split), split, counters, {
        **consts, "IEEE": ieee, "ONE_DOT": one_dot, "LOP3": field_lop3("mma", has_zp, None), "num_stages": stages}


def quant_matmul(x: torch.Tensor, w_packed: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                 bits: int, group_size: int | None = None, bias: torch.Tensor | None = None,
                 config: dict | None = None, pdl: bool | None = None) -> torch.Tensor:
    """x [M, K] (bf16/fp16/fp32) @ dequant(W [N, K]).T → [M, N] in x's dtype.

    ``group_size`` None or >= K: per-channel scales ``[N, 1]``. ``bias`` [N] (contiguous) is added
    in the kernel, in float32, before the output's rounding. ``config``: tiles and split-K
    (``BN``, ``BK``, ``SPLIT_K``, ``num_warps``, ``VEC_X``/``ONE_DOT``) over the picked ones,
    ``KERNEL`` (``gemv``, up to 4 rows, the default there; ``mma``; ``swap``, INT4 only, its
    ``STAGES`` 1-5, default 1), the GEMV's ``REG_CAP``
    (registers per thread, 0 for none; default ``gemv_register_cap``), ``PREFETCH`` (tiles
    loaded ahead into registers, 1-3; default 1) or ``STAGES`` (2-5: the pipelined loop); the
    MMA kernel's ``STAGES`` (its pipeline's, 2-5; default 2). ``PDL`` (any kernel; default false):
    launched as a programmatic dependent launch on sm_90+ GPUs (elsewhere ignored): it starts
    while the kernel before it in the stream finishes, reads its first weights, and waits for
    that kernel before reading ``x`` or writing (``inferkit.kernels.pdl``). So the weights, scales and zero
    points must not be written by a kernel still running when it is launched (a model's weights
    are not). ``pdl`` True or False: whether to launch so, over the config's and a tuned
    table's ``PDL`` (None: theirs; the runtime's ``pdl`` engine option passes True). bf16
    inputs must be (or are copied to be) 4-byte aligned with an even row stride; zero points
    must be integers, as compressed-tensors stores them."""
    if x.dim() != 2 or w_packed.dtype != torch.int32:
        raise ValueError("quant_matmul: x must be [M, K] and the packed weights int32")
    M, K = x.shape
    N, KW = w_packed.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    if x.dtype is torch.bfloat16 and (x.data_ptr() & 3 or M > 1 and x.stride(0) & 1):
        x = x.clone(memory_format=torch.contiguous_format)  # the GEMV reads bf16 pairs as int32 words
    if bias is not None:
        if bias.shape != (N,):
            raise ValueError(f"quant_matmul: bias of shape {tuple(bias.shape)} for {N} outputs")
        bias = bias if bias.stride(0) == 1 else bias.contiguous()
    if config is not None and not isinstance(config.get("PDL", False), bool):  # 1 and True are one plan's key
        raise ValueError(f"PDL {config['PDL']!r}: true or false")
    if pdl is not None and not isinstance(pdl, bool):
        raise ValueError(f"pdl {pdl!r}: True, False or None")
    kernel, grid, split, counters, consts = _plan(M, N, K, KW, scale.shape[1], bits, group_size, x.dtype, x.device,
                                                  zero_point is not None, bias is not None,
                                                  None if config is None else tuple(sorted(config.items())), pdl)
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    ws = torch.empty((split, M, N), dtype=torch.float32, device=x.device) if split > 1 else out
    z = zero_point if zero_point is not None else scale
    args = (x, w_packed, scale, z, bias if bias is not None else scale, out, ws,
            counters if counters is not None else out, M, N, K, KW, scale.shape[1], x.stride(0),
            w_packed.stride(0), scale.stride(0), z.stride(0), N)
    try:
        kernel[grid](*args, **consts)
    except RuntimeError as exc:  # a compile failure comes before any launch: nothing ran
        if not consts.get("ONE_DOT"):
            raise
        # A joined tile this Triton cannot compile (mma_one_dot knows the cases seen): this launch
        # and the cached plan's later ones take a dot per value position.
        consts["ONE_DOT"] = False
        warnings.warn(f"quant_matmul: the joined-tile MMA failed to compile for M={M} N={N} K={K} "
                      f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); using a dot per value",
                      RuntimeWarning, stacklevel=2)
        kernel[grid](*args, **consts)
    return out


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
