import pytest
import torch

from inferkit.quant.pack import pack_int32, packed_width, unpack_int32


def test_int4_layout_is_little_endian_nibbles():
    # Row of 8 values -8..7: offset to 0..15, value i at bits 4i..4i+3 of one word.
    q = torch.arange(-8, 0, dtype=torch.int8).reshape(1, 8)  # -8..-1 → 0..7
    word = pack_int32(q, 4)
    expected = sum(v << (4 * i) for i, v in enumerate(range(8)))
    assert word.shape == (1, 1)
    assert int(word[0, 0]) == expected


def test_int4_high_nibble_sets_sign_bit():
    q = torch.full((1, 8), 7, dtype=torch.int8)  # all 15 → 0xFFFFFFFF → -1 as int32
    assert int(pack_int32(q, 4)[0, 0]) == -1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("cols", [8, 37, 64, 576])
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip_exact(bits, cols, dim):
    gen = torch.Generator().manual_seed(bits * 1000 + cols)
    shape = (5, cols) if dim == 1 else (cols, 5)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, generator=gen, dtype=torch.int8)
    packed = pack_int32(q, bits, dim)
    assert packed.dtype == torch.int32
    assert packed.shape[dim] == packed_width(cols, bits)
    assert torch.equal(unpack_int32(packed, bits, cols, dim), q)


def test_int3_values_straddle_words():
    # 11 values of 3 bits = 33 bits: the 11th value starts at bit 30 and spills into word 2.
    q = torch.full((1, 11), 3, dtype=torch.int8)  # offset → 7 = 0b111
    packed = pack_int32(q, 3)
    assert packed.shape == (1, 2)
    assert int(packed[0, 1]) == 0b1
    assert torch.equal(unpack_int32(packed, 3, 11), q)


def test_reference_shapes_match_compressed_tensors_layout():
    # q_proj 576x576 int4 → (576, 72); down_proj 576x1536 → (576, 192); zero points packed on dim 0.
    assert pack_int32(torch.zeros(576, 576, dtype=torch.int8), 4).shape == (576, 72)
    assert pack_int32(torch.zeros(576, 1536, dtype=torch.int8), 4).shape == (576, 192)
    assert pack_int32(torch.zeros(576, 9, dtype=torch.int8), 4, dim=0).shape == (72, 9)
