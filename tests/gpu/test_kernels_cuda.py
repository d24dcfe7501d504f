"""Kernel behaviour only a GPU shows (skipped without CUDA): how many variants get compiled as
a decode goes on (each compile stalls a step for about a second)."""

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def compiled_variants(fn) -> int | None:
    caches = getattr(fn, "device_caches", None)  # Triton 3.x: device -> (kernel cache, ...)
    if not caches:
        return None
    return sum(len(v[0]) for v in caches.values() if isinstance(v, tuple) and isinstance(v[0], dict))


def test_growing_contexts_compile_a_handful_of_attention_variants():
    from inferkit.kernels.paged_attention import _decode_split_kernel, _merge_kernel, paged_decode_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    kc = torch.randn(200, 16, 2, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn_like(kc)
    # other tests in this process may have compiled other shapes: count what this one adds
    split0, merge0 = compiled_variants(_decode_split_kernel) or 0, compiled_variants(_merge_kernel) or 0
    for batch in (1, 3):
        q = torch.randn(batch, 8, 64, device="cuda", dtype=torch.bfloat16, generator=g)
        tables = torch.randint(0, 200, (batch, 128), device="cuda", dtype=torch.int32, generator=g)
        for ctx in range(1, 2048, 9):
            lens = torch.full((batch,), ctx, device="cuda", dtype=torch.int32)
            paged_decode_attention(q, kc, vc, tables, lens, 0.125, ctx)
    torch.cuda.synchronize()
    split, merge = compiled_variants(_decode_split_kernel), compiled_variants(_merge_kernel)
    if split is None or merge is None:
        pytest.skip("this Triton keeps its compiled kernels elsewhere")
    split, merge = split - split0, merge - merge0
    assert split <= 2 and merge <= 6, (split, merge)  # one split or several; merges of 2..32 splits


def test_quant_matmul_variants_stay_bounded_across_row_counts():
    """A mixed prefill/decode step can have any number of rows: the compiled variants per
    layer shape stay a handful (rows tile x split), not one per row count."""
    from inferkit.kernels.quant_matmul import _gemv_kernel, _mma_kernel, quant_matmul
    from inferkit.quant.pack import pack_int32

    g = torch.Generator().manual_seed(0)
    w = pack_int32(torch.randint(-8, 8, (576, 1536), generator=g), 4, dim=1).cuda()
    s = (torch.rand(576, 1536 // 64, generator=g) * 0.01).to(torch.bfloat16).cuda()
    before = (compiled_variants(_gemv_kernel) or 0) + (compiled_variants(_mma_kernel) or 0)
    for m in range(1, 300, 7):
        quant_matmul(torch.randn(m, 1536, device="cuda", dtype=torch.bfloat16), w, s, None, 4, 64)
    torch.cuda.synchronize()
    after = compiled_variants(_gemv_kernel)
    if after is None:
        pytest.skip("this Triton keeps its compiled kernels elsewhere")
    assert after + compiled_variants(_mma_kernel) - before <= 12


def test_prefill_compiles_once_across_chunk_counts_and_table_widths():
    """Steps bring any number of chunks, of any length, with block tables as wide as the longest:
    none of that is a compile-time value."""
    from inferkit.kernels.paged_attention import _prefill_kernel, paged_prefill_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    kc = torch.randn(300, 16, 3, 64, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn_like(kc)
    before = compiled_variants(_prefill_kernel) or 0
    for chunks, n, start, width in ((1, 5, 0, 1), (2, 17, 3, 2), (3, 64, 100, 11), (4, 33, 31, 16), (2, 200, 700, 57)):
        q = torch.randn(chunks * n, 9, 64, device="cuda", dtype=torch.bfloat16, generator=g)
        tables = torch.randint(0, 300, (chunks, width), device="cuda", dtype=torch.int32, generator=g)
        info = torch.tensor([(c * n, start, n) for c in range(chunks)], dtype=torch.int32, device="cuda")
        paged_prefill_attention(q, kc, vc, tables, info, n, 0.125, torch.empty_like(q))
    torch.cuda.synchronize()
    after = compiled_variants(_prefill_kernel)
    if after is None:
        pytest.skip("this Triton keeps its compiled kernels elsewhere")
    assert after - before <= 1, after - before


def test_a_table_for_this_gpu_sets_the_tiles(tmp_path, monkeypatch):
    """A table named after this GPU model (as CUDA reports it) decides the launch for its shape."""
    from inferkit.kernels import quant_matmul as qm
    from inferkit.kernels import tuned
    from inferkit.quant.pack import pack_int32

    name = torch.cuda.get_device_name()
    cfg = {"BN": 32, "BK": 128, "SPLIT_K": 4, "num_warps": 2, "VEC_X": False}
    tuned.write_table(tmp_path / f"{tuned.slug(name)}.json", name,
                      [{"bits": 4, "group": 128, "K": 1024, "N": 96, "M": 1, **cfg}])
    monkeypatch.setenv(tuned.ENV, str(tmp_path))
    qm.reset_configs()
    try:
        assert dict(qm._picked(1, 96, 1024, 128, torch.device("cuda", torch.cuda.current_device()), 4)) == cfg
        g = torch.Generator().manual_seed(0)
        q = torch.randint(-8, 8, (96, 1024), generator=g)
        w = pack_int32(q, 4, dim=1).cuda()
        s = (torch.rand(96, 8, generator=g) * 0.01 + 0.001).cuda()
        x = torch.randn(1, 1024, generator=g).cuda()
        ref = x.double() @ (q.double().cuda() * s.double().repeat_interleave(128, 1)).T
        out = qm.quant_matmul(x, w, s, None, 4, 128)
        assert float((out.double() - ref).norm() / ref.norm()) < 1e-5
    finally:
        monkeypatch.undo()
        qm.reset_configs()


@pytest.mark.parametrize("M,cfg", [
    (1, dict(BN=64, BK=128, SPLIT_K=4, num_warps=2)),
    (1, dict(BN=128, BK=128, SPLIT_K=8, num_warps=8, PREFETCH=3)),
    (2, dict(BN=128, BK=128, SPLIT_K=4, num_warps=8, STAGES=4)),
    (1, dict(BN=128, BK=128, SPLIT_K=4, num_warps=4, KERNEL="swap")),
    (3, dict(BN=64, BK=128, SPLIT_K=8, num_warps=4, KERNEL="swap", ONE_DOT=False)),
    (8, dict(BN=64, BK=128, SPLIT_K=4, num_warps=4, KERNEL="mma", STAGES=3)),
], ids=["gemv", "gemv-3ahead", "gemv-stages", "swap", "swap-per-value", "mma"])
def test_pdl_chains_give_the_plain_launches_bits_eagerly_and_in_graphs(M, cfg):
    """Each matmul's output is the next one's input (with an element-wise kernel between some of
    them, launched plainly), every matmul a programmatic dependent launch: one that read its
    inputs before the one before it had written them, or wrote its partials while that one
    still read its own, would give other numbers. Eager and captured in a CUDA graph, replayed
    with new inputs, the chain gives the plain launches' bits (split-K sums in a fixed order)."""
    from inferkit.kernels.quant_matmul import quant_matmul
    from inferkit.quant.pack import pack_int32

    K = 2048
    g = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(3):  # q * s has about unit gain over K inputs: the chain neither blows up nor dies out
        q = torch.randint(-8, 8, (K, K), generator=g)
        s = (torch.rand(K, K // 128, generator=g) * 0.004 + 0.003).to(torch.bfloat16)
        layers.append((pack_int32(q, 4, dim=1).cuda(), s.cuda()))

    def chain(x, pdl):
        for i in range(12):
            w, s = layers[i % 3]
            x = quant_matmul(x, w, s, None, 4, 128, config={**cfg, "PDL": pdl})
            if i % 4 == 3:
                x = x * 0.5 + 0.25
        return x

    inputs = [torch.randn(M, K, generator=g).to(torch.bfloat16).cuda() for _ in range(3)]
    plain = [chain(x, False) for x in inputs]
    assert all(bool(p.float().abs().mean() > 0.05) and bool(p.isfinite().all()) for p in plain)
    for x, want in zip(inputs, plain):
        assert torch.equal(chain(x, True), want)
    static = inputs[0].clone()
    chain(static, True)  # compiled and planned outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(static, True)
    for x, want in zip(reversed(inputs), reversed(plain)):
        static.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
