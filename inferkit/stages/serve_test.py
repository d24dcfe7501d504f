"""``inferkit serve-test``: load an artifact into the runtime and measure what a serving CI
pipeline needs to know: quality against a reference, speed under load, and memory.

Checks compare each measurement with a threshold from the recipe or the command line; the
report (JSON) and a JUnit XML file carry every number and every verdict.
"""

from __future__ import annotations

import math
import random
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from inferkit.config import ServeTestConfig
from inferkit.errors import InferkitError
from inferkit.stages.memory import peak_rss_mb

Progress = Callable[[str, int, int], None]


@dataclass
class Check:
    name: str
    value: float | None
    threshold: float
    at_least: bool  # value >= threshold passes; else value <= threshold

    @property
    def passed(self) -> bool:
        if self.value is None or (isinstance(self.value, float) and math.isnan(self.value)):
            return False
        return self.value >= self.threshold if self.at_least else self.value <= self.threshold

    def describe(self) -> str:
        return f"{self.name} = {self.value} ({'≥' if self.at_least else '≤'} {self.threshold} required)"


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def text_tokens(tokenizer, cfg: ServeTestConfig) -> list[int]:
    """The evaluation text as one token stream: the given file, or the built-in held-out split."""
    if cfg.text:
        path = Path(cfg.text).expanduser()
        if not path.is_file():
            raise InferkitError(f"text file {path} does not exist")
        body = path.read_text(encoding="utf-8")
    else:
        from inferkit.data.calibration import CalibrationConfig, load_documents, render

        docs = load_documents(CalibrationConfig(source="builtin", split="heldout"))
        body = "\n\n".join(render(d, tokenizer, True) for d in docs)
    return tokenizer(body, add_special_tokens=False)["input_ids"]


# -- load test ----------------------------------------------------------------------------------
def make_workload(tokens: list[int], cfg: ServeTestConfig, max_model_len: int) -> list[tuple[float, list[int], int]]:
    """(arrival offset s, prompt ids, output length) per request, from the seed."""
    if cfg.prompt_len[1] + cfg.output_len[1] > max_model_len:
        raise InferkitError(f"prompt_len max {cfg.prompt_len[1]} + output_len max {cfg.output_len[1]} exceeds "
                            f"max_model_len {max_model_len}")
    if len(tokens) <= cfg.prompt_len[1]:
        raise InferkitError(f"the text has {len(tokens)} tokens, too few for prompts of up to {cfg.prompt_len[1]}")
    rng = random.Random(cfg.seed)
    arrival = 0.0
    out = []
    for _ in range(cfg.num_requests):
        plen, olen = rng.randint(*cfg.prompt_len), rng.randint(*cfg.output_len)
        start = rng.randrange(len(tokens) - plen)
        out.append((arrival, tokens[start:start + plen], olen))
        if cfg.request_rate:
            arrival += rng.expovariate(cfg.request_rate)
    return out


def run_load_test(llm, tokens: list[int], cfg: ServeTestConfig, progress: Progress | None = None) -> dict:
    from inferkit.runtime import SamplingParams
    from inferkit.runtime.engine import EngineStats

    engine = llm.engine
    workload = make_workload(tokens, cfg, engine.max_model_len)
    stats0 = (engine.scheduler.num_preemptions, engine.block_manager.num_hits, engine.block_manager.num_queries)
    engine.stats = EngineStats()
    seqs, errors = [], []
    start = time.perf_counter()
    pending = list(workload)
    done = 0
    while pending or engine.has_unfinished():
        now = time.perf_counter()
        while pending and start + pending[0][0] <= now:
            offset, prompt, olen = pending.pop(0)
            try:
                seqs.append(engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=olen, ignore_eos=True),
                                               arrival_time=start + offset))
            except InferkitError as exc:
                errors.append(str(exc))
        if engine.has_unfinished():
            done += len(engine.step())
            if progress:
                progress("load test", done, len(workload))
        elif pending:
            time.sleep(max(0.0, start + pending[0][0] - time.perf_counter()))
    duration = time.perf_counter() - start
    ttft = [1000 * (s.token_times[0] - s.arrival_time) for s in seqs if s.token_times]
    itl = [1000 * (b - a) for s in seqs for a, b in zip(s.token_times, s.token_times[1:])]
    generated = sum(s.num_output_tokens for s in seqs)
    prompt_tokens = sum(s.num_prompt_tokens for s in seqs)
    st = engine.stats
    bm = engine.block_manager
    queries = bm.num_queries - stats0[2]
    return {
        "requests": len(workload),
        "failed_requests": len(errors) + sum(1 for s in seqs if s.finish_reason not in ("length", "stop")),
        "errors": errors[:5],
        "arrival": "all at once" if not cfg.request_rate else f"poisson {cfg.request_rate}/s",
        "duration_s": duration,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": generated,
        "throughput_tok_s": generated / duration,
        "total_tok_s": (generated + prompt_tokens) / duration,
        "requests_per_s": len(seqs) / duration,
        "ttft_ms_p50": percentile(ttft, 50), "ttft_ms_p99": percentile(ttft, 99),
        "itl_ms_p50": percentile(itl, 50), "itl_ms_p99": percentile(itl, 99),
        "preemptions": engine.scheduler.num_preemptions - stats0[0],
        "prefix_cache_hit_rate": (bm.num_hits - stats0[1]) / queries if queries else 0.0,
        "steps": st.steps,
        "kv_blocks": bm.num_blocks,
        "kv_block_bytes": engine.block_bytes,
        "peak_kv_blocks_used": st.peak_blocks_used,
        "peak_kv_mb": st.peak_blocks_used * engine.block_bytes / 2**20,
        "kv_utilisation": st.kv_utilisation,
        "contiguous_utilisation": st.util_tokens / st.contiguous_slots if st.contiguous_slots else 0.0,
    }


# -- quality ------------------------------------------------------------------------------------
def load_reference(folder: Path, reference: str | None, device: str):
    """(transformers model, description): the given reference, or the artifact's own weights."""
    from inferkit.models.artifact import is_quantized_artifact, load_artifact_model

    if reference:
        from inferkit.models import load_model
        from inferkit.models.demo import resolve_model_arg

        return load_model(resolve_model_arg(reference), tokenizer=False).model.to(device), reference
    if is_quantized_artifact(folder):
        return load_artifact_model(folder).to(device), "the artifact's weights, dequantized, in transformers"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval().to(device)
    return model, "the same checkpoint in transformers"


@torch.no_grad()
def run_quality(llm, folder: Path, tokens: list[int], cfg: ServeTestConfig, progress: Progress | None = None) -> dict:
    from inferkit.runtime import SamplingParams

    engine = llm.engine
    size = min(cfg.window_size, engine.max_model_len)
    if len(tokens) < cfg.windows * size + cfg.agreement_prompts:
        raise InferkitError(f"the text has {len(tokens)} tokens: too few for {cfg.windows} windows of {size}; "
                            "lower windows/window_size or give a longer --text")
    ref, ref_name = load_reference(folder, cfg.reference, cfg.device)
    if ref.config.vocab_size != engine.spec.vocab_size:
        raise InferkitError(f"the reference's vocabulary ({ref.config.vocab_size}) differs from the model's "
                            f"({engine.spec.vocab_size})")
    nll_rt = nll_ref = 0.0
    count = 0
    total = cfg.windows + cfg.agreement_prompts
    for w in range(cfg.windows):
        ids = tokens[w * size:(w + 1) * size]
        target = torch.tensor(ids[1:])
        logits = llm.score(ids)[:-1]
        nll_rt += float(torch.nn.functional.cross_entropy(logits, target, reduction="sum"))
        ref_logits = ref(torch.tensor([ids], device=cfg.device)).logits[0, :-1].float().cpu()
        nll_ref += float(torch.nn.functional.cross_entropy(ref_logits, target, reduction="sum"))
        count += len(ids) - 1
        if progress:
            progress("quality", w + 1, total)
    # Greedy agreement on prompts cut after the perplexity windows.
    plen = min(64, (len(tokens) - cfg.windows * size) // cfg.agreement_prompts, engine.max_model_len - cfg.agreement_tokens)
    base = cfg.windows * size
    prompts = [tokens[base + i * plen: base + (i + 1) * plen] for i in range(cfg.agreement_prompts)]
    n = cfg.agreement_tokens
    ours = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    matched = exact = agree = 0
    for i, (prompt, out) in enumerate(zip(prompts, ours)):
        ids = torch.tensor([prompt], device=cfg.device)
        theirs = ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        matched += sum(a == b for a, b in zip(out.token_ids, theirs))
        exact += out.token_ids == theirs
        # Teacher-forced: the runtime's greedy choice after each of the reference's own tokens.
        logits = llm.score(prompt + theirs)[len(prompt) - 1:-1]
        agree += int((logits.argmax(-1) == torch.tensor(theirs)).sum())
        if progress:
            progress("quality", cfg.windows + i + 1, total)
    ppl, ppl_ref = math.exp(nll_rt / count), math.exp(nll_ref / count)
    del ref
    return {
        "reference": ref_name,
        "text": cfg.text or "builtin:heldout",
        "windows": cfg.windows, "window_size": size,
        "perplexity": ppl, "reference_perplexity": ppl_ref,
        "ppl_increase_pct": 100 * (ppl / ppl_ref - 1),
        "agreement": agree / (n * len(prompts)),
        "greedy_match": matched / (n * len(prompts)),
        "greedy_exact_prompts": exact, "agreement_prompts": len(prompts), "agreement_tokens": n,
    }


# -- speculative decoding -----------------------------------------------------------------------
def run_speculative(llm, folder: Path, tokens: list[int], cfg: ServeTestConfig, progress: Progress | None = None) -> dict:
    """Greedy generation with and without the draft on the same prompts: equal tokens expected;
    acceptance per draft position, tokens per step, and the speedup at batch 1 and batched."""
    from inferkit.runtime import LLM, SamplingParams
    from inferkit.runtime.speculative import SpecStats

    options = {k: v for k, v in cfg.engine_options().items() if k not in ("draft", "num_speculative_tokens")}
    plain = LLM(folder, verify_hashes=False, **options)  # the engine under test already checked the files
    n = cfg.agreement_tokens * 2
    plen = 64
    starts = [(i * 997) % (len(tokens) - plen) for i in range(cfg.agreement_prompts)]
    prompts = [tokens[s:s + plen] for s in starts]
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    results: dict = {"draft": cfg.draft, "num_speculative_tokens": cfg.num_speculative_tokens,
                     "prompts": len(prompts), "new_tokens": n}
    outs = {}
    for name, engine in (("plain", plain), ("speculative", llm)):
        engine.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=4))  # warm-up
        if engine.engine.spec_runner is not None:
            engine.engine.spec_runner.stats = SpecStats()
        start = time.perf_counter()
        single = [engine.generate([p], params)[0].token_ids for p in prompts]
        t1 = time.perf_counter() - start
        start = time.perf_counter()
        batched = [o.token_ids for o in engine.generate(prompts, params)]
        tb = time.perf_counter() - start
        outs[name] = (single, batched)
        results[f"{name}_batch1_tok_s"] = len(prompts) * n / t1
        results[f"{name}_batched_tok_s"] = len(prompts) * n / tb
        if progress:
            progress("speculative", 2 if name == "speculative" else 1, 2)
    results.update(llm.engine.spec_runner.stats.summary())
    results["speedup_batch1"] = results["speculative_batch1_tok_s"] / results["plain_batch1_tok_s"]
    results["speedup_batched"] = results["speculative_batched_tok_s"] / results["plain_batched_tok_s"]
    results["greedy_equal_plain"] = outs["speculative"] == outs["plain"]
    del plain
    return results


# -- verdicts and reports ---------------------------------------------------------------------
THRESHOLDS = {  # config field → (metric section, metric, at_least)
    "min_agreement": ("quality", "agreement", True),
    "max_ppl_increase": ("quality", "ppl_increase_pct", False),
    "min_throughput": ("load", "throughput_tok_s", True),
    "max_ttft_p99_ms": ("load", "ttft_ms_p99", False),
    "max_itl_p99_ms": ("load", "itl_ms_p99", False),
    "min_kv_utilisation": ("load", "kv_utilisation", True),
    "max_peak_rss_mb": ("memory", "peak_rss_mb", False),
}


def make_checks(cfg: ServeTestConfig, results: dict) -> list[Check]:
    checks = []
    if "load" in results:
        checks.append(Check("failed_requests", results["load"]["failed_requests"], 0, at_least=False))
    if "speculative" in results:  # greedy speculative decoding must reproduce plain decoding
        checks.append(Check("speculative_greedy_equal_plain", float(results["speculative"]["greedy_equal_plain"]), 1.0, True))
    for field, (section, metric, at_least) in THRESHOLDS.items():
        threshold = getattr(cfg, field)
        if threshold is not None and section in results:
            checks.append(Check(metric, results[section][metric], threshold, at_least))
    return checks


def junit_xml(report: dict, checks: list[Check]) -> str:
    suite = ET.Element("testsuite", name="inferkit.serve-test", tests=str(len(checks)),
                       failures=str(sum(not c.passed for c in checks)), errors="0",
                       time=f"{report['duration_s']:.3f}")
    props = ET.SubElement(suite, "properties")
    for section in ("quality", "load", "memory", "speculative"):
        for key, value in report.get(section, {}).items():
            if isinstance(value, (int, float, str)):
                ET.SubElement(props, "property", name=f"{section}.{key}", value=str(value))
    for c in checks:
        case = ET.SubElement(suite, "testcase", classname=f"serve-test.{Path(report['model']).name}", name=c.name)
        if not c.passed:
            ET.SubElement(case, "failure", message=c.describe(), type="threshold").text = c.describe()
    ET.indent(suite)
    return ET.tostring(suite, encoding="unicode", xml_declaration=True) + "\n"


def run_serve_test(model_path: str | Path, cfg: ServeTestConfig, quality: bool = True, load: bool = True,
                   progress: Progress | None = None) -> tuple[dict, list[Check]]:
    from inferkit.runtime import LLM

    folder = Path(model_path).expanduser()
    t0 = time.perf_counter()
    llm = LLM(folder, **cfg.engine_options())
    load_s = time.perf_counter() - t0
    tokens = text_tokens(llm.tokenizer, cfg)
    results: dict = {}
    if load:
        results["load"] = run_load_test(llm, tokens, cfg, progress)
    results["memory"] = {
        "peak_rss_mb": peak_rss_mb(),  # the engine and the load test; the reference model comes after
        "weights_mb": llm.engine.model.nbytes() / 2**20,
        "kv_pool_mb": llm.engine.block_manager.num_blocks * llm.engine.block_bytes / 2**20,
        "engine_load_s": load_s,
    }
    if quality:
        results["quality"] = run_quality(llm, folder, tokens, cfg, progress)
    if cfg.draft:
        results["speculative"] = run_speculative(llm, folder, tokens, cfg, progress)
    checks = make_checks(cfg, results)
    report = {"model": str(folder), "passed": all(c.passed for c in checks), "duration_s": time.perf_counter() - t0,
              **results, "checks": [dict(asdict(c), passed=c.passed) for c in checks],
              "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
              "device": cfg.device, "backends": llm.engine.backends, "pdl_launches": llm.engine.pdl,
              "torch": torch.__version__,
              "threads": torch.get_num_threads()}
    return report, checks


def write_reports(out: Path, report: dict, checks: list[Check], overwrite: bool) -> None:
    """``out/report.json`` and ``out/junit.xml``, the folder created atomically."""
    import json

    from inferkit.artifacts import atomic_output_dir, write_json

    with atomic_output_dir(out, overwrite) as tmp:
        write_json(tmp / "report.json", json.loads(json.dumps(report, default=str)))
        (tmp / "junit.xml").write_text(junit_xml(report, checks))
