"""Speculative decoding on the demo model: acceptance per draft position, tokens per step, and
speed against plain decoding at batch 1 and batch 8, greedy (output checked identical).

    python benchmarks/speculative.py                      # draft: the teacher cut to 4 layers, untrained
    python benchmarks/speculative.py --draft DISTILLED/   # a distilled draft
    python benchmarks/speculative.py --draft DISTILLED/ --restrict-vocab 8192   # same weights, reduced head

Held-out prompts: WikiText-2 test. Results: benchmarks/results/speculative.json (merged per draft).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"


def timed(llm, prompts, params) -> tuple[list[list[int]], float]:
    start = time.perf_counter()
    outs = [o.token_ids for o in llm.generate(prompts, params)]
    return outs, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--draft", type=Path, default=None)
    parser.add_argument("--student-layers", type=int, default=4)
    parser.add_argument("--restrict-vocab", type=int, default=0,
                        help="measure the draft with its head cut to the N most frequent tokens of WikiText-2 valid "
                             "(an ablation of the reduced draft vocabulary on the same weights)")
    parser.add_argument("--k", default="2,4")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ik-spec"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "speculative.json")
    args = parser.parse_args()
    from rich.console import Console
    from transformers import AutoTokenizer

    from inferkit.cli.ui import table
    from inferkit.models.demo import resolve_model_arg
    from inferkit.runtime import LLM, SamplingParams
    from inferkit.runtime.speculative import SpecStats
    from inferkit.stages.distill import build_student

    torch.set_num_threads(min(2, torch.get_num_threads()))
    console = Console(width=200)
    model = resolve_model_arg(args.model, log=console.print)
    draft = args.draft
    if draft is None:
        draft = args.work / f"student-{args.student_layers}-undistilled"
        if not draft.exists():
            build_student(model, args.student_layers, draft)
    tok = AutoTokenizer.from_pretrained(model)
    if args.restrict_vocab:
        import shutil

        from safetensors.torch import save_file

        from inferkit.runtime.speculative import DRAFT_VOCAB_FILE
        from inferkit.stages.distill import select_draft_vocab

        valid = tok((WIKITEXT.parent / "valid.txt").read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        counts = torch.bincount(torch.tensor(valid), minlength=len(tok))
        cut = args.work / f"{draft.name}-vocab{args.restrict_vocab}"
        shutil.rmtree(cut, ignore_errors=True)
        shutil.copytree(draft, cut)
        save_file({"d2t": select_draft_vocab(counts, args.restrict_vocab, [tok.eos_token_id])}, str(cut / DRAFT_VOCAB_FILE))
        draft = cut
    ids = tok(WIKITEXT.read_text(encoding="utf-8")[:200_000], add_special_tokens=False)["input_ids"]
    prompts = [ids[7000 * i + 50: 7000 * i + 50 + 48] for i in range(8)]
    params = SamplingParams(temperature=0, max_tokens=args.new_tokens, ignore_eos=True)
    plain = LLM(model)
    plain.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=4))
    ref1, t_plain1 = [], 0.0  # batch 1: four prompts, one call each
    for p in prompts[:4]:
        out, t = timed(plain, [p], params)
        ref1 += out
        t_plain1 += t
    ref8, t_plain8 = timed(plain, prompts, params)
    del plain
    rows, results = [], {"model": str(model), "draft": str(draft), "new_tokens": args.new_tokens,
                         "plain_batch1_tok_s": 4 * args.new_tokens / t_plain1,
                         "plain_batch8_tok_s": 8 * args.new_tokens / t_plain8, "by_k": {}}
    for k in (int(x) for x in args.k.split(",")):
        llm = LLM(model, draft=str(draft), num_speculative_tokens=k)
        llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=4))
        llm.engine.spec_runner.stats = SpecStats()
        out1, t1 = [], 0.0
        for p in prompts[:4]:
            out, t = timed(llm, [p], params)
            out1 += out
            t1 += t
        stats1 = llm.engine.spec_runner.stats.summary()
        out8, t8 = timed(llm, prompts, params)
        row = {"batch1_tok_s": 4 * args.new_tokens / t1, "batch8_tok_s": 8 * args.new_tokens / t8,
               "speedup_batch1": t_plain1 / t1, "speedup_batch8": t_plain8 / t8,
               "greedy_equal_plain": out1 == ref1 and out8 == ref8, **stats1}
        if k == max(int(x) for x in args.k.split(",")):  # exactness under forced preemptions
            tight = LLM(model, draft=str(draft), num_speculative_tokens=k, num_kv_blocks=24, max_model_len=128)
            out_tight = [o.token_ids for o in tight.generate(prompts, params)]
            row["preempting_run"] = {"num_kv_blocks": 24, "preemptions": tight.engine.scheduler.num_preemptions,
                                     "greedy_equal_plain": out_tight == ref8}
            del tight
        results["by_k"][str(k)] = row
        rows.append([k, row["acceptance_rate"], ", ".join(f"{a:.2f}" for a in row["acceptance_by_position"]),
                     row["tokens_per_step"], row["speedup_batch1"], row["speedup_batch8"], row["greedy_equal_plain"]])
        del llm
    console.print(table(f"speculative decoding, draft {draft.name}: plain {results['plain_batch1_tok_s']:.1f} tok/s "
                        f"(batch 1), {results['plain_batch8_tok_s']:.1f} (batch 8)",
                        ["k", "acceptance", "by position", "tokens/step", "speedup b1", "speedup b8", "same tokens"], rows))
    merged = json.loads(args.out.read_text()) if args.out.is_file() else {}
    merged[draft.name] = results
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(merged, indent=2) + "\n")
    console.print(f"results: {args.out}")


if __name__ == "__main__":
    main()
