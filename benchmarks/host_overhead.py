"""Host-side cost of each Triton kernel's Python wrapper (launch stubbed out) and of a step's input preparation.

    python benchmarks/host_overhead.py [--out benchmarks/results/host_overhead.json]

Steps that run eagerly (mixed prefill/decode steps; everything without CUDA graphs) call these
wrappers once per layer or per linear layer, so their own Python work adds up: this measures it
on any machine, GPU or not (Triton's launcher comes on top, and only a GPU can time that).
Shapes: a Llama-3-8B layer (32/8 heads of 128, 4096x14336 INT4 g128) at 1 and 8 rows.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


class _NoLaunch:
    """Stands in for a JIT kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def per_call_us(fn, calls: int) -> float:
    for _ in range(200):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def prepare_rows(calls: int) -> list[dict]:
    """ModelRunner.prepare for an eager mixed step: 32 decodes at contexts ~900-1100 plus one
    480-token prefill chunk after 1000 cached tokens (16-token blocks), for each attention backend."""
    from types import SimpleNamespace

    from inferkit.runtime.model_runner import Chunk, ModelRunner

    seqs = [SimpleNamespace(token_ids=list(range(900 + 7 * i)), block_table=list(range(i * 100, i * 100 + 70)))
            for i in range(32)]
    long = SimpleNamespace(token_ids=list(range(2000)), block_table=list(range(5000, 5126)))
    chunks = [Chunk(s, len(s.token_ids) - 1, 1) for s in seqs] + [Chunk(long, 1000, 480)]
    rows = []
    for backend in ("torch", "triton"):
        runner = ModelRunner.__new__(ModelRunner)  # prepare needs only these
        runner.block_size, runner.device, runner.triton = 16, torch.device("cpu"), backend == "triton"
        runner.cache = SimpleNamespace(zero_slot=10**6, block_size=16)
        rows.append({"wrapper": f"ModelRunner.prepare ({backend} attention)",
                     "shape": "32 decodes + a 480-token chunk", "us": per_call_us(lambda: runner.prepare(chunks), calls)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/host_overhead.json"))
    parser.add_argument("--calls", type=int, default=5000)
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    from inferkit.kernels import fused, paged_attention, quant_matmul
    from inferkit.quant.pack import pack_int32

    for mod, names in ((quant_matmul, ("_gemv_kernel", "_mma_kernel")), (fused, ("_rope_store_kernel", "_rms_norm_kernel", "_silu_mul_kernel")),
                       (paged_attention, ("_decode_split_kernel", "_merge_kernel"))):
        for name in names:
            setattr(mod, name, _NoLaunch())
    quant_matmul.reset_configs()

    K, N = 4096, 14336
    w = pack_int32(torch.randint(-8, 8, (N, K), dtype=torch.int8), 4, dim=1)
    s = torch.rand(N, K // 128).to(torch.bfloat16)
    rows = []
    for M in (1, 8):
        x = torch.randn(M, K, dtype=torch.bfloat16)
        rows.append({"wrapper": "quant_matmul", "shape": f"{M}x{K} @ INT4 {K}x{N} g128",
                     "us": per_call_us(lambda: quant_matmul.quant_matmul(x, w, s, None, 4, 128), args.calls)})
    blocks, block_size = 512, 16
    kc = torch.zeros(blocks, block_size, 8, 128, dtype=torch.bfloat16)
    vc = torch.zeros_like(kc)
    for batch in (1, 8):
        q = torch.randn(batch, 32, 128, dtype=torch.bfloat16)
        tables = torch.zeros(batch, 64, dtype=torch.int32)
        lens = torch.full((batch,), 1000, dtype=torch.int32)
        rows.append({"wrapper": "paged_decode_attention", "shape": f"batch {batch}, 32/8 heads, context 1000",
                     "us": per_call_us(lambda: paged_attention.paged_decode_attention(q, kc, vc, tables, lens, 0.088,
                                                                                       1000), args.calls)})
        qkv = torch.randn(batch, 48 * 128, dtype=torch.bfloat16)
        cos = torch.randn(4096, 128, dtype=torch.bfloat16)
        positions, slots = torch.arange(batch), torch.arange(batch)
        rows.append({"wrapper": "rope_store", "shape": f"{batch} tokens, 32/8 heads of 128",
                     "us": per_call_us(lambda: fused.rope_store(qkv, cos, cos, positions, 32, 8, kc, vc, slots),
                                       args.calls)})
        h = torch.randn(batch, 4096, dtype=torch.bfloat16)
        norm = torch.ones(4096, dtype=torch.bfloat16)
        rows.append({"wrapper": "rms_norm (with the residual add)", "shape": f"{batch}x4096",
                     "us": per_call_us(lambda: fused.rms_norm(h, norm, 1e-5, h), args.calls)})
        gate_up = torch.randn(batch, 2 * 14336, dtype=torch.bfloat16)
        rows.append({"wrapper": "silu_mul", "shape": f"{batch}x{2 * 14336}",
                     "us": per_call_us(lambda: fused.silu_mul(gate_up), args.calls)})

    rows += prepare_rows(args.calls // 10)

    table = Table(title="Host time per call: kernel wrappers (launch stubbed out) and a step's input "
                        "preparation (best of 5)")
    for col in ("wrapper", "shape", "us per call"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["wrapper"], r["shape"], f"{r['us']:.1f}")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
