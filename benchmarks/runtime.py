"""The bundled runtime on the demo model: correctness against transformers, speed, KV memory.

    python benchmarks/runtime.py                        # everything, about 15 minutes on 2 cores
    python benchmarks/runtime.py --only correctness     # or speed, memory (comma-separated)

Correctness: greedy tokens of the runtime == transformers' greedy ``generate()`` (fp32, 8 prompts
x 64 new tokens) one request at a time, all 8 batched, with prefix caching off, and with a KV
pool small enough to force preemptions; runtime logits on a W4 artifact == transformers' logits
on the same artifact (inferkit's dequantization, and compressed-tensors' loader when installed).
Speed: single-request decode and 16 concurrent requests (128-token prompts, 128 new tokens)
against transformers' ``generate()`` in fp32 (the baseline a user has: transformers runs
compressed-tensors INT8/INT4 checkpoints by decompressing them). Memory: KV utilisation on a
mixed-length workload, and what a contiguous max-length cache would use.

The W8 and W4 artifacts are quantized with RTN (seconds): speed and logit agreement do not depend
on how the integers were chosen. Results: benchmarks/results/runtime.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
PROMPT_LENS = [12, 20, 28, 36, 44, 52, 60, 68]


def prompt_tokens(tokenizer) -> list[int]:
    if WIKITEXT.is_file():
        text = WIKITEXT.read_text(encoding="utf-8")[:400_000]
    else:
        from inferkit.data.calibration import CalibrationConfig, load_documents

        text = "\n\n".join(d for d in load_documents(CalibrationConfig(source="builtin", split="heldout")) if isinstance(d, str))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) < 40_000:
        raise SystemExit(f"the benchmark text has {len(ids)} tokens; it needs 40,000 ({WIKITEXT} missing?)")
    return ids


def hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_generate(model, prompt: list[int], n: int, force: bool = False) -> tuple[list[int], float]:
    ids = torch.tensor([prompt])
    extra = dict(min_new_tokens=n) if force else {}
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         pad_token_id=model.config.eos_token_id, **extra)
    return out[0, len(prompt):].tolist(), time.perf_counter() - start


def quantize(model: str, out: Path, **q) -> Path:
    from inferkit.config import QuantizeConfig, Recipe
    from inferkit.stages.quantize import run_quantize

    if not out.exists():
        run_quantize(model, Recipe(quantize=QuantizeConfig(method="rtn", **q)), out)
    return out


def correctness(model: str, w4: Path, tokens: list[int], log) -> dict:
    from inferkit.models.artifact import load_artifact_model
    from inferkit.runtime import LLM, SamplingParams

    prompts = [tokens[5000 * i: 5000 * i + n] for i, n in enumerate(PROMPT_LENS)]
    hf = hf_model(model)
    expected = [hf_generate(hf, p, 64)[0] for p in prompts]
    del hf
    greedy = SamplingParams(temperature=0, max_tokens=64)
    result = {"prompts": len(prompts), "new_tokens": 64}
    for name, options in {"default": {}, "no_prefix_cache": dict(enable_prefix_caching=False),
                          "preempting": dict(num_kv_blocks=24, max_model_len=256)}.items():
        llm = LLM(model, **options)
        batched = [o.token_ids for o in llm.generate(prompts, greedy)]
        single = [llm.generate([p], greedy)[0].token_ids for p in prompts]
        row = {"batched_equal": batched == expected, "batch1_equal": single == expected,
               "batched_prompts_equal": sum(a == b for a, b in zip(batched, expected)),
               "batch1_prompts_equal": sum(a == b for a, b in zip(single, expected)),
               "preemptions": llm.engine.scheduler.num_preemptions}
        result[name] = row
        log(f"  {name}: {row}")
        del llm
    ids = tokens[:512]
    with torch.no_grad():
        ref = load_artifact_model(w4)(torch.tensor([ids])).logits[0]
    for backend in ("torch", "reference", "packed"):
        got = LLM(w4, linear_backend=backend).score(ids)
        result[f"w4_logits_maxdiff_{backend}"] = float((got - ref).abs().max())
        if backend == "packed":  # bfloat16 products: how often the top token moves, and the loss it costs
            nll = lambda logits: float(torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])))  # noqa: E731
            result["w4_packed_top1_agreement"] = float((got.argmax(-1) == ref.argmax(-1)).float().mean())
            result["w4_packed_nll"], result["w4_exact_nll"] = nll(got), nll(ref)
    packed_greedy = [o.token_ids for o in LLM(w4).generate(prompts, greedy)]
    exact_greedy = [o.token_ids for o in LLM(w4, linear_backend="torch").generate(prompts, greedy)]
    result["w4_packed_greedy_prompts_equal_exact"] = sum(a == b for a, b in zip(packed_greedy, exact_greedy))
    try:
        import compressed_tensors  # noqa: F401
        from transformers import AutoModelForCausalLM

        ct = AutoModelForCausalLM.from_pretrained(w4, dtype=torch.float32).eval()
        with torch.no_grad():
            ct_logits = ct(torch.tensor([ids])).logits[0]
        result["w4_logits_maxdiff_compressed_tensors"] = float((LLM(w4, linear_backend="torch").score(ids) - ct_logits).abs().max())
    except ImportError:
        result["w4_logits_maxdiff_compressed_tensors"] = None
    log(f"  W4 logits: { {k: v for k, v in result.items() if k.startswith('w4')} }")
    return result


def speed(model: str, artifacts: dict[str, Path], tokens: list[int], repeats: int, log) -> dict:
    from inferkit.runtime import LLM, SamplingParams

    single_prompt = tokens[100:132]
    conc_prompts = [tokens[20_000 + 300 * i: 20_000 + 300 * i + 128] for i in range(16)]
    n = 128
    hf = hf_model(model)
    hf_generate(hf, single_prompt, 8)
    hf_single = [n / hf_generate(hf, single_prompt, n, force=True)[1] for _ in range(repeats)]
    log(f"  transformers generate batch 1: {statistics.median(hf_single):.1f} tok/s")
    start = time.perf_counter()
    for p in conc_prompts:
        hf_generate(hf, p, n, force=True)
    hf_seq = 16 * n / (time.perf_counter() - start)
    log(f"  transformers generate, 16 one by one: {hf_seq:.1f} tok/s")
    with torch.no_grad():
        ids = torch.tensor(conc_prompts)
        start = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                    pad_token_id=hf.config.eos_token_id)
        hf_batch = 16 * n / (time.perf_counter() - start)
    log(f"  transformers generate, batch of 16: {hf_batch:.1f} tok/s")
    del hf
    out = {"transformers_fp32": {"batch1_tok_s": statistics.median(hf_single), "batch1_runs": hf_single,
                                 "16_one_by_one_tok_s": hf_seq, "16_batched_generate_tok_s": hf_batch}}
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    # The quantized artifacts on the CPU default (PyTorch's packed INT4/INT8 kernels, bfloat16
    # products) and on the exact path (dequantize into a scratch buffer, then an fp32 matmul).
    engines = {"fp32": (Path(model), "auto")}
    engines.update({name: (path, "auto") for name, path in artifacts.items()})
    engines.update({f"{name}_exact": (path, "torch") for name, path in artifacts.items()})
    for name, (path, backend) in engines.items():
        llm = LLM(path, linear_backend=backend)
        llm.generate([single_prompt], SamplingParams(temperature=0, max_tokens=8))
        runs = []
        for _ in range(repeats):
            start = time.perf_counter()
            llm.generate([single_prompt], params)
            runs.append(n / (time.perf_counter() - start))
        start = time.perf_counter()
        outs = llm.generate(conc_prompts, params)
        conc = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
        row = {"batch1_tok_s": statistics.median(runs), "batch1_runs": runs, "16_concurrent_tok_s": conc,
               "batch1_speedup_vs_generate": statistics.median(runs) / statistics.median(hf_single),
               "16_concurrent_speedup_vs_one_by_one": conc / hf_seq,
               "weights_mb": llm.engine.model.nbytes() / 2**20, "linear_backend": llm.engine.backends["linear"]}
        out[name] = row
        log(f"  runtime {name}: batch 1 {row['batch1_tok_s']:.1f} tok/s ({row['batch1_speedup_vs_generate']:.2f}x), "
            f"16 concurrent {conc:.1f} tok/s ({row['16_concurrent_speedup_vs_one_by_one']:.2f}x)")
        del llm
    return out


def memory(model: str, tokens_text_cfg, log) -> dict:
    from inferkit.config import ServeTestConfig
    from inferkit.runtime import LLM
    from inferkit.stages.serve_test import run_load_test

    cfg = ServeTestConfig(num_requests=64, prompt_len=(16, 512), output_len=(16, 256), max_model_len=2048, seed=1)
    llm = LLM(model, max_model_len=2048)
    res = run_load_test(llm, tokens_text_cfg, cfg)
    keys = ("requests", "duration_s", "throughput_tok_s", "total_tok_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50",
            "itl_ms_p99", "preemptions", "peak_kv_blocks_used", "peak_kv_mb", "kv_utilisation", "contiguous_utilisation")
    row = {k: res[k] for k in keys}
    row.update(workload="64 requests, prompts 16-512, outputs 16-256 tokens, all at once", max_model_len=2048)
    log(f"  KV utilisation {row['kv_utilisation']:.3f} (contiguous 2048-token slots: {row['contiguous_utilisation']:.3f}), "
        f"peak {row['peak_kv_blocks_used']} blocks, {row['throughput_tok_s']:.1f} tok/s")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--only", default="correctness,speed,memory")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", type=Path, default=None, help="Keep the quantized artifacts here.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "runtime.json")
    args = parser.parse_args()
    from rich.console import Console

    from inferkit.cli.ui import table
    from inferkit.models.demo import resolve_model_arg

    torch.set_num_threads(min(2, torch.get_num_threads()))
    console = Console(width=200)
    model = resolve_model_arg(args.model, log=console.print)
    work = args.work or Path(tempfile.mkdtemp(prefix="ik-runtime-"))
    work.mkdir(parents=True, exist_ok=True)
    artifacts = {"w8": quantize(model, work / "w8", bits=8, group_size=None),
                 "w4": quantize(model, work / "w4-g64-asym", bits=4, group_size=64, symmetric=False)}
    from transformers import AutoTokenizer

    tokens = prompt_tokens(AutoTokenizer.from_pretrained(model))
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.update(model=str(model), date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                   threads=torch.get_num_threads(), machine=platform.processor() or platform.machine())
    only = set(args.only.split(","))
    if "correctness" in only:
        console.print("[bold]correctness[/]")
        results["correctness"] = correctness(model, artifacts["w4"], tokens, console.print)
    if "speed" in only:
        console.print("[bold]speed[/]")
        results["speed"] = speed(model, artifacts, tokens, args.repeats, console.print)
    if "memory" in only:
        console.print("[bold]memory[/]")
        results["memory"] = memory(model, tokens, console.print)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    if "speed" in results:
        s = results["speed"]
        rows = [["transformers generate fp32", s["transformers_fp32"]["batch1_tok_s"], None, s["transformers_fp32"]["16_one_by_one_tok_s"], None]]
        rows += [[f"runtime {k}", v["batch1_tok_s"], v["batch1_speedup_vs_generate"], v["16_concurrent_tok_s"],
                  v["16_concurrent_speedup_vs_one_by_one"]] for k, v in s.items() if k != "transformers_fp32"]
        console.print(table("decode speed, tokens/s (2 threads)", ["engine", "batch 1", "× generate", "16 requests", "× one by one"], rows))
    console.print(f"results: {args.out}")


if __name__ == "__main__":
    main()
