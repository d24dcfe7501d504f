"""Where a decode step's GPU time goes: top CUDA kernels for one engine setting.

    python benchmarks/gpu_profile.py --model /tmp/ik-gpu/fp32 --dtype bfloat16 --batch 16
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    from inferkit.runtime import LLM, SamplingParams

    llm = LLM(args.model, device="cuda", dtype=args.dtype)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 49152, (128,), generator=g).tolist() for _ in range(args.batch)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    llm.generate(prompts, params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate(prompts, params)
    torch.cuda.synchronize()
    print(f"{args.dtype} batch {args.batch}: {args.batch * 32 / (time.perf_counter() - start):.1f} tok/s", flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
        llm.generate(prompts, params)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60))


if __name__ == "__main__":
    main()
