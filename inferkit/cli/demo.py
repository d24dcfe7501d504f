"""inferkit demo"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from inferkit.cli import options as o
from inferkit.cli.ui import console, handle_errors, progress_bar, save_json, table


@handle_errors
def demo(
    out: Annotated[Path, typer.Option("--out", "-o", help="Work folder for the artifact and results.")] = Path("inferkit-demo"),
    num_samples: Annotated[int, typer.Option(help="Calibration windows of 512 tokens.")] = 128,
    overwrite: o.OverwriteOpt = False,
) -> None:
    """Fetch the demo model, quantize it W4A16 with GPTQ, compare it with full precision, serve-test it."""
    from inferkit.artifacts import check_output_dir
    from inferkit.stages.demo import run_demo

    check_output_dir(out / "smollm2-135m-w4a16-g64", overwrite)
    check_output_dir(out / "serve-test", overwrite)
    with progress_bar("quantizing") as update:
        report = run_demo(out, overwrite, num_samples, log=console.print, progress=update)
    cols = ["model", "bits/weight", "weights MB", "perplexity", "KL vs fp32", "top-1 agreement"]
    rows = [[r["model"], r["bits_per_weight"], r["weights_mb"], r["perplexity"], r["kl_divergence"], r["top1_agreement"]] for r in report["rows"]]
    console.print(table(f"demo: {report['eval_tokens']} held-out tokens, {report['total_seconds']} s", cols, rows))
    console.print(f"artifact: {report['artifact']}")
    st = report["serve_test"]
    q, ld = st["quality"], st["load"]
    console.print(table("serve-test: the artifact in inferkit's runtime", ["metric", "value"], [
        ["agreement with transformers on the same weights", q["agreement"]],
        ["quantized matmuls", {"packed": "PyTorch's packed CPU kernels (bfloat16 products)",
                               "torch": "exact (dequantize, fp32 matmul)"}.get(st["backends"]["linear"], st["backends"]["linear"])],
        ["perplexity runtime / transformers", f"{q['perplexity']:.3f} / {q['reference_perplexity']:.3f}"],
        [f"throughput, {ld['requests']} requests at once (tok/s)", ld["throughput_tok_s"]],
        ["time to first token p50 / p99 (ms)", f"{ld['ttft_ms_p50']:.0f} / {ld['ttft_ms_p99']:.0f}"],
        ["inter-token latency p50 / p99 (ms)", f"{ld['itl_ms_p50']:.0f} / {ld['itl_ms_p99']:.0f}"],
        ["KV utilisation (contiguous cache would be)", f"{ld['kv_utilisation']:.3f} ({ld['contiguous_utilisation']:.3f})"],
        ["result", "[green]passed[/]" if st["passed"] else "[red]FAILED[/]"],
    ]))
    save_json(out / "demo.json", report)
