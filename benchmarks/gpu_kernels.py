"""The Triton kernels and the runtime on a CUDA GPU (run by benchmarks/gpu.sh).

    python benchmarks/gpu_kernels.py --out bench_out/gpu_kernels.json [--skip-e2e]

1. Memory-copy bandwidth (a 1 GiB device-to-device copy, bytes read + written): the ceiling.
2. Paged decode attention, Llama-3-8B heads (32 query / 8 KV heads, dim 128, bf16, 16-token
   blocks, shuffled): batch 1/16/64 x context 512/4096. KV bytes read / time, against the copy
   bandwidth and against PyTorch SDPA over a contiguous cache of the same K/V.
   Paged prefill attention (same heads): 4 chunks of 512 new tokens after 0 and 3584 cached
   ones, the Triton kernel against the PyTorch path (gather + SDPA per chunk).
3. Dequantizing matmul, K x N = 4096x4096, 4096x14336, 14336x4096 (in x out), batch 1/8/32:
   INT4 (g128, symmetric) and INT8 (per channel) through the Triton kernel, bf16 through
   torch.matmul; time and weight bytes / time. Plus a sweep of INT4 tile configs per shape and
   batch (and at 4 rows, a speculative verify's, the GEMV against the MMA kernel), written as a tuned table (<out folder>/tuned/<GPU>.json, see inferkit.kernels.tuned).
4. End to end: a Llama-3.2-1B-shaped random-weight model in bf16, decode tokens/s of the runtime
   (Triton kernels, CUDA graphs) and of transformers' generate(), batch 1 and 32, 128 new tokens.

Times: medians of triton.testing.do_bench (which clears the L2 cache between runs; each call
pays Triton's Python launch, tens of microseconds), and "graphed": calls captured in a CUDA
graph over enough operand copies to exceed L2, i.e. the kernels' own time, as the runtime
replays them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


DEV = "cuda"
SMOKE = False  # --smoke: tiny shapes on the CPU under TRITON_INTERPRET=1, to check this script


def bench(fn) -> float:
    if SMOKE:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3  # seconds


def bench_graphed(make_call, nbytes: int) -> float:
    """Seconds per call with launch overhead removed: calls captured in a CUDA graph and replayed,
    cycling through enough copies of the operands (``make_call(i)``) to exceed the L2 cache
    (``inferkit.kernels.tune.time_call``, which ``inferkit tune-kernels`` times with too)."""
    from inferkit.kernels.tune import time_call

    return time_call(make_call, nbytes, torch.device(DEV))


def copy_bandwidth() -> float:
    src = torch.empty(2**10 if SMOKE else 2**29, dtype=torch.float16, device=DEV).normal_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    return 2 * src.numel() * 2 / t


def attention(copy_bw: float) -> list[dict]:
    from inferkit.kernels.paged_attention import paged_decode_attention

    rows = []
    heads, kv_heads, dim, bs = 32, 8, 128, 16
    for batch in ((1, 2) if SMOKE else (1, 16, 64)):
        for ctx in ((32,) if SMOKE else (512, 4096)):
            blocks = batch * ctx // bs
            g = torch.Generator(device=DEV).manual_seed(0)
            kc = torch.randn(blocks + 1, bs, kv_heads, dim, device=DEV, dtype=torch.bfloat16, generator=g)
            vc = torch.randn_like(kc)
            tables = torch.randperm(blocks, device=DEV, generator=g).view(batch, ctx // bs).to(torch.int32)
            lens = torch.full((batch,), ctx, dtype=torch.int32, device=DEV)
            q = torch.randn(batch, heads, dim, device=DEV, dtype=torch.bfloat16, generator=g)
            scale = dim ** -0.5
            t_tri = bench(lambda: paged_decode_attention(q, kc, vc, tables, lens, scale, ctx))
            kv_bytes = 2 * batch * ctx * kv_heads * dim * 2
            # graphed: copies of the block tables over one pool would hit L2 for small shapes, so
            # each copy gets its own pool (the bigger shapes need no copies)
            pools = [(kc, vc)] + [(torch.randn_like(kc), torch.randn_like(vc))
                                  for _ in range(max(0, min(15, -(-256 * 2**20 // kv_bytes)) - 1))]
            t_graph = bench_graphed(lambda i: (lambda: paged_decode_attention(
                q, pools[i % len(pools)][0], pools[i % len(pools)][1], tables, lens, scale, ctx)), kv_bytes)
            # SDPA over a contiguous copy of the same K/V (what a non-paged cache would hold).
            k = kc[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()  # [B, KVH, ctx, D]
            v = vc[tables.long()].flatten(1, 2).transpose(1, 2).contiguous()
            qg = q.view(batch, kv_heads, heads // kv_heads, dim)
            sdpa = torch.nn.functional.scaled_dot_product_attention
            t_sdpa = bench(lambda: sdpa(qg, k, v, scale=scale))
            ref = sdpa(qg.float(), k.float(), v.float(), scale=scale).reshape(batch, heads, dim)
            out = paged_decode_attention(q, kc, vc, tables, lens, scale, ctx)
            err = float((out.float() - ref).norm() / ref.norm())
            row = {"batch": batch, "context": ctx, "triton_us": t_tri * 1e6, "sdpa_contiguous_us": t_sdpa * 1e6,
                   "triton_gb_s": kv_bytes / t_tri / 1e9, "sdpa_gb_s": kv_bytes / t_sdpa / 1e9,
                   "triton_vs_copy": kv_bytes / t_tri / copy_bw, "rel_err": err,
                   "triton_graphed_us": t_graph * 1e6, "triton_graphed_gb_s": kv_bytes / t_graph / 1e9,
                   "triton_graphed_vs_copy": kv_bytes / t_graph / copy_bw}
            rows.append(row)
            print("attention", json.dumps(row), flush=True)
            torch.cuda.empty_cache()
    return rows


def prefill() -> list[dict]:
    """Paged prefill attention, Llama-3-8B heads, bf16: 4 chunks of 512 new tokens, after no
    cached prefix and after 3584 cached tokens; the Triton kernel (all chunks in one launch)
    against the PyTorch path (per chunk: gather the blocks, repeat K/V per query head, SDPA),
    in TFLOP/s of the causal attention done."""
    from inferkit.kernels.paged_attention import paged_prefill_attention
    from inferkit.runtime.attention import prefill_attention

    rows = []
    heads, kv_heads, dim, bs = 32, 8, 128, 16
    chunks, n = (2, 24) if SMOKE else (4, 512)
    for start in ((0, 8) if SMOKE else (0, 3584)):
        ctx = start + n
        per = -(-ctx // bs)
        g = torch.Generator(device=DEV).manual_seed(0)
        kc = torch.randn(chunks * per + 1, bs, kv_heads, dim, device=DEV, dtype=torch.bfloat16, generator=g)
        vc = torch.randn_like(kc)
        tables = torch.randperm(chunks * per, device=DEV, generator=g).view(chunks, per).to(torch.int32)
        info = torch.tensor([(c * n, start, n) for c in range(chunks)], dtype=torch.int32, device=DEV)
        q = torch.randn(chunks * n, heads, dim, device=DEV, dtype=torch.bfloat16, generator=g)
        out = torch.empty_like(q)
        scale = dim ** -0.5

        def torch_path():
            for c in range(chunks):
                out[c * n:(c + 1) * n] = prefill_attention(q[c * n:(c + 1) * n], kc, vc, tables[c].long(), start, scale)

        t_tri = bench(lambda: paged_prefill_attention(q, kc, vc, tables, info, n, scale, out))
        got = out.float().clone()
        t_torch = bench(torch_path)
        err = float((got - out.float()).norm() / out.float().norm())
        flops = chunks * heads * 4 * dim * (n * start + n * (n + 1) / 2)  # QK^T and PV over the causal keys
        row = {"chunks": chunks, "new_tokens": n, "cached": start, "triton_us": t_tri * 1e6,
               "torch_us": t_torch * 1e6, "triton_tflops": flops / t_tri / 1e12, "torch_tflops": flops / t_torch / 1e12,
               "speedup": t_torch / t_tri, "rel_err_vs_torch": err}
        rows.append(row)
        print("prefill", json.dumps(row), flush=True)
    return rows


def load_baseline(path: Path | None):
    """Another revision's ``kernels/quant_matmul.py`` as a module (``gpu.sh --prepare`` saves one to
    ``.gpu/baseline/``), to time its INT4 kernel beside this one on the same GPU; None without."""
    if path is None or not path.exists():
        return None
    import importlib.util

    spec = importlib.util.spec_from_file_location("quant_matmul_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def matmul(baseline=None) -> tuple[list[dict], list[dict], list[dict]]:
    from inferkit.kernels.quant_matmul import quant_matmul
    from inferkit.quant.pack import pack_int32

    rows, sweep, entries = [], [], []
    for K, N in (((256, 128),) if SMOKE else ((4096, 4096), (4096, 14336), (14336, 4096))):
        g = torch.Generator().manual_seed(0)
        q4 = torch.randint(-8, 8, (N, K), generator=g, dtype=torch.int8)
        w4 = pack_int32(q4, 4, dim=1).to(DEV)
        s4 = (torch.rand(N, K // 128, generator=g) * 0.01 + 0.001).to(torch.bfloat16).to(DEV)
        q8 = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int16).to(torch.int8)
        w8 = pack_int32(q8, 8, dim=1).to(DEV)
        s8 = (torch.rand(N, 1, generator=g) * 0.01 + 0.001).to(torch.bfloat16).to(DEV)
        w_ref = (q4.float() * s4.float().cpu().repeat_interleave(128, 1)).to(DEV)  # float32, the sweep's reference
        wb = w_ref.to(torch.bfloat16)
        for M in (1, 8, 32):
            x = torch.randn(M, K, dtype=torch.bfloat16, device=DEV)
            t_bf16 = bench(lambda: torch.matmul(x, wb.T))
            t_i4 = bench(lambda: quant_matmul(x, w4, s4, None, 4, 128))
            t_i8 = bench(lambda: quant_matmul(x, w8, s8, None, 8, None))
            b16, b4, b8 = K * N * 2, K * N // 2 + N * K // 128 * 2, K * N + N * 2
            copies4 = [(w4, s4)] + [(w4.clone(), s4.clone()) for _ in range(max(0, min(15, -(-256 * 2**20 // b4)) - 1))]
            copies8 = [(w8, s8)] + [(w8.clone(), s8.clone()) for _ in range(max(0, min(15, -(-256 * 2**20 // b8)) - 1))]
            copies16 = [wb] + [wb.clone() for _ in range(max(0, min(15, -(-256 * 2**20 // b16)) - 1))]
            g_i4 = bench_graphed(lambda i: (lambda: quant_matmul(x, *copies4[i % len(copies4)], None, 4, 128)), b4)
            g_i8 = bench_graphed(lambda i: (lambda: quant_matmul(x, *copies8[i % len(copies8)], None, 8, None)), b8)
            g_bf16 = bench_graphed(lambda i: (lambda: torch.matmul(x, copies16[i % len(copies16)].T)), b16)
            ref = torch.matmul(x.float(), wb.float().T)
            err = float((quant_matmul(x, w4, s4, None, 4, 128).float() - ref).norm() / ref.norm())
            row = {"K": K, "N": N, "M": M, "bf16_us": t_bf16 * 1e6, "int4_us": t_i4 * 1e6, "int8_us": t_i8 * 1e6,
                   "int4_speedup": t_bf16 / t_i4, "int8_speedup": t_bf16 / t_i8, "bf16_gb_s": b16 / t_bf16 / 1e9,
                   "int4_gb_s": b4 / t_i4 / 1e9, "int8_gb_s": b8 / t_i8 / 1e9, "int4_rel_err": err,
                   "graphed_bf16_us": g_bf16 * 1e6, "graphed_int4_us": g_i4 * 1e6, "graphed_int8_us": g_i8 * 1e6,
                   "graphed_int4_speedup": g_bf16 / g_i4, "graphed_int8_speedup": g_bf16 / g_i8,
                   "graphed_int4_gb_s": b4 / g_i4 / 1e9, "graphed_bf16_gb_s": b16 / g_bf16 / 1e9}
            if baseline is not None and M == 1:  # the same launch with the baseline revision's kernel
                g_base = bench_graphed(lambda i: (lambda: baseline.quant_matmul(x, *copies4[i % len(copies4)], None, 4,
                                                                                128)), b4)
                row.update(baseline_graphed_int4_us=g_base * 1e6, baseline_graphed_int4_speedup=g_bf16 / g_base)
            swept, best = config_sweep(K, N, M, copies4, w_ref, g_bf16)
            if best:  # the fastest correct config: what a tuned table makes the default on this GPU
                row.update(tuned_graphed_int4_us=best["us"], tuned_graphed_int4_speedup=g_bf16 * 1e6 / best["us"])
                print("int4 best config", json.dumps(best), flush=True)
                entries.append(best)
            rows.append(row)
            print("matmul", json.dumps(row), flush=True)
            sweep += swept
        # 4 rows (a speculative verify of 3 drafts): the sweep alone, GEMV against tensor cores
        x = torch.randn(4, K, dtype=torch.bfloat16, device=DEV)  # the shape's weight copies from above
        g_bf16 = bench_graphed(lambda i: (lambda: torch.matmul(x, copies16[i % len(copies16)].T)), b16)
        swept, best = config_sweep(K, N, 4, copies4, w_ref, g_bf16)
        if best:
            print("int4 best config", json.dumps(best), flush=True)
            entries.append(best)
        sweep += swept
        if not SMOKE:
            torch.cuda.empty_cache()
    return rows, sweep, entries


def tuned_table(entries: list[dict], out_dir: Path, device_name: str) -> Path | None:
    """The fastest swept config per shape and row count as a table for ``inferkit.kernels.tuned``
    (``<out_dir>/<device>.json``): copy it to ``kernels/configs/`` to make it this GPU's default,
    or point ``INFERKIT_KERNEL_CONFIGS`` at it."""
    import triton

    from inferkit.kernels import tuned

    if not entries:
        return None
    entries = sorted(entries, key=lambda e: (e["K"], e["N"], e["M"]))
    return tuned.write_table(out_dir / f"{tuned.slug(device_name)}.json", device_name, entries,
                             triton=triton.__version__, torch=torch.__version__,
                             source="benchmarks/gpu_kernels.py (graph-replayed, bf16 activations)")


def config_sweep(K: int, N: int, M: int, copies4: list, weight: torch.Tensor, t_bf16: float) -> tuple[list[dict], dict | None]:
    """INT4 g128 tile configs around the heuristic's (``inferkit tune-kernels --grid quick``),
    graph-timed (the kernel's own time, as the runtime replays it). Each config's output is
    checked against ``weight`` (float32, dequantized) first; a wrong one is reported, not timed.
    Returns the sweep's rows and the fastest correct config as a table entry."""
    from inferkit.kernels import tune

    w4, s4 = copies4[0]
    problem = tune.Problem(4, 128, N, K, w4, s4, None, None)
    configs = tune.candidates(M, N, K, 128, 4, torch.device(DEV), "smoke" if SMOKE else "quick")
    rows = tune.sweep(problem, M, torch.bfloat16, configs, [(w, s, None, None) for w, s in copies4], weight)
    out = []
    for i, r in enumerate(rows):
        cfg = {k: v for k, v in r.items() if k not in ("us", "rel_err", "error")}
        if r["error"]:
            print("config failed", cfg, r["error"], flush=True)
            continue
        out.append({"K": K, "N": N, "M": M, **cfg, "graphed_int4_us": r["us"], "graphed_speedup": t_bf16 * 1e6 / r["us"],
                    "picked": i == 0})  # candidates() puts the heuristic's config first
    return out, tune.best_entry(problem, M, rows)


LLAMA_1B = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5,
                rope_theta=500000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def end_to_end(work: Path, tokenizer_dir: Path) -> dict:
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    from inferkit.runtime import LLM, SamplingParams

    shape = dict(LLAMA_1B, vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2) if SMOKE else LLAMA_1B
    folder = work / ("llama-smoke" if SMOKE else "llama-1b-shape")
    if not (folder / "model.safetensors").is_file():
        torch.manual_seed(0)
        with torch.device(DEV):  # random init on the GPU: seconds instead of a minute
            model = LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16)
        model.save_pretrained(folder)
        del model
        for f in tokenizer_dir.iterdir():  # any tokenizer: the benchmark feeds token ids
            if f.name.startswith("tokenizer") or f.name == "special_tokens_map.json":
                shutil.copy(f, folder / f.name)
    n = 8 if SMOKE else 128
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 500 if SMOKE else 40000, (32,), generator=g).tolist() for _ in range(32)]
    sync = torch.cuda.synchronize if DEV == "cuda" else (lambda: None)
    out = {"model": "Llama-3.2-1B shape, random bf16 weights", "new_tokens": n}
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval().to(DEV)
    for batch in (1, 32):
        ids = torch.tensor(prompts[:batch], device=DEV)
        kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0)
        with torch.no_grad():
            hf.generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
            sync()
            start = time.perf_counter()
            ref = hf.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
            sync()
        out[f"transformers_batch{batch}_tok_s"] = batch * n / (time.perf_counter() - start)
        if batch == 1:
            hf_tokens = ref[0, 32:].tolist()
    del hf
    from inferkit.runtime.model import RuntimeModel

    # graphs_unfused: the layer's element-wise steps as PyTorch operators (what inferkit.kernels.fused saves)
    for tag, graphs, fused in (("graphs", True, True), ("graphs_unfused", True, False), ("eager", False, True)):
        RuntimeModel.fuse_elementwise = fused
        try:
            llm = LLM(folder, device=DEV, dtype="bfloat16", cuda_graphs=graphs, max_model_len=1024,
                      kv_cache_gb=0.1 if SMOKE else 4, linear_backend="triton", attention_backend="triton")
        except Exception as exc:  # report and go on: the other variant still measures
            out[f"runtime_{tag}_error"] = repr(exc)
            continue
        params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
        for batch in (1, 32):
            llm.generate(prompts[:batch], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
            sync()
            start = time.perf_counter()
            outs = llm.generate(prompts[:batch], params)
            sync()
            out[f"runtime_{tag}_batch{batch}_tok_s"] = batch * n / (time.perf_counter() - start)
            if batch == 1:
                got = outs[0].token_ids
                out[f"runtime_{tag}_greedy_prefix_equal_transformers"] = next(
                    (i for i, (a, b) in enumerate(zip(got, hf_tokens)) if a != b), len(got))
        out["backends"] = llm.engine.backends
        del llm
    RuntimeModel.fuse_elementwise = True
    best = "graphs" if "runtime_graphs_batch1_tok_s" in out else "eager"
    for batch in (1, 32):
        out[f"speedup_batch{batch}"] = out[f"runtime_{best}_batch{batch}_tok_s"] / out[f"transformers_batch{batch}_tok_s"]
    print("end to end", json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("bench_out/gpu_kernels.json"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/ik-gpu"))
    parser.add_argument("--tokenizer", type=Path, default=Path(".gpu/demo"))
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--only-e2e", action="store_true", help="the end-to-end decode alone (part 4)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1): checks the script")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="another revision's kernels/quant_matmul.py: its INT4 batch-1 time beside this one's")
    args = parser.parse_args()
    global DEV, SMOKE
    if args.smoke:
        DEV, SMOKE = "cpu", True
    results = {"device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)", "torch": torch.__version__}
    import triton

    results["triton"] = triton.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.only_e2e:
        kernels(results, args)
    if not args.skip_e2e:
        args.work.mkdir(parents=True, exist_ok=True)
        results["end_to_end"] = end_to_end(args.work, args.tokenizer)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_summary(results)


def kernels(results: dict, args) -> None:
    """Parts 1-3 into ``results``: copy bandwidth, attention, prefill, matmul and its tile sweep."""
    results["copy_gb_s"] = copy_bandwidth() / 1e9
    print(f"memory copy: {results['copy_gb_s']:.0f} GB/s (read + write)", flush=True)
    results["attention"] = attention(results["copy_gb_s"] * 1e9)
    results["prefill"] = prefill()
    args.out.write_text(json.dumps(results, indent=2) + "\n")  # kept if the matmul sweep runs out of time
    results["matmul"], results["int4_config_sweep"], entries = matmul(load_baseline(args.baseline))
    table = tuned_table(entries, args.out.parent / "tuned", results["device"])
    if table:
        results["tuned_table"] = str(table)
        print(f"tuned matmul configs: {table} (copy to kernels/configs/ to make them this GPU's default)", flush=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


def print_summary(results: dict) -> None:
    print("\nsummary")
    for r in results.get("attention", []):
        print(f"  attention b{r['batch']:>2} ctx{r['context']:>5}: {r['triton_gb_s']:7.0f} GB/s = "
              f"{100 * r['triton_vs_copy']:5.1f}% of copy (graphed {r['triton_graphed_gb_s']:5.0f} GB/s = "
              f"{100 * r['triton_graphed_vs_copy']:5.1f}%); SDPA contiguous {r['sdpa_gb_s']:7.0f} GB/s")
    for r in results.get("prefill", []):
        print(f"  prefill {r['chunks']} x {r['new_tokens']} new after {r['cached']:>4} cached: Triton "
              f"{r['triton_us']:8.1f} us ({r['triton_tflops']:.0f} TFLOP/s), PyTorch gather+SDPA {r['torch_us']:8.1f} us "
              f"({r['torch_tflops']:.0f}): {r['speedup']:.1f}x")
    for r in results.get("matmul", []):
        print(f"  matmul {r['K']}x{r['N']} M={r['M']:>2}: bf16 {r['bf16_us']:7.1f} us, int8 {r['int8_us']:7.1f} us "
              f"({r['int8_speedup']:.2f}x), int4 {r['int4_us']:7.1f} us ({r['int4_speedup']:.2f}x); graphed: bf16 "
              f"{r['graphed_bf16_us']:6.1f}, int8 {r['graphed_int8_us']:6.1f} ({r['graphed_int8_speedup']:.2f}x), int4 "
              f"{r['graphed_int4_us']:6.1f} us ({r['graphed_int4_speedup']:.2f}x)"
              + (f", int4 best swept {r['tuned_graphed_int4_us']:6.1f} us ({r['tuned_graphed_int4_speedup']:.2f}x)"
                 if "tuned_graphed_int4_us" in r else "")
              + (f", int4 baseline revision {r['baseline_graphed_int4_us']:6.1f} us "
                 f"({r['baseline_graphed_int4_speedup']:.2f}x)" if "baseline_graphed_int4_us" in r else ""))
    if "end_to_end" in results:
        e = results["end_to_end"]
        for tag in ("graphs", "graphs_unfused", "eager"):
            if f"runtime_{tag}_batch1_tok_s" in e:
                print(f"  e2e 1B bf16 runtime ({tag}): batch 1 {e[f'runtime_{tag}_batch1_tok_s']:.0f} tok/s, batch 32 "
                      f"{e[f'runtime_{tag}_batch32_tok_s']:.0f}; same greedy tokens as generate for the first "
                      f"{e[f'runtime_{tag}_greedy_prefix_equal_transformers']}")
            else:
                print(f"  e2e runtime ({tag}) failed: {e.get(f'runtime_{tag}_error')}")
        print(f"  e2e transformers generate(): batch 1 {e['transformers_batch1_tok_s']:.0f} tok/s, batch 32 "
              f"{e['transformers_batch32_tok_s']:.0f}; speedup {e['speedup_batch1']:.1f}x / {e['speedup_batch32']:.1f}x")
    print_targets(results)


def print_targets(results: dict) -> None:
    """The issue's three GPU targets, each with the figure that decides it."""
    verdict = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    print("\ntargets")
    att = [r for r in results.get("attention", []) if r["batch"] == 64 and r["context"] == 4096]
    if att:
        best = max(att[0]["triton_vs_copy"], att[0]["triton_graphed_vs_copy"])
        print(f"  paged decode attention, batch 64 x 4096: {100 * best:.1f}% of copy bandwidth (>= 70%): "
              f"{verdict(best >= 0.7)}")
    mm = [r for r in results.get("matmul", []) if (r["K"], r["N"], r["M"]) == (4096, 14336, 1)]
    if mm:
        r = mm[0]
        best = max(r["int4_speedup"], r["graphed_int4_speedup"], r.get("tuned_graphed_int4_speedup", 0))
        print(f"  INT4 matmul, batch 1, 4096x14336: {r['int4_speedup']:.2f}x bf16 per call (do_bench), "
              f"{r['graphed_int4_speedup']:.2f}x graphed, {r.get('tuned_graphed_int4_speedup', 0):.2f}x with the best "
              f"swept tiles (>= 2.5x): {verdict(best >= 2.5)}")
    e = results.get("end_to_end", {})
    if "speedup_batch1" in e:
        best = "graphs" if "runtime_graphs_batch1_tok_s" in e else "eager"
        tok_s = e[f"runtime_{best}_batch1_tok_s"]
        print(f"  runtime decode, batch 1, Llama-1B shape: {tok_s:.0f} tok/s, {e['speedup_batch1']:.1f}x generate() "
              f"measured here (>= 8x): {verdict(e['speedup_batch1'] >= 8)}; {tok_s / 53:.1f}x the 53 tok/s the issue "
              f"quotes for generate() on an H200 (>= 8x): {verdict(tok_s >= 8 * 53)}")


if __name__ == "__main__":
    main()
