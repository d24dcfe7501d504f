"""inferkit serve-test ARTIFACT"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from inferkit.cli import options as o
from inferkit.cli.ui import console, err_console, handle_errors, progress_bar, table
from inferkit.errors import InferkitError

EXIT_FAILED = 1


@handle_errors
def serve_test(
    model: Annotated[str, typer.Argument(help="An inferkit artifact, a Hugging Face safetensors folder, or 'demo'.")],
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Folder for report.json and junit.xml (default: serve-test-NAME).")] = None,
    overwrite: o.OverwriteOpt = False,
    recipe: Annotated[Optional[Path], typer.Option(help="A recipe YAML whose serve_test section sets defaults and thresholds.")] = None,
    reference: Annotated[Optional[str], typer.Option(help="Reference model for quality (default: the artifact's own weights, dequantized, in transformers).")] = None,
    text: Annotated[Optional[Path], typer.Option(help="Text for perplexity and prompts (default: the built-in held-out text).")] = None,
    windows: Annotated[Optional[int], typer.Option(help="Perplexity windows.")] = None,
    window_size: Annotated[Optional[int], typer.Option(help="Tokens per perplexity window.")] = None,
    num_requests: Annotated[Optional[int], typer.Option(help="Requests in the load test.")] = None,
    prompt_len: Annotated[Optional[str], typer.Option(help="Prompt lengths MIN:MAX (tokens, uniform).")] = None,
    output_len: Annotated[Optional[str], typer.Option(help="Output lengths MIN:MAX (tokens, uniform).")] = None,
    request_rate: Annotated[Optional[float], typer.Option(help="Arrivals per second (Poisson); default: all at once.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of the workload.")] = None,
    kv_cache_gb: Annotated[Optional[float], typer.Option(help="KV pool size in GiB.")] = None,
    num_kv_blocks: Annotated[Optional[int], typer.Option(help="KV pool size in blocks (overrides --kv-cache-gb).")] = None,
    block_size: Annotated[Optional[int], typer.Option(help="Tokens per KV block.")] = None,
    max_num_seqs: Annotated[Optional[int], typer.Option(help="Sequences in flight at once.")] = None,
    max_num_batched_tokens: Annotated[Optional[int], typer.Option(help="Tokens per engine step.")] = None,
    max_model_len: Annotated[Optional[int], typer.Option(help="Context length served (default: the model's).")] = None,
    prefix_caching: Annotated[Optional[bool], typer.Option("--prefix-caching/--no-prefix-caching", help="Share KV blocks of common prompt prefixes.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda.")] = None,
    linear_backend: Annotated[Optional[str], typer.Option(help="Quantized matmuls: auto (triton on CUDA, packed on the CPU), packed (PyTorch's packed INT4/INT8 CPU kernels, bfloat16 products), torch (exact: dequantize, then matmul), reference, triton.")] = None,
    pdl: Annotated[Optional[bool], typer.Option("--pdl/--no-pdl", help="Launch the quantized matmuls as programmatic dependent launches (Triton linears on sm_90+ GPUs: each starts while the kernel before it finishes; a plain launch elsewhere).")] = None,
    draft: Annotated[Optional[Path], typer.Option(help="Draft model folder: serve with speculative decoding and measure it (default: a packed artifact's own draft/).")] = None,
    use_draft: Annotated[bool, typer.Option("--use-draft/--no-draft", help="Use the packed artifact's draft/ when --draft is not given.")] = True,
    num_speculative_tokens: Annotated[Optional[int], typer.Option(help="Draft tokens proposed per step.")] = None,
    min_agreement: Annotated[Optional[float], typer.Option(help="Fail below this greedy agreement with the reference (0-1).")] = None,
    max_ppl_increase: Annotated[Optional[float], typer.Option(help="Fail above this perplexity increase over the reference (%).")] = None,
    min_throughput: Annotated[Optional[float], typer.Option(help="Fail below this many generated tokens/s under load.")] = None,
    max_ttft_p99_ms: Annotated[Optional[float], typer.Option(help="Fail above this p99 time to first token (ms).")] = None,
    max_itl_p99_ms: Annotated[Optional[float], typer.Option(help="Fail above this p99 inter-token latency (ms).")] = None,
    min_kv_utilisation: Annotated[Optional[float], typer.Option(help="Fail below this KV utilisation (0-1).")] = None,
    max_peak_rss_mb: Annotated[Optional[float], typer.Option(help="Fail above this peak RSS (MB).")] = None,
    quality: Annotated[bool, typer.Option("--quality/--no-quality", help="Measure perplexity and agreement.")] = True,
    load: Annotated[bool, typer.Option("--load/--no-load", help="Run the load test.")] = True,
) -> None:
    """Load the artifact into the bundled runtime; measure quality, speed and memory; exit 1 if a threshold fails."""
    from inferkit.artifacts import check_output_dir
    from inferkit.config import Recipe, _range, load_recipe, with_overrides
    from inferkit.models.demo import resolve_model_arg
    from inferkit.stages.serve_test import run_serve_test, write_reports

    base = load_recipe(recipe) if recipe else Recipe()
    flags = dict(reference=reference, text=str(text) if text else None, windows=windows, window_size=window_size,
                 num_requests=num_requests, request_rate=request_rate, seed=seed, kv_cache_gb=kv_cache_gb,
                 num_kv_blocks=num_kv_blocks, block_size=block_size, max_num_seqs=max_num_seqs,
                 max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                 enable_prefix_caching=prefix_caching, device=device, linear_backend=linear_backend, pdl=pdl,
                 min_agreement=min_agreement,
                 draft=str(draft) if draft else None, num_speculative_tokens=num_speculative_tokens,
                 max_ppl_increase=max_ppl_increase, min_throughput=min_throughput, max_ttft_p99_ms=max_ttft_p99_ms,
                 max_itl_p99_ms=max_itl_p99_ms, min_kv_utilisation=min_kv_utilisation, max_peak_rss_mb=max_peak_rss_mb,
                 prompt_len=_range(prompt_len, "--prompt-len") if prompt_len else None,
                 output_len=_range(output_len, "--output-len") if output_len else None)
    path = Path(resolve_model_arg(model, log=console.print))
    if not path.is_dir():
        raise InferkitError(f"{path} is not a model folder")
    if draft is None and use_draft and (path / "draft" / "config.json").is_file():
        flags["draft"] = str(path / "draft")  # a packed artifact brings its draft
        console.print(f"speculative decoding with the artifact's draft: {path / 'draft'}")
    cfg = with_overrides(base, serve_test=flags).serve_test
    out = out or Path(f"serve-test-{path.name}")
    check_output_dir(out, overwrite)
    with progress_bar("serve-test") as update:
        report, checks = run_serve_test(path, cfg, quality=quality, load=load,
                                        progress=lambda stage, d, t: update(d, t, stage))
    write_reports(out, report, checks, overwrite)
    _print_summary(report, checks)
    console.print(f"report: {out}/report.json, {out}/junit.xml", highlight=False)
    if not report["passed"]:
        failed = [c.name for c in checks if not c.passed]
        err_console.print(f"[bold red]serve-test failed:[/] {', '.join(failed)}", highlight=False)
        raise typer.Exit(EXIT_FAILED)
    console.print("[bold green]serve-test passed[/]")


def _print_summary(report: dict, checks) -> None:
    rows = []
    q, ld, mem = report.get("quality"), report.get("load"), report["memory"]
    if q:
        rows += [["perplexity (reference)", f"{q['perplexity']:.3f} ({q['reference_perplexity']:.3f})"],
                 ["perplexity increase %", q["ppl_increase_pct"]],
                 ["greedy agreement (teacher-forced)", q["agreement"]],
                 ["greedy match / exact prompts", f"{q['greedy_match']:.4f} / {q['greedy_exact_prompts']} of {q['agreement_prompts']}"]]
    if ld:
        rows += [["requests (failed)", f"{ld['requests']} ({ld['failed_requests']})"],
                 ["throughput tok/s (incl. prompts)", f"{ld['throughput_tok_s']:.1f} ({ld['total_tok_s']:.1f})"],
                 ["TTFT ms p50 / p99", f"{ld['ttft_ms_p50']:.0f} / {ld['ttft_ms_p99']:.0f}"],
                 ["inter-token ms p50 / p99", f"{ld['itl_ms_p50']:.1f} / {ld['itl_ms_p99']:.1f}"],
                 ["preemptions", ld["preemptions"]],
                 ["peak KV blocks (of pool)", f"{ld['peak_kv_blocks_used']} of {ld['kv_blocks']} ({ld['peak_kv_mb']:.0f} MB)"],
                 ["KV utilisation (contiguous would be)", f"{ld['kv_utilisation']:.3f} ({ld['contiguous_utilisation']:.3f})"]]
    rows += [["peak RSS MB", mem["peak_rss_mb"]], ["weights MB (packed)", mem["weights_mb"]]]
    if report.get("backends"):
        rows.append(["backends (linear / attention)", f"{report['backends']['linear']} / {report['backends']['attention']}"])
    if report.get("config", {}).get("pdl"):  # asked for: whether the GPU ran them so
        rows.append(["matmul launches", "PDL" if report.get("pdl_launches") else "plain (PDL needs sm_90+)"])
    sp = report.get("speculative")
    if sp:
        rows += [["draft acceptance (by position)", f"{sp['acceptance_rate']:.3f} ("
                  + ", ".join(f"{a:.2f}" for a in sp["acceptance_by_position"]) + ")"],
                 ["tokens per speculative step", sp["tokens_per_step"]],
                 ["speedup batch 1 / batched", f"{sp['speedup_batch1']:.2f}x / {sp['speedup_batched']:.2f}x"],
                 ["greedy output equals plain", sp["greedy_equal_plain"]]]
    console.print(table(f"serve-test {report['model']}", ["metric", "value"], rows))
    if checks:
        console.print(table("checks", ["check", "value", "threshold", "result"],
                            [[c.name, c.value, f"{'≥' if c.at_least else '≤'} {c.threshold}",
                              "[green]pass[/]" if c.passed else "[red]FAIL[/]"] for c in checks]))
