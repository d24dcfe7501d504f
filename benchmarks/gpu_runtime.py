"""The runtime on a CUDA GPU: a random-weight model of the demo's shape (speed does not depend
on the weights' values; the GPU machine cannot download the demo model), against transformers.

    python benchmarks/gpu_runtime.py --config .gpu/demo --out bench_out/gpu_runtime.json

``--config`` is a folder with the demo model's config.json and tokenizer files
(``benchmarks/gpu.sh --prepare`` copies them there). Measured per engine (fp32, bf16, W8, W4, and
on sm_90+ W4 with the ``pdl`` option, every matmul a programmatic dependent launch):
single-request decode, 16 concurrent requests (128-token prompts, 128 new tokens), and a
64-request load test; transformers' ``generate()`` at batch 1 and 4 requests one by one as the
baseline, and greedy agreement between the two.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import time
from pathlib import Path

import torch


def build_random_model(config_dir: Path, out: Path) -> Path:
    from transformers import AutoConfig, AutoModelForCausalLM

    if (out / "model.safetensors").is_file():
        return out
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir), dtype=torch.float32)
    model.save_pretrained(out)
    for f in config_dir.iterdir():
        if f.name.startswith("tokenizer") or f.name in ("special_tokens_map.json", "generation_config.json", "chat_template.jinja"):
            shutil.copy(f, out / f.name)
    return out


def hf_tok_s(model, prompt: list[int], n: int) -> float:
    ids = torch.tensor([prompt], device="cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", type=Path, default=Path(".gpu/demo"))
    parser.add_argument("--work", type=Path, default=Path("/tmp/ik-gpu"))
    parser.add_argument("--out", type=Path, default=Path("bench_out/gpu_runtime.json"))
    parser.add_argument("--build-only", action="store_true", help="write the model and its W4/W8 artifacts, then stop")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from inferkit.config import QuantizeConfig, Recipe, ServeTestConfig
    from inferkit.kernels import pdl
    from inferkit.runtime import LLM, SamplingParams
    from inferkit.stages.quantize import run_quantize
    from inferkit.stages.serve_test import run_load_test

    args.work.mkdir(parents=True, exist_ok=True)
    model = build_random_model(args.config, args.work / "fp32")
    arts = {}
    # W4 before W8: the INT4 path is the one to watch, and the script runs under a time limit
    for name, q in {"w4": dict(bits=4, group_size=64, symmetric=False), "w8": dict(bits=8, group_size=None)}.items():
        if not (args.work / name).exists():
            run_quantize(str(model), Recipe(quantize=QuantizeConfig(method="rtn", **q)), args.work / name)
        arts[name] = args.work / name
    if args.build_only:
        return
    g = torch.Generator().manual_seed(0)
    vocab = 49152
    single = torch.randint(100, vocab, (32,), generator=g).tolist()
    conc = [torch.randint(100, vocab, (128,), generator=g).tolist() for _ in range(16)]
    n = 128
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "model": "random weights, demo shape"}
    for dtype in ("float32", "bfloat16"):
        hf = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype)).eval().cuda()
        hf_tok_s(hf, single, 8)
        b1 = statistics.median(hf_tok_s(hf, single, n) for _ in range(3))
        start = time.perf_counter()
        for p in conc[:4]:
            hf_tok_s(hf, p, n)
        seq = 4 * n / (time.perf_counter() - start)
        ids = torch.tensor([single], device="cuda")
        with torch.no_grad():
            hf_greedy = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, do_sample=False,
                                    pad_token_id=0)[0, 32:].tolist()
        results[f"transformers_{dtype}"] = {"batch1_tok_s": b1, "one_by_one_tok_s": seq}
        print(f"transformers {dtype}: batch 1 {b1:.1f} tok/s, one by one {seq:.1f} tok/s", flush=True)
        del hf
        gc.collect()
        engines = {dtype: (model, dtype, {})}
        if dtype == "bfloat16":
            for k, v in arts.items():
                engines[k] = (v, dtype, {})
                if k == "w4" and pdl.capable(torch.device("cuda")):  # again, every matmul a PDL launch
                    engines["w4_pdl"] = (v, dtype, {"pdl": True})
        for name, (path, dt, options) in engines.items():
            torch.cuda.reset_peak_memory_stats()  # each engine's own peak, not the process's
            llm = LLM(path, device="cuda", dtype=dt, **options)
            params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
            llm.generate([single], SamplingParams(temperature=0, max_tokens=8))
            runs = []
            for _ in range(3):
                torch.cuda.synchronize()
                start = time.perf_counter()
                llm.generate([single], params)
                runs.append(n / (time.perf_counter() - start))
            start = time.perf_counter()
            outs = llm.generate(conc, params)
            c16 = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
            greedy = llm.generate([single], SamplingParams(temperature=0, max_tokens=32))[0].token_ids
            load = run_load_test(llm, list(range(100, 20_000)), ServeTestConfig(num_requests=64))
            row = {"batch1_tok_s": statistics.median(runs), "16_concurrent_tok_s": c16,
                   "load64_tok_s": load["throughput_tok_s"], "load64_ttft_ms_p50": load["ttft_ms_p50"],
                   "load64_itl_ms_p50": load["itl_ms_p50"], "kv_utilisation": load["kv_utilisation"],
                   "greedy_equal_transformers": greedy == hf_greedy if name == dtype else None,
                   "peak_gpu_mem_mb": torch.cuda.max_memory_allocated() / 2**20}
            results[f"runtime_{name}_{dt}"] = row
            print(f"runtime {name} {dt}: {json.dumps(row)}", flush=True)
            save(args.out, results)  # after every engine: a time limit keeps what was measured
            del llm
            gc.collect()  # the engine's graphs and caches go before the next one is built
            torch.cuda.empty_cache()
    save(args.out, results)


def save(out: Path, results: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)


if __name__ == "__main__":
    main()
