"""Dense bit-packing of signed integers into int32 words (compressed-tensors pack-quantized).

Element ``i`` of a row, offset to unsigned by ``2**(bits-1)``, occupies bits
``[i*bits, (i+1)*bits)`` of the row's little-endian bit stream; words are int32. With 4 bits
this is 8 values per word, element ``8*w + k`` at shift ``4*k`` of word ``w``.
"""

from __future__ import annotations

import math

import torch

_MASK32 = 0xFFFFFFFF


def packed_width(length: int, bits: int) -> int:
    return math.ceil(length * bits / 32)


def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack a 2-D tensor of signed ``bits``-bit integers along ``dim`` into int32 words."""
    assert values.dim() == 2 and dim in (0, 1)
    v = values.t() if dim == 0 else values
    v = v.to(torch.int64) + (1 << (bits - 1))
    assert int(v.min()) >= 0 and int(v.max()) < (1 << bits), "values out of range for bit width"
    rows, cols = v.shape
    n_words = packed_width(cols, bits)
    pos = torch.arange(cols, dtype=torch.int64) * bits
    word, shift = pos // 32, pos % 32
    acc = torch.zeros(rows, n_words + 1, dtype=torch.int64)
    # Fields never overlap, so adding is OR; bits past 32 spill into the next word.
    acc.scatter_add_(1, word.expand(rows, cols), v << shift)
    low = acc & _MASK32
    spill = torch.zeros_like(low)
    spill[:, 1:] = acc[:, :-1] >> 32
    words = (low + spill)[:, :n_words]
    words = torch.where(words >= (1 << 31), words - (1 << 32), words).to(torch.int32)
    return (words.t() if dim == 0 else words).contiguous()


def unpack_int32(words: torch.Tensor, bits: int, length: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: ``length`` signed values per row (or column), as int8."""
    assert words.dtype == torch.int32 and words.dim() == 2 and dim in (0, 1)
    w = words.t() if dim == 0 else words
    w = w.to(torch.int64) & _MASK32
    w = torch.cat([w, torch.zeros(w.shape[0], 1, dtype=torch.int64)], dim=1)
    pos = torch.arange(length, dtype=torch.int64) * bits
    word, shift = pos // 32, pos % 32
    pair = w[:, word] | (w[:, word + 1] << 32)  # 64-bit window starting at each element's word
    vals = ((pair >> shift) & ((1 << bits) - 1)) - (1 << (bits - 1))
    vals = vals.to(torch.int8)
    return (vals.t() if dim == 0 else vals).contiguous()
