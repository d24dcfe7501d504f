"""The Triton kernels against their PyTorch references over a grid of shapes, and the runtime
with the Triton backends giving the reference backend's greedy tokens. Without a GPU they run
in Triton's CPU interpreter (TRITON_INTERPRET=1, set before the kernels are imported)."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

triton = pytest.importorskip("triton")

from inferkit.kernels.fused import rms_norm, rope_store, silu_mul  # noqa: E402
from inferkit.kernels.paged_attention import paged_decode_attention, reference_paged_decode  # noqa: E402
from inferkit.kernels.quant_matmul import pick_config, quant_matmul, reference_quant_matmul  # noqa: E402
from inferkit.quant.pack import pack_int32  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


def rel_err(out, ref) -> float:
    assert not out.isnan().any()
    return float((out.double().cpu() - ref.double().cpu()).norm() / ref.double().cpu().norm())


def paged_case(lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Random K/V scattered over shuffled blocks, and each sequence's block table."""
    g = torch.Generator().manual_seed(seed)
    blocks_each = [-(-n // block_size) for n in lens]
    num_blocks = sum(blocks_each) + 2
    kc = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    vc = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(lens), max(blocks_each), dtype=torch.int32)
    for b, count in enumerate(blocks_each):
        tables[b, :count] = torch.tensor([perm.pop() for _ in range(count)], dtype=torch.int32)
    q = torch.randn(len(lens), num_heads, head_dim, generator=g).to(dtype)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    return dev(q), dev(kc), dev(vc), dev(tables), dev(torch.tensor(lens, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 2), (8, 1)], ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("block_size,lens,splits", [(16, [1, 17, 40], None), (8, [33, 5, 64], 3), (4, [7, 9, 2], 2),
                                                    (32, [70], 4)])
def test_paged_decode_matches_reference(dtype, heads, block_size, lens, splits):
    q, kc, vc, tables, cl = paged_case(lens, heads[0], heads[1], 32, block_size, dtype)
    scale = 32 ** -0.5
    out = paged_decode_attention(q, kc, vc, tables, cl, scale, max(lens), num_splits=splits, block_n=16)
    assert rel_err(out, reference_paged_decode(q, kc, vc, tables, cl, scale)) < TOL[dtype]


def test_paged_decode_with_more_splits_than_tokens_and_odd_head_dim():
    """Empty splits (a 3-token context cut into 8) merge to nothing; head_dim 24 is padded."""
    q, kc, vc, tables, cl = paged_case([3, 50], 6, 3, 24, 16, torch.float32)
    out = paged_decode_attention(q, kc, vc, tables, cl, 0.2, 50, num_splits=8, block_n=16)
    assert rel_err(out, reference_paged_decode(q, kc, vc, tables, cl, 0.2)) < 1e-5


ULP = {torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def assert_rounding_apart(out, ref, dtype, share, ulps=1):
    """At most ``share`` of the elements differ, each by at most ``ulps`` roundings of ``dtype``."""
    out, ref = out.cpu(), ref.cpu()
    diff = (out.double() - ref.double()).abs()
    assert bool((diff <= ulps * ULP[dtype] * ref.double().abs() + 1e-30).all()), float(diff.max())
    assert float((out != ref).double().mean()) <= share


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", [64, 96, 576])
@pytest.mark.parametrize("with_update", [False, True], ids=["norm", "add+norm"])
def test_fused_rms_norm_is_the_reference_arithmetic(dtype, hidden, with_update):
    """PyTorch's steps (transformers' RMSNorm, after the residual's in-place add): the residual
    bit for bit, the norm up to the order of the sum of squares."""
    from inferkit.runtime.model import rms_norm as torch_rms_norm

    g = torch.Generator().manual_seed(hidden)
    h = (torch.randn(5, hidden, generator=g) * 3).to(dtype).to(DEVICE)
    update = torch.randn(5, hidden, generator=g).to(dtype).to(DEVICE) if with_update else None
    weight = (1 + 0.2 * torch.randn(hidden, generator=g)).to(dtype).to(DEVICE)
    h_ref = h.clone()
    if with_update:
        h_ref.add_(update)
    ref = torch_rms_norm(h_ref, weight, 1e-5)
    out = rms_norm(h, weight, 1e-5, update)
    assert torch.equal(h, h_ref)  # the residual stream, updated in place
    assert out.dtype == dtype and out.shape == (5, hidden)
    if dtype == torch.float32:  # another rsqrt input by an ulp or two moves every element a little
        assert_rounding_apart(out, ref, dtype, share=1.0, ulps=4)
    else:  # ... and rarely crosses a rounding boundary of the 16-bit result
        assert_rounding_apart(out, ref, dtype, share=0.02)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 2), (8, 1)], ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("head_dim", [16, 24, 128])
def test_fused_rope_store_rotates_and_scatters_like_the_reference(dtype, heads, head_dim):
    """Rotated queries out, rotated keys and the values into their slots, bit for bit as the
    reference's RoPE and index_copy; a slot of -1 (a graph's padding row) writes nothing. At
    head size 128 a program takes 8 heads, so query, key and value heads share programs."""
    from inferkit.runtime.model import apply_rope

    num_heads, num_kv = heads
    g = torch.Generator().manual_seed(head_dim + num_heads)
    tokens = 5
    qkv = torch.randn(tokens, (num_heads + 2 * num_kv) * head_dim, generator=g).to(dtype)
    cos = torch.randn(64, 1, head_dim, generator=g).to(dtype)
    sin = torch.randn(64, 1, head_dim, generator=g).to(dtype)
    positions = torch.tensor([3, 63, 0, 17, 40])
    slots = torch.tensor([5, -1, 0, 30, 12])
    kc = torch.zeros(5, 8, num_kv, head_dim, dtype=dtype, device=DEVICE)
    vc = torch.zeros_like(kc)
    q = rope_store(*(t.to(DEVICE) for t in (qkv, cos, sin, positions)), num_heads, num_kv, kc, vc, slots.to(DEVICE))
    # the reference: the runtime's PyTorch path
    heads3 = qkv.view(tokens, num_heads + 2 * num_kv, head_dim)
    qk = apply_rope(heads3[:, : num_heads + num_kv], cos[positions], sin[positions])
    want_k, want_v = torch.zeros_like(kc.cpu()), torch.zeros_like(vc.cpu())
    keep = slots >= 0
    want_k.view(-1, num_kv, head_dim)[slots[keep]] = qk[keep, num_heads:]
    want_v.view(-1, num_kv, head_dim)[slots[keep]] = heads3[keep, num_heads + num_kv:]
    assert q.shape == (tokens, num_heads, head_dim) and q.is_contiguous()
    assert torch.equal(q.cpu(), qk[:, :num_heads])
    assert torch.equal(kc.cpu(), want_k) and torch.equal(vc.cpu(), want_v)
    assert int((kc != 0).any(-1).any(-1).sum()) == 4  # four slots; the -1 row wrote nothing


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inter", [96, 1500])
def test_fused_silu_mul_is_the_reference_arithmetic(dtype, inter):
    g = torch.Generator().manual_seed(inter)
    gate_up = (torch.randn(3, 2 * inter, generator=g) * 4).to(dtype).to(DEVICE)
    out = silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    ref = torch.nn.functional.silu(gate) * up
    assert out.shape == (3, inter) and out.dtype == dtype
    if dtype == torch.float32:  # the exponential's last bits differ from PyTorch's
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=1e-6)
    else:  # ... and rarely move a 16-bit rounding
        assert_rounding_apart(out, ref, dtype, share=0.01)


def test_fused_kernels_refuse_bad_shapes():
    x = torch.zeros(2, 10, device=DEVICE)
    with pytest.raises(ValueError, match="rms_norm"):
        rms_norm(x, torch.ones(9, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="update"):
        rms_norm(x, torch.ones(10, device=DEVICE), 1e-5, torch.zeros(2, 9, device=DEVICE))
    with pytest.raises(ValueError, match="silu_mul"):
        silu_mul(torch.zeros(2, 7, device=DEVICE))
    kc = torch.zeros(2, 4, 1, 8, device=DEVICE)
    with pytest.raises(ValueError, match="rope_store"):
        rope_store(torch.zeros(2, 30, device=DEVICE), torch.ones(8, 1, 8), torch.ones(8, 1, 8), torch.zeros(2),
                   2, 1, kc, kc.clone(), torch.zeros(2))


def quant_case(M, N, K, bits, group_size, asym, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    q = torch.randint(lo, hi + 1, (N, K), generator=g)
    groups = 1 if group_size is None else K // group_size
    scale = (torch.rand(N, groups, generator=g) * 0.02 + 0.005).to(dtype)
    zero = torch.randint(lo, hi + 1, (N, groups), generator=g).to(dtype) if asym else None
    x = torch.randn(M, K, generator=g).to(dtype)
    dev = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return dev(x), dev(pack_int32(q, bits, dim=1)), dev(scale), dev(zero)


def prefill_case(chunks, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    """Chunks (start, n) of different sequences in one step: each sequence's K/V for positions
    0..start+n-1 in shuffled blocks, q rows for its n new tokens (stacked in chunk order, with a
    decode-like spare row between chunks that the kernel must leave alone)."""
    g = torch.Generator().manual_seed(seed)
    blocks_each = [-(-(start + n) // block_size) for start, n in chunks]
    num_blocks = sum(blocks_each) + 1
    kc = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    vc = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = torch.zeros(len(chunks), max(blocks_each), dtype=torch.int32)
    info, row = [], 0
    for c, ((start, n), count) in enumerate(zip(chunks, blocks_each)):
        tables[c, :count] = torch.tensor([perm.pop() for _ in range(count)], dtype=torch.int32)
        info.append((row, start, n))
        row += n + 1
    q = torch.randn(row, num_heads, head_dim, generator=g).to(dtype)
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    return dev(q), dev(kc), dev(vc), dev(tables), dev(torch.tensor(info, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 2), (8, 1)], ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("block_size,chunks", [(16, [(0, 21), (5, 3), (40, 17)]), (8, [(0, 1), (13, 40)]),
                                               (4, [(0, 9), (2, 2), (0, 16)])])
def test_paged_prefill_matches_reference(dtype, heads, block_size, chunks):
    """Causal attention over the cached prefix plus the chunk, several chunks in one launch, against
    the PyTorch path (gathered blocks + SDPA); rows outside the chunks stay untouched."""
    from inferkit.kernels.paged_attention import paged_prefill_attention
    from inferkit.runtime.attention import prefill_attention

    q, kc, vc, tables, info = prefill_case(chunks, heads[0], heads[1], 24, block_size, dtype)
    scale = 24 ** -0.5
    out = torch.full_like(q, 7.0)
    paged_prefill_attention(q, kc, vc, tables, info, max(n for _, n in chunks), scale, out)
    for c, (row, start, n) in enumerate(info.tolist()):
        table = tables[c, : -(-(start + n) // block_size)].long()
        ref = prefill_attention(q[row:row + n].float(), kc.float(), vc.float(), table, start, scale)
        assert rel_err(out[row:row + n], ref) < TOL[dtype], (c, start, n)
        assert (out[row + n] == 7.0).all()  # the spare row after each chunk


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128, None], ids=lambda g: f"g{g}" if g else "ch")
@pytest.mark.parametrize("asym", [False, True], ids=["sym", "asym"])
@pytest.mark.parametrize("M", [1, 3, 5, 20])
def test_quant_matmul_matches_reference(bits, group_size, asym, M):
    for dtype in (torch.float32, torch.bfloat16):
        x, w, s, z = quant_case(M, 48, 384, bits, group_size, asym, dtype, seed=M)
        out = quant_matmul(x, w, s, z, bits, group_size)
        assert out.dtype == dtype and out.shape == (M, 48)
        assert rel_err(out, reference_quant_matmul(x, w, s, z, bits, group_size)) < TOL[dtype]


@pytest.mark.parametrize("config", [dict(SPLIT_K=4), dict(SPLIT_K=3, BK=128), dict(BN=32, BK=256), dict(BN=16, BK=512),
                                    dict(SPLIT_K=2, ONE_DOT=False, VEC_X=False)])
@pytest.mark.parametrize("M", [1, 7])
@pytest.mark.parametrize("group_size", [32, 256])
def test_quant_matmul_split_k_and_tiles(config, M, group_size):
    """Tiles spanning several groups (scales per word) and tiles inside one group."""
    x, w, s, z = quant_case(M, 40, 512, 4, group_size, True, torch.float16, seed=3)
    out = quant_matmul(x, w, s, z, 4, group_size, config=config)
    assert rel_err(out, reference_quant_matmul(x, w, s, z, 4, group_size)) < TOL[torch.float16]
    if M == 1:  # the decode kernel also takes tiles smaller than a group
        out = quant_matmul(x, w, s, z, 4, group_size, config={**config, "BK": 64})
        assert rel_err(out, reference_quant_matmul(x, w, s, z, 4, group_size)) < TOL[torch.float16]


def test_quant_matmul_random_configs_match_reference():
    """Tile variants the GPU benchmark's sweep may pick (and odd shapes around them), drawn with
    a fixed seed: every one must give the reference's numbers, or the sweep could crown a fast
    wrong config."""
    import random

    rng = random.Random(6)
    ahead = random.Random(7)  # the kernels' loops, drawn apart (the other draws stay as they were)
    for _ in range(24):
        M = rng.choice([1, 2, 3, 4, 5, 9])
        bits = rng.choice([4, 8])
        group = rng.choice([32, 64, 128, None])
        K = rng.choice([256, 384, 512])
        N = rng.choice([24, 40, 72])
        cfg = {"BN": rng.choice([16, 32, 64]), "SPLIT_K": rng.choice([1, 2, 3, 4]), "num_warps": rng.choice([1, 2, 4])}
        if M <= 4:
            cfg.update(BK=rng.choice([64, 128, 256]), VEC_X=rng.random() < 0.5)
            cfg.update(ahead.choice([{"PREFETCH": 1}, {"PREFETCH": 2}, {"PREFETCH": 3}, {"STAGES": 3}]))
        else:
            cfg.update(BK=rng.choice([16, 32]) * (32 // bits), ONE_DOT=rng.random() < 0.5)
            cfg.update(STAGES=ahead.choice([2, 3, 4]))
        x, w, s, z = quant_case(M, N, K, bits, group, rng.random() < 0.5, torch.float32, seed=rng.randrange(1000))
        out = quant_matmul(x, w, s, z, bits, group, config=cfg)
        assert rel_err(out, reference_quant_matmul(x, w, s, z, bits, group)) < 1e-5, (M, bits, group, K, N, cfg)


@pytest.mark.parametrize("M, K, group, asym, dtype, cfg", [
    (1, 512, 128, False, torch.bfloat16, dict(BN=32, SPLIT_K=4, num_warps=4)),
    (3, 384, 64, True, torch.float16, dict(BN=16, SPLIT_K=1, num_warps=4, ONE_DOT=False)),
    (17, 256, 32, True, torch.bfloat16, dict(BN=64, SPLIT_K=2, num_warps=4, STAGES=2)),
    (40, 200, None, True, torch.float16, dict(BN=32, SPLIT_K=3, num_warps=4)),  # per channel, K a partial tile
    (5, 576, 64, False, torch.bfloat16, dict(BN=16, SPLIT_K=2, num_warps=1, ONE_DOT=False)),  # the demo's K
    (3, 640, 128, True, torch.float16, dict(BN=32, SPLIT_K=2, num_warps=4, ONE_DOT=False)),  # K: 5 tiles
    (20, 448, None, False, torch.bfloat16, dict(BN=64, SPLIT_K=1, num_warps=4, ONE_DOT=False)),  # K: 3.5 tiles
], ids=["m1-g128", "m3-g64-zp-per-value", "m17-g32-zp", "m40-channel-k200", "m5-g64-k576", "m3-g128-zp-per-value",
        "m20-channel-per-value"])
def test_swap_kernel_matches_reference(M, K, group, asym, dtype, cfg):
    """The swap kernel (KERNEL swap: weights as the dot's first operand, value-major K, the scale
    on each tile's product) against the float64 reference, with a bias, over row tiles of 16-64,
    groups of 32-128 and per channel, zero points, split K and a K that ends inside a tile. Its
    K tile is clamped into one group (BK 128 asked, 64 or 32 taken); a dot per value position,
    BK / 8 deep, only at K tiles of 128 (the tensor cores' 16 deep), else the joined tile."""
    from inferkit.kernels import quant_matmul as qm

    x, w, s, z = quant_case(M, 48, K, 4, group, asym, dtype, seed=M + K)
    bias = torch.randn(48, generator=torch.Generator().manual_seed(M)).to(dtype).to(DEVICE)
    config = {**cfg, "BK": 128, "KERNEL": "swap"}
    kernel, grid, split, _, consts = qm._plan(M, 48, K, K // 8, s.shape[1], 4, group, dtype, torch.device(DEVICE),
                                              asym, True, tuple(sorted(config.items())))
    assert kernel is qm._swap_kernel and consts["BK"] == min(128, group or 128)
    assert consts["BM"] == (16 if M <= 16 else 32 if M <= 32 else 64) and grid == (-(-48 // cfg["BN"]), -(-M // consts["BM"]), split)
    assert consts["EVEN_K"] is (K % consts["BK"] == 0) and consts["num_stages"] == cfg.get("STAGES", 1)
    assert consts["ONE_DOT"] is (cfg.get("ONE_DOT", True) or consts["BK"] < 128)
    out = quant_matmul(x, w, s, z, 4, group, bias=bias, config=config)
    assert out.dtype == dtype and out.shape == (M, 48)
    ref = reference_quant_matmul(x, w, s, z, 4, group).cpu() + bias.double().cpu()
    assert rel_err(out, ref) < TOL[dtype]


def _lop3(a: int, b: int, c: int, lut: int) -> int:
    """PTX ``lop3.b32``: bit i of the result is bit ``4 a_i + 2 b_i + c_i`` of ``lut``."""
    out = 0
    for i in range(32):
        if lut >> ((a >> i & 1) << 2 | (b >> i & 1) << 1 | (c >> i & 1)) & 1:
            out |= 1 << i
    return out


def _prmt(a: int, b: int, selector: int) -> int:
    """PTX ``prmt.b32`` (default mode): byte i of the result is byte ``selector`` nibble i of
    (b, a) (bytes 0-3 of a, 4-7 of b), or that byte's sign replicated where the nibble's top bit is set."""
    src = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
    out = 0
    for i in range(4):
        sel = selector >> 4 * i & 0xF
        byte = src[sel & 7]
        out |= ((0xFF if byte & 0x80 else 0) if sel & 8 else byte) << 8 * i
    return out


def test_swap_kernel_ptx_makes_every_nibble_pair_its_exact_value():
    """The swap kernel's inline PTX runs on NVIDIA GPUs only (the interpreter takes a float32
    path), so its constants are checked here bit for bit: the prmt selectors that pair two words
    against the interpreter's shifts and masks; for each 16-bit format, the lop3's mask,
    magic exponent and truth table and the packed multiply-add's 1.0, emulated on words holding
    every pair of codes (with every other bit set, which the mask must drop), and the addend the
    kernel builds from its BASE, give exactly ``u - off`` for every code u and every offset 8 + z
    of a zero point z in [-8, 7]."""
    import inspect
    import random
    import re

    from inferkit.kernels import quant_matmul as qm

    # the word pairs: prmt as the interpreter's shifts and masks make them
    selectors = [int(v, 16) for v in re.findall(r"prmt\.b32 \$0, \$1, \$2, (0x[0-9A-Fa-f]+);",
                                                inspect.getsource(qm._word_pairs.fn))]
    assert len(selectors) == 2 and _prmt(0x03020100, 0x07060504, 0x7531) == 0x07050301  # the PTX manual's numbering
    rng = random.Random(0)
    for a, b in [(0, 0xFFFFFFFF), (0x89ABCDEF, 0x01234567)] + [(rng.getrandbits(32), rng.getrandbits(32))
                                                             for _ in range(200)]:
        assert [_prmt(a, b, sel) for sel in selectors] == [(a & 0xFFFF) | (b << 16 & 0xFFFFFFFF),
                                                           (a >> 16) | (b & 0xFFFF0000)], (hex(a), hex(b))
    src = inspect.getsource(qm._pair_values.fn)
    found = re.findall(r"lop3\.b32 t, \$1, (\d+), (\d+), (0x[0-9A-Fa-f]+); mov\.b32 one, (\d+);\"\s*"
                       r"\"\s*fma\.rn\.(f16x2|bf16x2) \$0, t, one, \$2;", src)
    assert sorted(f[-1] for f in found) == ["bf16x2", "f16x2"], src
    base = re.search(r"BASE: tl\.constexpr = ([\d.]+) if F16 else ([\d.]+)", inspect.getsource(qm._swap_tile.fn))
    assert base is not None
    halves = lambda word, dtype: (torch.tensor([word & 0xFFFF, word >> 16], dtype=torch.int32)  # noqa: E731
                                  .to(torch.int16).view(dtype))
    for mask, magic, lut, one, op in found:
        dtype = torch.float16 if op == "f16x2" else torch.bfloat16
        BASE = float(base.group(1) if dtype == torch.float16 else base.group(2))
        mask, magic, lut, one = int(mask), int(magic), int(lut, 16), int(one)
        assert halves(one, dtype).tolist() == [1.0, 1.0]
        for u_lo in range(16):
            u_hi = 15 - u_lo if u_lo % 2 else u_lo
            word = (0xFFF0FFF0 | u_lo | (u_hi << 16)) & 0xFFFFFFFF
            t = halves(_lop3(word, mask, magic, lut), dtype)
            assert t.tolist() == [BASE + u_lo, BASE + u_hi], (op, u_lo)
            for off in range(16):
                addend = torch.tensor(-(BASE + off)).to(dtype)  # as the kernel rounds it
                exact = t.double() * 1.0 + addend.double()  # fma: one rounding, of an exact sum
                assert exact.tolist() == [u_lo - off, u_hi - off]
                assert torch.equal(exact.to(dtype).double(), exact), (op, u_lo, off)


def test_swap_kernel_leaves_what_it_cannot_take_to_the_other_kernels():
    """Float32 inputs and groups under 16 values take the heuristic's kernel (same bits as
    without the config, launched for PDL if the config asked); 8-bit weights and a bad STAGES
    are errors."""
    from inferkit.kernels import quant_matmul as qm

    swap = {"BN": 32, "BK": 128, "SPLIT_K": 1, "num_warps": 4, "KERNEL": "swap"}
    x, w, s, z = quant_case(2, 24, 256, 4, 64, True, torch.float32, seed=1)
    assert qm._plan(2, 24, 256, 32, 4, 4, 64, torch.float32, torch.device(DEVICE), True, False,
                    tuple(sorted(swap.items())))[0] is qm._gemv_kernel
    for launch in ({"PDL": True}, {}):
        consts = qm._plan(2, 24, 256, 32, 4, 4, 64, torch.float32, torch.device(DEVICE), True, False,
                          tuple(sorted({**swap, **launch}.items())))[-1]
        assert consts.get("PDL", False) is (bool(launch) and (qm.INTERPRET or qm.pdl.capable(torch.device(DEVICE))))
    assert torch.equal(quant_matmul(x, w, s, z, 4, 64, config=swap), quant_matmul(x, w, s, z, 4, 64))
    x, w, s, z = quant_case(2, 24, 256, 4, 8, False, torch.float16, seed=2)
    assert torch.equal(quant_matmul(x, w, s, z, 4, 8, config=swap), quant_matmul(x, w, s, z, 4, 8))
    x, w, s, z = quant_case(2, 24, 256, 8, 64, False, torch.float16, seed=3)
    with pytest.raises(ValueError, match="4-bit weights"):
        quant_matmul(x, w, s, z, 8, 64, config=swap)
    x, w, s, z = quant_case(2, 24, 256, 4, 64, False, torch.float16, seed=3)
    with pytest.raises(ValueError, match="1-5 stages"):
        quant_matmul(x, w, s, z, 4, 64, config={**swap, "STAGES": 0})
    assert qm.swap_tile_k(128, 96, False) == 32 and qm.swap_tile_k(64, 4096, True) == 64
    assert qm.swap_tile_k(128, 8, False) is None and qm.swap_tile_k(128, 40, False) is None


def test_quant_matmul_bias_larger_batch_and_a_non_power_of_two_input():
    x, w, s, z = quant_case(40, 24, 96, 4, 32, False, torch.float32, seed=4)  # K = 3 groups of 32
    bias = torch.randn(24).to(DEVICE)
    out = quant_matmul(x, w, s, z, 4, 32, bias=bias)
    assert rel_err(out, reference_quant_matmul(x, w, s, z, 4, 32).cpu() + bias.double().cpu()) < 1e-5
    x, w, s, z = quant_case(2, 24, 96, 8, None, True, torch.float32, seed=5)  # per channel, K = 96
    assert rel_err(quant_matmul(x, w, s, z, 8, None), reference_quant_matmul(x, w, s, z, 8, None)) < 1e-5


@pytest.mark.parametrize("M, group, bits, one_dot", [(64, 32, 4, True), (64, 64, 4, True), (64, 128, 4, False),
                                                     (64, 32, 8, True), (64, 64, 8, False), (64, None, 8, True),
                                                     (32, 64, 4, True)])
def test_quant_matmul_64_row_tiles_the_compiler_rejects_joined_take_a_dot_per_value(M, group, bits, one_dot):
    """Triton (3.6 and 3.9) cannot compile the joined tile at 64-row tiles with one scale group per
    K tile when a warp spans 32 columns (seen on an H100, then mapped by compiling for sm_90, see
    test_kernels_sm90): those launches take the other path, and still give the reference's numbers."""
    from inferkit.kernels import quant_matmul as qm

    K = 512
    G = 1 if group is None else K // group
    *_, consts = qm._plan(M, 64, K, K * bits // 32, G, bits, group, torch.float16, torch.device(DEVICE), False, False, None)
    assert consts["BM"] == M and consts["ONE_DOT"] is one_dot
    x, w, s, z = quant_case(M, 64, K, bits, group, False, torch.float16, seed=M + bits)
    assert rel_err(quant_matmul(x, w, s, z, bits, group), reference_quant_matmul(x, w, s, z, bits, group)) < 2e-3


def test_quant_matmul_falls_back_to_a_dot_per_value_when_the_joined_tile_fails_to_compile(monkeypatch):
    """A joined tile the compiler rejects in a case mma_one_dot does not know: a warning, the same
    numbers from the dot-per-value form, and the cached plan launches that form from then on."""
    from inferkit.kernels import quant_matmul as qm

    real, launched = qm._mma_kernel, []

    class Rejecting:  # the kernel as a Triton that cannot compile ONE_DOT would run it
        def __getitem__(self, grid):
            def launch(*args, **consts):
                launched.append(consts["ONE_DOT"])
                if consts["ONE_DOT"]:
                    raise RuntimeError("PassManager::run failed")
                return real[grid](*args, **consts)
            return launch

    monkeypatch.setattr(qm, "_mma_kernel", Rejecting())
    qm._plan.cache_clear()
    try:
        x, w, s, z = quant_case(16, 64, 256, 4, 64, False, torch.float16, seed=3)
        with pytest.warns(RuntimeWarning, match="joined-tile MMA failed to compile for M=16 N=64 K=256"):
            out = quant_matmul(x, w, s, z, 4, 64)
        assert rel_err(out, reference_quant_matmul(x, w, s, z, 4, 64)) < 2e-3
        assert torch.equal(quant_matmul(x, w, s, z, 4, 64), out)  # no second warning, no second try
        assert launched == [True, False, False]
    finally:
        qm._plan.cache_clear()


def test_shipped_tables_are_served_for_their_gpu(monkeypatch):
    """Every table under kernels/configs/ (measured on a GPU) reads, is named after its GPU model,
    and the lookup gives each of its entries, as the launch plan accepts them, to that model only."""
    from pathlib import Path

    from inferkit.kernels import quant_matmul as qm
    from inferkit.kernels import tuned

    monkeypatch.delenv(tuned.ENV, raising=False)
    tables = sorted(Path(tuned.PACKAGED).glob("*.json"))
    assert any(p.name == "NVIDIA_H100_80GB_HBM3.json" for p in tables)
    tuned.clear_cache()
    try:
        for path in tables:
            device, entries = tuned.read_table(path)
            assert path.name == tuned.slug(device) + ".json" and entries
            for e in entries:
                cfg = tuned.lookup(e["M"], e["N"], e["K"], e["group"], e["bits"], device)
                assert cfg == {k: e[k] for k in (*tuned.TILE, *tuned.OPTIONAL) if k in e}  # PDL included
                assert tuned.lookup(e["M"], e["N"], e["K"], e["group"], e["bits"], "Some Other GPU") is None
                G = 1 if e["group"] >= e["K"] else -(-e["K"] // e["group"])
                kernel, *_ = qm._plan(e["M"], e["N"], e["K"], e["K"] * e["bits"] // 32, G, e["bits"], e["group"],
                                      torch.bfloat16, torch.device("cpu"), False, False, tuple(cfg.items()))
                assert kernel is (qm._gemv_kernel if tuned.kernel_for(e["M"], cfg) == "gemv" else qm._mma_kernel)
    finally:
        tuned.clear_cache()


def test_quant_matmul_launches_the_measured_config_for_its_gpu(tmp_path, monkeypatch):
    """A table for the GPU model (here a made-up one) replaces the heuristic for the shapes and
    row buckets it lists, and those launches still give the reference's numbers."""
    from inferkit.kernels import quant_matmul as qm
    from inferkit.kernels import tuned

    name = "Test GPU 1"
    base = {"bits": 4, "group": 64, "K": 256, "N": 40, "num_warps": 2}
    gemv = {"BN": 16, "BK": 64, "SPLIT_K": 2, "num_warps": 2, "VEC_X": False}
    mma = {"BN": 32, "BK": 128, "SPLIT_K": 2, "num_warps": 2, "ONE_DOT": False}
    tuned.write_table(tmp_path / f"{tuned.slug(name)}.json", name,
                      [{**base, "M": 1, **gemv}, {**base, "M": 9, **mma}])
    monkeypatch.setenv(tuned.ENV, str(tmp_path))
    monkeypatch.setattr(qm, "_device_name", lambda device: name)
    qm.reset_configs()
    try:
        dev = torch.device(DEVICE)
        assert dict(qm._picked(1, 40, 256, 64, dev, 4)) == gemv
        assert dict(qm._picked(12, 40, 256, 64, dev, 4)) == mma  # measured at 9 rows, serves 5-16
        assert dict(qm._picked(2, 40, 256, 64, dev, 4)) == pick_config(2, 40, 256, 64, dev)
        assert dict(qm._picked(1, 40, 256, 32, dev, 4)) == pick_config(1, 40, 256, 32, dev)
        for M in (1, 12):
            x, w, s, z = quant_case(M, 40, 256, 4, 64, True, torch.float32, seed=M)
            assert rel_err(quant_matmul(x, w, s, z, 4, 64), reference_quant_matmul(x, w, s, z, 4, 64)) < 1e-5
    finally:
        monkeypatch.undo()
        qm.reset_configs()


def test_config_heuristic(monkeypatch):
    cuda = torch.device("cuda")
    from inferkit.kernels import quant_matmul as qm

    monkeypatch.setitem(qm._SM_COUNT, cuda, 132)  # an H100
    # decode: a tile is one group along K, 2 rows per thread (8 warps from 128-input tiles); K split
    # to ~4 programs per SM, down to one tile per split. These are the H100 sweeps' fastest configs
    # or within 8% of them (benchmarks/results/*_h100.json)
    assert pick_config(1, 14336, 4096, 128, cuda) == {"BN": 128, "BK": 128, "SPLIT_K": 8, "num_warps": 8}
    assert pick_config(1, 4096, 14336, 128, cuda) == {"BN": 128, "BK": 128, "SPLIT_K": 16, "num_warps": 8}
    assert pick_config(1, 960, 576, 64, cuda) == {"BN": 128, "BK": 64, "SPLIT_K": 8, "num_warps": 4}  # 9 tiles of K
    assert pick_config(1, 576, 1536, 64, cuda) == {"BN": 128, "BK": 64, "SPLIT_K": 16, "num_warps": 4}
    assert pick_config(1, 4096, 4096, 4096, cuda) == {"BN": 64, "BK": 256, "SPLIT_K": 16, "num_warps": 4}  # per channel
    assert pick_config(2, 4096, 4096, 128, cuda) == {"BN": 64, "BK": 128, "SPLIT_K": 16, "num_warps": 4}
    assert pick_config(1, 128256, 2048, 128, cuda)["SPLIT_K"] == 1  # a vocabulary head fills the GPU alone
    # 3-4 rows: the MMA kernel (the GEMV pads 3 rows to 4; at 4 rows the MMA kernel won 6 of 7 shapes)
    assert pick_config(4, 4096, 4096, 128, cuda) == {"BN": 64, "BK": 128, "SPLIT_K": 4, "num_warps": 4, "KERNEL": "mma"}
    assert pick_config(3, 960, 576, 64, cuda)["KERNEL"] == "mma"
    assert pick_config(256, 14336, 4096, 128, cuda)["SPLIT_K"] == 1  # 448 MMA tiles fill it
    # 5-32 rows: K split 4 ways where it has the length (the H100 sweep's fastest at 8 and 32 rows)
    for M, N, K in ((8, 4096, 4096), (8, 14336, 4096), (32, 4096, 14336), (16, 960, 576)):
        assert pick_config(M, N, K, 128, cuda)["SPLIT_K"] == 4
    assert pick_config(33, 4096, 14336, 128, cuda)["SPLIT_K"] == 1  # above 32 rows: no split
    assert pick_config(8, 256, 256, 64, cuda)["SPLIT_K"] == 2  # 256 inputs: two tiles of 128, one per split
    assert pick_config(8, 576, 576, 32, cuda, bits=4)["BK"] == 128  # 16 words per MMA step
    assert pick_config(8, 576, 576, 32, cuda, bits=8)["BK"] == 64


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M", [1, 6])
def test_every_value_position_converts_exactly(bits, M):
    """One-hot inputs pick single weights: the output is exactly (q - zero) * scale, for every
    position in the word (incl. the top field with the sign bit) and every code."""
    vals, K, N = 32 // bits, 64, 2 ** bits
    q = (torch.arange(N)[:, None] + torch.arange(K)[None, :]) % N - N // 2  # every code at every position
    scale = torch.full((N, K // 32), 0.5)
    zero = torch.randint(-3, 4, (N, K // 32), generator=torch.Generator().manual_seed(0)).float()
    w = pack_int32(q, bits, dim=1).to(DEVICE)
    # the decode kernel's tiles of two groups (zero points per word) and of one group (per row)
    for config in ([None, {"BK": 32}] if M == 1 else [None]):
        for k0 in range(0, vals * 2, M):
            x = torch.zeros(M, K)
            for r in range(M):
                x[r, (k0 + r) % K] = 1.0
            out = quant_matmul(x.to(DEVICE), w, scale.to(DEVICE), zero.to(DEVICE), bits, 32, config=config).cpu()
            for r in range(M):
                k = (k0 + r) % K
                assert torch.equal(out[r], (q[:, k].float() - zero[:, k // 32]) * 0.5), (bits, k, config)


def test_decode_gemv_register_cap_and_its_override():
    """The heuristic's decode tiles of 8 warps (1 row, 2 rows per thread, tiles inside a group)
    launch capped at 64 registers, 80 with zero points; per-channel scales, tiles spanning groups,
    4 rows per thread or 4 warps run uncapped; a config's REG_CAP overrides the rule, and the
    numbers do not depend on it."""
    from inferkit.kernels import quant_matmul as qm

    dev = torch.device(DEVICE)
    plan = lambda M, zp, group=128, config=None: qm._plan(M, 256, 512, 64, 512 // (group or 512), 4, group,  # noqa: E731
                                                           torch.bfloat16, dev, zp, False, config)[-1]
    cfg = (("BN", 128), ("BK", 128), ("SPLIT_K", 1), ("num_warps", 8))
    assert plan(1, False, config=cfg)["maxnreg"] == 64
    assert plan(1, True, config=cfg)["maxnreg"] == 80  # zero points
    assert "maxnreg" not in plan(1, False, config=(("BN", 64),) + cfg[1:3] + (("num_warps", 4),))
    assert "maxnreg" not in plan(1, False, 64, config=cfg)  # two groups per tile
    assert "maxnreg" not in plan(1, False, None, config=cfg)  # per channel
    assert "maxnreg" not in plan(2, False, config=cfg)
    assert "maxnreg" not in plan(1, False, config=(("BN", 256),) + cfg[1:])  # 4 rows per thread
    assert "maxnreg" not in plan(1, False, config=cfg + (("REG_CAP", 0),))
    assert plan(1, True, config=cfg + (("REG_CAP", 96),))["maxnreg"] == 96
    # inputs addressed from a pointer stepping with the tile: uncapped tiles inside one group
    assert not plan(1, False, config=cfg)["X_STEP"]
    assert plan(1, False, config=cfg + (("REG_CAP", 0),))["X_STEP"]
    assert plan(1, True, config=(("BN", 64),) + cfg[1:3] + (("num_warps", 4),))["X_STEP"]
    assert not plan(1, False, 64, config=cfg)["X_STEP"]  # two groups per tile
    assert not plan(1, False, None, config=cfg)["X_STEP"]  # per channel
    x, w, s, z = quant_case(1, 256, 512, 4, 128, False, torch.bfloat16, seed=12)
    capped = quant_matmul(x, w, s, z, 4, 128, config=dict(cfg))
    assert torch.equal(capped, quant_matmul(x, w, s, z, 4, 128, config={**dict(cfg), "REG_CAP": 0}))
    assert rel_err(capped, reference_quant_matmul(x, w, s, z, 4, 128)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("M,group,asym,K,cfg", [
    (1, 64, False, 576, dict(BN=32, BK=64, SPLIT_K=1, num_warps=2)),  # 9 tiles in one split
    (1, 32, True, 448, dict(BN=16, BK=64, SPLIT_K=3, num_warps=1)),  # splits of 3, 3 and 1 tiles
    (2, None, True, 480, dict(BN=16, BK=128, SPLIT_K=2, num_warps=1)),  # per channel; K not a multiple of BK
    (1, 128, False, 384, dict(BN=32, BK=128, SPLIT_K=1, num_warps=8)),  # 3 tiles: all in flight at 3 ahead
], ids=["9tiles", "split3", "channel-oddK", "3tiles"])
def test_gemv_loading_tiles_further_ahead_gives_the_same_bits(M, group, asym, K, cfg):
    """PREFETCH 2 and 3, and the pipelined loop (STAGES 2-5), change when a tile's words are
    loaded, not the arithmetic: the same bits as 1 ahead, including splits shorter than the
    prefetch (whose extra loads are predicated off), and the reference's numbers. Both launch
    uncapped (a cap spills, or costs instructions). (The interpreter runs the pipelined loop as
    written; the copies it becomes are checked on a GPU and compiled for sm_90 in
    test_kernels_sm90.)"""
    from inferkit.kernels import quant_matmul as qm

    x, w, s, z = quant_case(M, 40, K, 4, group, asym, torch.bfloat16, seed=K)
    one = quant_matmul(x, w, s, z, 4, group, config={**cfg, "PREFETCH": 1})
    assert rel_err(one, reference_quant_matmul(x, w, s, z, 4, group)) < TOL[torch.bfloat16]
    for ahead in ({"PREFETCH": 2}, {"PREFETCH": 3}, {"STAGES": 2}, {"STAGES": 3}, {"STAGES": 5}):
        assert torch.equal(quant_matmul(x, w, s, z, 4, group, config={**cfg, **ahead}), one), ahead
    opts = qm.gemv_options(1, 4, 128, 128, 8, False, False, 128, True, prefetch=2)
    assert opts["PREFETCH"] == 2 and opts["STAGES"] == 0 and "maxnreg" not in opts
    opts = qm.gemv_options(1, 4, 128, 128, 8, False, False, 128, True, stages=4)
    assert opts["STAGES"] == 4 and "maxnreg" not in opts and opts["X_STEP"]
    assert qm.gemv_options(1, 4, 128, 128, 8, False, False, 128, True)["maxnreg"] == 64
    with pytest.raises(ValueError, match="PREFETCH 4"):
        quant_matmul(x, w, s, z, 4, group, config={**cfg, "PREFETCH": 4})
    for bad in ({"STAGES": 1}, {"STAGES": 3, "PREFETCH": 2}):
        with pytest.raises(ValueError, match="STAGES"):
            quant_matmul(x, w, s, z, 4, group, config={**cfg, **bad})
    # the MMA kernel's STAGES is its pipeline's depth (default 2), with the same numbers
    x8 = torch.cat([x] * 4)
    mma = {**cfg, "KERNEL": "mma", "BK": 128}
    plan = lambda config: qm._plan(8, 40, K, K // 8, s.shape[1], 4, group, x8.dtype,  # noqa: E731
                                   x8.device, asym, False, tuple(sorted(config.items())))[-1]
    assert plan(mma)["num_stages"] == 2 and plan({**mma, "STAGES": 4})["num_stages"] == 4
    assert torch.equal(quant_matmul(x8, w, s, z, 4, group, config={**mma, "STAGES": 4}),
                       quant_matmul(x8, w, s, z, 4, group, config=mma))
    with pytest.raises(ValueError, match="the MMA kernel's pipelined loop takes 2-5 stages"):
        quant_matmul(x8, w, s, z, 4, group, config={**mma, "STAGES": 0})


@pytest.mark.parametrize("M,group,cfg", [
    (1, 64, dict(BN=32, BK=64, SPLIT_K=4, num_warps=2)),  # K 576 in splits of 3, 3, 3 and 0 tiles
    (2, 64, dict(BN=32, BK=64, SPLIT_K=4, num_warps=2, PREFETCH=3)),
    (1, 64, dict(BN=32, BK=64, SPLIT_K=4, num_warps=2, STAGES=3)),
    (1, 64, dict(BN=32, BK=64, SPLIT_K=4, num_warps=4, KERNEL="swap")),
    (3, None, dict(BN=32, BK=128, SPLIT_K=1, num_warps=4, KERNEL="swap", ONE_DOT=False)),  # per channel: 4.5 tiles, one split
    (3, 64, dict(BN=32, BK=128, SPLIT_K=2, num_warps=4, KERNEL="mma")),
], ids=["gemv", "gemv-3ahead", "gemv-stages", "swap", "swap-per-value", "mma"])
def test_pdl_moves_the_wait_not_the_numbers(M, group, cfg):
    """PDL (a programmatic dependent launch) loads the first tiles' words before waiting for the
    kernel before, which takes the swap kernel's first tile out of its loop: the same bits as a
    plain launch, a split with no tiles included. The interpreter runs PDL's loops without the
    waits; where the compiled waits sit is checked in test_kernels_sm90, and chains of PDL
    launches in CUDA graphs on a GPU (tests/gpu)."""
    from inferkit.kernels import quant_matmul as qm

    x, w, s, z = quant_case(M, 40, 576, 4, group, True, torch.bfloat16, seed=11)
    plain = quant_matmul(x, w, s, z, 4, group, config=cfg)
    assert rel_err(plain, reference_quant_matmul(x, w, s, z, 4, group)) < TOL[torch.bfloat16]
    assert torch.equal(quant_matmul(x, w, s, z, 4, group, config={**cfg, "PDL": True}), plain)
    consts = qm._plan(M, 40, 576, 72, s.shape[1], 4, group, x.dtype, x.device, True, False,
                      tuple(sorted({**cfg, "PDL": True}.items())))[-1]
    hopper = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9
    assert consts["PDL"] is (hopper or qm.INTERPRET) and consts.get("launch_pdl", False) is hopper
    assert "PDL" not in qm._plan(M, 40, 576, 72, s.shape[1], 4, group, x.dtype, x.device, True, False,
                                 tuple(sorted(cfg.items())))[-1]
    with pytest.raises(ValueError, match="PDL 1: true or false"):
        quant_matmul(x, w, s, z, 4, group, config={**cfg, "PDL": 1})
    # pdl= (the runtime's option) over the config's: the config's tiles and kernel, launched for PDL or not
    plan = lambda c, launch: qm._plan(M, 40, 576, 72, s.shape[1], 4, group, x.dtype, x.device, True, False,  # noqa: E731
                                      tuple(sorted(c.items())), launch)
    assert plan(cfg, True)[-1] == consts and plan(cfg, True)[:2] == plan({**cfg, "PDL": True}, None)[:2]
    assert "PDL" not in plan({**cfg, "PDL": True}, False)[-1]
    assert torch.equal(quant_matmul(x, w, s, z, 4, group, config=cfg, pdl=True), plain)
    with pytest.raises(ValueError, match="pdl 1: True, False or None"):
        quant_matmul(x, w, s, z, 4, group, config=cfg, pdl=1)


def test_one_lop3_per_value_where_ptx_runs():
    """Values come out of their words by one inline PTX lop3 each on NVIDIA GPUs, except in the
    GEMV with zero points under a register cap (it spills there); the interpreter and AMD GPUs
    take the two-instruction form, and a launch plans what the GPU it is on can run."""
    from inferkit.kernels import quant_matmul as qm

    assert qm.field_lop3("gemv", False, 64, ptx=True)
    assert qm.field_lop3("gemv", True, None, ptx=True)  # zero points, uncapped
    assert not qm.field_lop3("gemv", True, 80, ptx=True)  # zero points, capped
    assert qm.field_lop3("mma", True, None, ptx=True)
    assert not any(qm.field_lop3(k, zp, None, ptx=False) for k in ("gemv", "mma") for zp in (False, True))
    dev = torch.device(DEVICE)
    for M in (1, 16):
        consts = qm._plan(M, 256, 512, 64, 4, 4, 128, torch.bfloat16, dev, False, False, None)[-1]
        assert consts["LOP3"] is (DEVICE == "cuda" and torch.version.hip is None)  # interpreted on a CPU: False


@pytest.mark.parametrize("M", [1, 2, 3])
def test_quant_matmul_bf16_inputs_at_any_offset_and_row_stride(M):
    """The decode kernel reads bf16 inputs as int32 pairs: a view that starts at an odd element or
    has an odd row stride is copied first, and gives the same numbers as a contiguous one."""
    x, w, s, z = quant_case(M, 40, 256, 4, 64, True, torch.bfloat16, seed=11)
    ref = quant_matmul(x, w, s, z, 4, 64)
    assert rel_err(ref, reference_quant_matmul(x, w, s, z, 4, 64)) < TOL[torch.bfloat16]
    wide = torch.zeros(M, 257, dtype=torch.bfloat16, device=x.device)
    wide[:, 1:] = x
    view = wide[:, 1:]  # odd offset, odd row stride
    assert view.data_ptr() % 4 and view.stride(0) % 2
    assert torch.equal(quant_matmul(view, w, s, z, 4, 64), ref)


@pytest.mark.parametrize("M", [1, 7])
def test_split_k_is_deterministic_and_resets_its_counters(M):
    """The last split of each tile adds the partials in split order: the same bits every call
    and whichever split finishes last; the arrival counters are back to zero afterwards."""
    from inferkit.kernels import quant_matmul as qm

    x, w, s, z = quant_case(M, 80, 1024, 4, 64, True, torch.float32, seed=9)
    cfg = {"BN": 16, "BK": 64 if M == 1 else 128, "SPLIT_K": 4}
    first = quant_matmul(x, w, s, z, 4, 64, config=cfg)
    assert torch.equal(first, quant_matmul(x, w, s, z, 4, 64, config=cfg))
    assert int(qm._counters(x.device).abs().sum()) == 0
    assert rel_err(first, reference_quant_matmul(x, w, s, z, 4, 64)) < 1e-5
    one = quant_matmul(x, w, s, z, 4, 64, config={**cfg, "SPLIT_K": 1})
    assert rel_err(first, one) < 1e-6


def test_attention_split_counts_are_powers_of_two():
    """The split count follows the context length; powers of two keep the merge kernel's
    compiled variants to a handful as contexts grow (a recompile costs ~1 s mid-decode)."""
    from inferkit.kernels.paged_attention import num_splits_for

    seen = {num_splits_for(b, h, ctx) for b in (1, 3, 8, 64) for h in (1, 3, 8) for ctx in range(1, 5000, 7)}
    assert seen <= {1, 2, 4, 8, 16, 32, 64} and len(seen) >= 5


# -- the runtime with the Triton backends ------------------------------------------------------
PROMPTS = [[5, 17, 30, 2, 99], list(range(40, 75)), [300, 2, 3]]


@pytest.mark.parametrize("model", ["dense", "w4", "qwen2"])
def test_runtime_greedy_is_identical_with_the_triton_backends(tiny_llama, w4_mixed_artifact, tiny_models, model):
    """Triton attention, matmuls and element-wise kernels against the reference backends; qwen2
    brings a bias on q/k/v into the fused RoPE."""
    from inferkit.runtime import LLM, SamplingParams
    from inferkit.runtime.linear import TritonQuantLinear

    folder = {"dense": tiny_llama, "w4": w4_mixed_artifact, "qwen2": tiny_models["qwen2"]}[model]
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    ref = LLM(folder, device=DEVICE, linear_backend="reference", attention_backend="torch")
    tri = LLM(folder, device=DEVICE, linear_backend="triton", attention_backend="triton", block_size=8, cuda_graphs=False)
    assert tri.engine.backends == {"linear": "triton", "attention": "triton"}
    if model == "w4":
        layer = tri.engine.model.layers[0]
        assert isinstance(layer.qkv, TritonQuantLinear) and isinstance(layer.down, TritonQuantLinear)
        assert layer.qkv.packed.dtype == torch.int32  # the artifact's words, as stored
    assert [o.token_ids for o in tri.generate(PROMPTS, greedy)] == [o.token_ids for o in ref.generate(PROMPTS, greedy)]
    ids = list(range(3, 40))
    assert (tri.score(ids) - ref.score(ids)).abs().max() < 1e-4


def test_runtime_pdl_option_launches_every_quantized_matmul_for_pdl(w4_mixed_artifact, monkeypatch):
    """``pdl=True``: every Triton-quantized matmul (the draft's too) is launched with ``pdl=True``,
    over the tables, and gives the plain launches' tokens and scores (the interpreter runs the
    PDL loops without the waits; the GPU test checks the real launches). It needs the Triton
    linears, and is a bool."""
    from inferkit.errors import InferkitError
    from inferkit.kernels import quant_matmul as qm
    from inferkit.runtime import LLM, SamplingParams
    from inferkit.runtime.linear import TritonQuantLinear

    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    options = dict(device=DEVICE, linear_backend="triton", attention_backend="triton", block_size=8, cuda_graphs=False)
    plain = LLM(w4_mixed_artifact, **options)
    assert plain.engine.pdl is False
    assert {lin.pdl for lin in plain.engine.model.linears() if isinstance(lin, TritonQuantLinear)} == {None}
    launched = []
    real = qm.quant_matmul
    monkeypatch.setattr(qm, "quant_matmul", lambda *a, **kw: (launched.append(kw.get("pdl")), real(*a, **kw))[1])
    drafted = LLM(w4_mixed_artifact, pdl=True, draft=str(w4_mixed_artifact), **options).engine
    quantized = [lin for m in (drafted.model, drafted.draft) for lin in m.linears() if isinstance(lin, TritonQuantLinear)]
    assert len(quantized) == 2 * 4 * drafted.spec.num_layers and {lin.pdl for lin in quantized} == {True}
    llm = LLM(w4_mixed_artifact, pdl=True, **options)
    assert llm.engine.pdl is (DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9)
    got = [o.token_ids for o in llm.generate(PROMPTS, greedy)]
    assert launched and set(launched) == {True}
    monkeypatch.undo()
    assert got == [o.token_ids for o in plain.generate(PROMPTS, greedy)]
    ids = list(range(3, 40))
    assert torch.equal(llm.score(ids), plain.score(ids))
    with pytest.raises(InferkitError, match="pdl: programmatic dependent launches are the Triton matmul's, "
                                            "and the linear backend is torch"):
        LLM(w4_mixed_artifact, device=DEVICE, linear_backend="torch", pdl=True)
    with pytest.raises(InferkitError, match="pdl must be true or false, got 1"):
        LLM(w4_mixed_artifact, device=DEVICE, pdl=1)


def test_every_kernel_launch_states_its_multiply_add_contraction(w4_mixed_artifact, monkeypatch):
    """Each Triton launch of a generation (prefill and decode, both matmul kernels, attention, the
    element-wise kernels) passes ``enable_fp_fusion`` itself: on as measured on the GPUs, off in
    the RoPE kernel (PyTorch's rounding). Left unset, Triton 3.9 warns and 3.10 turns it off."""
    from inferkit.kernels import quant_matmul as qm
    from inferkit.runtime import LLM, SamplingParams

    launches = []
    kind = type(qm._gemv_kernel)  # JITFunction, or InterpretedFunction under the interpreter
    real_run = kind.run

    def run(self, *args, **kwargs):
        launches.append((self.fn.__name__, kwargs.get("enable_fp_fusion")))
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(kind, "run", run)
    llm = LLM(w4_mixed_artifact, device=DEVICE, linear_backend="triton", attention_backend="triton", block_size=8,
              cuda_graphs=False)
    greedy = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm.generate(PROMPTS, greedy)  # 3-row decode steps: the MMA kernel
    llm.generate(PROMPTS[:1], greedy)  # 1 row: the GEMV
    fusion = dict(launches)
    assert {"_gemv_kernel", "_mma_kernel", "_decode_split_kernel", "_prefill_kernel", "_rms_norm_kernel",
            "_rope_store_kernel", "_silu_mul_kernel"} <= set(fusion)
    assert {name for name, on in launches if on is not True} == {"_rope_store_kernel"}
    assert {on for name, on in launches if name == "_rope_store_kernel"} == {False}


def test_serve_test_pdl_flag_reaches_the_engine_and_the_report(w4_mixed_artifact, tmp_path):
    """serve-test --pdl: the option in the report's config, whether the GPU ran PDL launches
    (``pdl_launches``: only on sm_90+), and the summary's row saying which."""
    import json

    from typer.testing import CliRunner

    from inferkit.cli.main import app

    hopper = DEVICE == "cuda" and torch.cuda.get_device_capability()[0] >= 9
    args = ["serve-test", str(w4_mixed_artifact), "-o", str(tmp_path / "st"), "--device", DEVICE, "--linear-backend",
            "triton", "--pdl", "--no-quality", "--num-requests", "2", "--prompt-len", "4:6", "--output-len", "2:3",
            "--max-model-len", "32", "--num-kv-blocks", "8"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "st" / "report.json").read_text())
    assert report["config"]["pdl"] is True and report["pdl_launches"] is hopper
    assert report["load"]["failed_requests"] == 0 and report["backends"]["linear"] == "triton"
    row = next(line for line in result.output.splitlines() if "matmul launches" in line)
    assert [c.strip() for c in row.strip("│ ").split("│")] == ["matmul launches", "PDL" if hopper else "plain (PDL needs sm_90+)"]


def test_runtime_chunked_prefill_mixed_with_decodes_on_the_triton_kernels(tiny_llama):
    """A small token budget splits the long prompt into chunks that start mid-sequence and share
    steps with other sequences' decodes: the prefill kernel (all chunks of a step in one launch)
    and the decode kernel together give the reference backend's tokens."""
    from inferkit.runtime import LLM, SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[5, 17, 30, 2, 99, 7, 8, 9, 10, 11, 12], list(range(40, 75)), [300, 2, 3]]
    ref = LLM(tiny_llama, device=DEVICE, linear_backend="reference", attention_backend="torch")
    tri = LLM(tiny_llama, device=DEVICE, attention_backend="triton", block_size=4, cuda_graphs=False,
              max_num_batched_tokens=16)
    steps = []
    forward = tri.engine.model.forward
    tri.engine.model.forward = lambda ids, pos, meta, *a: (steps.append(meta), forward(ids, pos, meta, *a))[1]
    assert [o.token_ids for o in tri.generate(prompts, greedy)] == [o.token_ids for o in ref.generate(prompts, greedy)]
    mid = [m for m in steps if m.prefill_info is not None and (m.prefill_info[:, 1] > 0).any()]
    mixed = [m for m in mid if m.decode_rows is not None]
    assert mid and mixed  # chunks starting mid-sequence, some in steps with decodes
    assert max(len(m.prefill_info) for m in steps if m.prefill_info is not None) >= 2  # several chunks, one launch


def test_triton_backend_errors(tiny_llama, monkeypatch):
    from inferkit.errors import InferkitError
    from inferkit.runtime import LLM

    with pytest.raises(InferkitError, match="attention_backend must be one of"):
        LLM(tiny_llama, attention_backend="flash")
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(InferkitError, match="linear_backend=triton needs a CUDA device"):
            LLM(tiny_llama, linear_backend="triton")
        assert LLM(tiny_llama).engine.backends == {"linear": "packed", "attention": "torch"}


@pytest.mark.parametrize("M", [1, 3, 9])
@pytest.mark.parametrize("split", [1, 3])
def test_quant_matmul_adds_the_bias_in_the_kernel(M, split):
    """Bias added before the output's rounding, in the GEMV and MMA kernels, with and without
    split-K (the last split adds it), whatever the bias dtype."""
    for dtype, bias_dtype in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                              (torch.float16, torch.float32)):
        x, w, s, z = quant_case(M, 40, 256, 4, 64, True, dtype, seed=M + split)
        bias = (torch.randn(40, generator=torch.Generator().manual_seed(split)) * 3).to(bias_dtype).to(DEVICE)
        cfg = {"SPLIT_K": split, "BN": 16, **({"BK": 64} if M <= 4 else {})}
        out = quant_matmul(x, w, s, z, 4, 64, bias=bias, config=cfg)
        ref = reference_quant_matmul(x, w, s, z, 4, 64).cpu() + bias.double().cpu()
        assert out.dtype == dtype and rel_err(out, ref) < TOL[dtype], (dtype, bias_dtype)
    with pytest.raises(ValueError, match="bias of shape \\(41,\\) for 40 outputs"):
        quant_matmul(x, w, s, z, 4, 64, bias=torch.zeros(41, device=DEVICE))


@pytest.mark.parametrize("M", [1, 2, 4])
def test_the_mma_kernel_also_serves_up_to_four_rows(M):
    """KERNEL=mma: a tuned table may pick the tensor-core kernel where the GEMV would be the
    default (a speculative verify's 2-4 rows); same numbers, with zero points and split-K."""
    for dtype in (torch.float32, torch.bfloat16):
        x, w, s, z = quant_case(M, 40, 512, 4, 64, True, dtype, seed=M)
        for cfg in ({"KERNEL": "mma", "BK": 128, "BN": 32}, {"KERNEL": "mma", "BK": 128, "BN": 32, "SPLIT_K": 2}):
            out = quant_matmul(x, w, s, z, 4, 64, config=cfg)
            assert rel_err(out, reference_quant_matmul(x, w, s, z, 4, 64)) < TOL[dtype], (dtype, cfg)


@pytest.mark.parametrize("M", [3, 4])
def test_three_and_four_rows_take_the_mma_kernel_unless_a_config_says_gemv(M):
    """The heuristic picks the MMA kernel at 3-4 rows; a config (a table entry, the tuner's
    candidate) without KERNEL means the default there, the GEMV, whatever the heuristic chose."""
    from inferkit.kernels import quant_matmul as qm

    x, w, s, z = quant_case(M, 40, 512, 4, 64, False, torch.bfloat16, seed=M)
    plan = lambda config: qm._plan(M, 40, 512, 64, 8, 4, 64, x.dtype, x.device, False, False, config)  # noqa: E731
    assert plan(None)[0] is qm._mma_kernel
    gemv = (("BK", 64), ("BN", 32), ("SPLIT_K", 2), ("num_warps", 4))
    assert plan(gemv)[0] is qm._gemv_kernel
    out = quant_matmul(x, w, s, None, 4, 64, config=dict(gemv))
    assert rel_err(out, reference_quant_matmul(x, w, s, None, 4, 64)) < TOL[torch.bfloat16]


def test_quant_matmul_refuses_bad_arguments_with_the_reason():
    x, w, s, z = quant_case(1, 24, 96, 4, 32, False, torch.float32, seed=7)
    with pytest.raises(ValueError, match="bits must be 4 or 8, got 3"):
        quant_matmul(x, w, s, z, 3, 32)
    with pytest.raises(ValueError, match="packed width 12 does not match 192 inputs"):
        quant_matmul(torch.cat([x, x], 1), w, s, z, 4, 32)
    with pytest.raises(ValueError, match="group size 48: must be a multiple of 8 values per word, with 2 scales"):
        quant_matmul(x, w, s, z, 4, 48)
    with pytest.raises(ValueError, match="BK 64 too small"):
        quant_matmul(torch.cat([x] * 5), w, s, z, 4, 32, config={"BK": 64})
    with pytest.raises(ValueError, match="x must be"):
        quant_matmul(x[0], w, s, z, 4, 32)
    with pytest.raises(ValueError, match="KERNEL 'gemv': 'mma', 'swap', or 'gemv' for up to 4 rows"):
        quant_matmul(torch.cat([x] * 5), w, s, z, 4, 32, config={"KERNEL": "gemv"})
    with pytest.raises(ValueError, match="BK 64 too small"):
        quant_matmul(x, w, s, z, 4, 32, config={"KERNEL": "mma", "BK": 64})
