"""inferkit quantize MODEL [--recipe FILE] [flags] -o OUT"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Optional

import typer

from inferkit.cli import options as o
from inferkit.cli.ui import console, handle_errors, progress_bar, save_json, table
from inferkit.errors import InferkitError


def _parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        pattern, sep, fmt = item.partition("=")
        if not sep or not pattern or not fmt:
            raise InferkitError(f"--override {item!r} must look like PATTERN=FORMAT, e.g. mlp.down_proj=int8-ch-sym")
        out[pattern] = fmt
    return out


@handle_errors
def quantize(
    model: o.ModelArg,
    out: o.OutOpt,
    recipe: Annotated[Optional[Path], typer.Option(help="A recipe YAML; flags given here override it.")] = None,
    method: Annotated[Optional[str], typer.Option(help="gptq or rtn.")] = None,
    bits: Annotated[Optional[int], typer.Option(help="4 or 8 (8 alone means per-channel).")] = None,
    group_size: Annotated[Optional[int], typer.Option(help="32, 64 or 128; 0 for per-channel.")] = None,
    symmetric: Annotated[Optional[bool], typer.Option("--symmetric/--asymmetric", help="Symmetric (no zero point) or asymmetric.")] = None,
    actorder: Annotated[Optional[bool], typer.Option("--actorder/--no-actorder", help="GPTQ activation ordering (static groups).")] = None,
    scale_search: Annotated[Optional[bool], typer.Option("--scale-search/--no-scale-search", help="Search each group's clipping range for the least error.")] = None,
    scale_dtype: Annotated[Optional[str], typer.Option(help="Store scales as model (the checkpoint's dtype), float16, bfloat16 or float32.")] = None,
    damp: Annotated[Optional[float], typer.Option(help="GPTQ damping, relative to the mean Hessian diagonal.")] = None,
    block_size: Annotated[Optional[int], typer.Option(help="GPTQ lazy-update block size.")] = None,
    ignore: Annotated[Optional[list[str]], typer.Option(help="Keep this layer in full precision (name, suffix or re:REGEX); repeatable.")] = None,
    override: Annotated[Optional[list[str]], typer.Option(help="PATTERN=FORMAT (int8-ch-sym, int4-g32-asym, skip); repeatable.")] = None,
    calibration: o.CalibrationOpt = None,
    num_samples: o.NumSamplesOpt = None,
    seq_len: o.SeqLenOpt = None,
    seed: o.SeedOpt = None,
    stats: Annotated[Optional[Path], typer.Option(help="Use statistics saved by 'inferkit calibrate' instead of calibrating.")] = None,
    plan: Annotated[Optional[Path], typer.Option(help="A plan JSON from 'inferkit plan': one format per layer.")] = None,
    target_bpw: Annotated[Optional[float], typer.Option(help="Mixed precision: spend this many bits per weight where the scan says they matter.")] = None,
    max_cost: Annotated[Optional[float], typer.Option("--max-cost", "--max-kl", help="Mixed precision: fewest bits within this summed sensitivity.")] = None,
    scan: Annotated[Optional[Path], typer.Option(help="Sensitivity scan to plan from (default: run the recipe's scan first).")] = None,
    overwrite: o.OverwriteOpt = False,
    json_out: o.JsonOpt = None,
) -> None:
    """Quantize weights to INT8/INT4 (RTN or GPTQ) and write a compressed-tensors artifact."""
    from inferkit.config import Recipe, load_recipe, with_overrides
    from inferkit.models.demo import resolve_model_arg
    from inferkit.stages.plan import load_plan
    from inferkit.stages.quantize import run_quantize

    base = load_recipe(recipe) if recipe else Recipe()
    q = dict(method=method, bits=bits, group_size=group_size, symmetric=symmetric, actorder=actorder,
             scale_search=scale_search, damp=damp, block_size=block_size, scale_dtype=scale_dtype,
             ignore=tuple(ignore) if ignore else None,
             overrides=_parse_overrides(override) if override else None)
    c = dict(source=calibration, num_samples=num_samples, seq_len=seq_len, seed=seed)
    if plan is not None and (target_bpw is not None or max_cost is not None or scan is not None):
        raise InferkitError("--plan already fixes every layer's format; drop --target-bpw/--max-cost/--scan")
    if target_bpw is not None and max_cost is not None:
        raise InferkitError("give --target-bpw or --max-cost, not both")
    cfg = with_overrides(base, q, c)
    if target_bpw is not None or max_cost is not None:  # a flag replaces the recipe's target
        cfg = dataclasses.replace(cfg, quantize=dataclasses.replace(cfg.quantize, target_bpw=target_bpw, max_cost=max_cost))
    if scan is not None and cfg.quantize.target_bpw is None and cfg.quantize.max_cost is None:
        raise InferkitError("--scan needs a target: --target-bpw or --max-cost (or a recipe with one)")
    layer_plan = load_plan(plan) if plan is not None else None
    model = resolve_model_arg(model, log=console.print)
    with progress_bar(f"quantizing ({cfg.quantize.method})") as update:
        result = run_quantize(model, cfg, out, overwrite, stats_dir=stats, progress=update, plan=layer_plan, scan=scan)
    counts: dict[str, int] = {}
    for fmt in result.layer_formats.values():
        key = fmt.name if fmt else "full precision"
        counts[key] = counts.get(key, 0) + 1
    console.print(table(f"artifact → {out}", ["layers", "count"], [[k, v] for k, v in counts.items()]))
    rows = [[k, v] for k, v in result.seconds.items()]
    rows += [["bits per weight", round(result.bits_per_weight, 4)], ["peak RSS (MB)", round(result.peak_rss_mb, 1)]]
    if result.manifest.get("plan"):
        rows.append(["predicted cost (plan)", f"{result.manifest['plan']['predicted_cost']:.4e}"])
    console.print(table("quantize", ["", "value"], rows))
    save_json(json_out, {"out": str(out), "bits_per_weight": result.bits_per_weight, "timings_s": result.seconds,
                         "peak_rss_mb": result.peak_rss_mb, "layers": result.manifest.get("layers", {})})
