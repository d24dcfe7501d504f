"""inferkit quantize MODEL [--recipe FILE] [flags] -o OUT"""

from __future__ import annotations

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
    damp: Annotated[Optional[float], typer.Option(help="GPTQ damping, relative to the mean Hessian diagonal.")] = None,
    block_size: Annotated[Optional[int], typer.Option(help="GPTQ lazy-update block size.")] = None,
    ignore: Annotated[Optional[list[str]], typer.Option(help="Keep this layer in full precision (name, suffix or re:REGEX); repeatable.")] = None,
    override: Annotated[Optional[list[str]], typer.Option(help="PATTERN=FORMAT (int8-ch-sym, int4-g32-asym, skip); repeatable.")] = None,
    calibration: o.CalibrationOpt = None,
    num_samples: o.NumSamplesOpt = None,
    seq_len: o.SeqLenOpt = None,
    seed: o.SeedOpt = None,
    stats: Annotated[Optional[Path], typer.Option(help="Use statistics saved by 'inferkit calibrate' instead of calibrating.")] = None,
    overwrite: o.OverwriteOpt = False,
    json_out: o.JsonOpt = None,
) -> None:
    """Quantize weights to INT8/INT4 (RTN or GPTQ) and write a compressed-tensors artifact."""
    from inferkit.config import Recipe, load_recipe, with_overrides
    from inferkit.models.demo import resolve_model_arg
    from inferkit.stages.quantize import run_quantize

    base = load_recipe(recipe) if recipe else Recipe()
    q = dict(method=method, bits=bits, group_size=group_size, symmetric=symmetric, actorder=actorder,
             scale_search=scale_search, damp=damp, block_size=block_size,
             ignore=tuple(ignore) if ignore else None,
             overrides=_parse_overrides(override) if override else None)
    c = dict(source=calibration, num_samples=num_samples, seq_len=seq_len, seed=seed)
    cfg = with_overrides(base, q, c)
    model = resolve_model_arg(model, log=console.print)
    with progress_bar(f"quantizing ({cfg.quantize.method})") as update:
        result = run_quantize(model, cfg, out, overwrite, stats_dir=stats, progress=update)
    counts: dict[str, int] = {}
    for fmt in result.layer_formats.values():
        key = fmt.name if fmt else "full precision"
        counts[key] = counts.get(key, 0) + 1
    console.print(table(f"artifact → {out}", ["layers", "count"], [[k, v] for k, v in counts.items()]))
    rows = [[k, v] for k, v in result.seconds.items()]
    rows += [["bits per weight", round(result.bits_per_weight, 4)], ["peak RSS (MB)", round(result.peak_rss_mb, 1)]]
    console.print(table("quantize", ["", "value"], rows))
    save_json(json_out, {"out": str(out), "bits_per_weight": result.bits_per_weight, "timings_s": result.seconds,
                         "peak_rss_mb": result.peak_rss_mb, "layers": result.manifest.get("layers", {})})
