"""inferkit sensitivity-scan MODEL -o OUT, and inferkit plan SCAN --target-bpw B -o plan.json"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from inferkit.cli import options as o
from inferkit.cli.ui import EXIT_INTERRUPTED, console, err_console, handle_errors, progress_bar, save_json, table
from inferkit.errors import InferkitError


@handle_errors
def sensitivity_scan(
    model: o.ModelArg,
    out: o.OutOpt,
    recipe: Annotated[Optional[Path], typer.Option(help="A recipe YAML (quantize, calibration and sensitivity sections); flags override it.")] = None,
    mode: Annotated[Optional[str], typer.Option(help="block (decoder-block output error, default), kl (next-token KL, slow) or proxy (Hessian-weighted weight error, instant).")] = None,
    method: Annotated[Optional[str], typer.Option(help="Quantizer to score with: gptq or rtn (use the one the real run will use).")] = None,
    formats: Annotated[Optional[str], typer.Option(help="Comma-separated candidate formats, e.g. int8-ch,int4-g32,int4-g64,int4-g128,int3-g64.")] = None,
    symmetric: Annotated[Optional[bool], typer.Option("--symmetric/--asymmetric", help="Symmetry of formats that do not name one.")] = None,
    scale_dtype: Annotated[Optional[str], typer.Option(help="Scales stored as model, float16, bfloat16 or float32 (as the real run will).")] = None,
    tie: Annotated[Optional[bool], typer.Option("--tie/--no-tie", help="Score q/k/v and gate/up together, as serving engines fuse them.")] = None,
    eval_samples: Annotated[Optional[int], typer.Option(help="Held-out windows to measure on (default: block 8, kl 4).")] = None,
    eval_seq_len: Annotated[Optional[int], typer.Option(help="Tokens per held-out window (default: block 512, kl 256).")] = None,
    calibration: o.CalibrationOpt = None,
    num_samples: o.NumSamplesOpt = None,
    seq_len: o.SeqLenOpt = None,
    seed: o.SeedOpt = None,
    stats: Annotated[Optional[Path], typer.Option(help="Hessians saved by 'inferkit calibrate' (skips gathering them).")] = None,
    top: Annotated[int, typer.Option(help="Rows in the table of most sensitive units.")] = 12,
    overwrite: o.OverwriteOpt = False,
    json_out: o.JsonOpt = None,
) -> None:
    """Measure how much each layer suffers at each precision; resumable, writes scan.json and a heatmap."""
    from inferkit.config import Recipe, load_recipe, with_overrides
    from inferkit.models.demo import resolve_model_arg
    from inferkit.stages.sensitivity import run_scan

    base = load_recipe(recipe) if recipe else Recipe()
    fmts = tuple(f.strip() for f in formats.split(",") if f.strip()) if formats else None
    cfg = with_overrides(base, dict(method=method, symmetric=symmetric, scale_dtype=scale_dtype),
                         dict(source=calibration, num_samples=num_samples, seq_len=seq_len, seed=seed),
                         dict(mode=mode, formats=fmts, tie=tie, eval_samples=eval_samples, eval_seq_len=eval_seq_len))
    model = resolve_model_arg(model, log=console.print)
    try:
        with progress_bar(f"scanning ({cfg.sensitivity.mode}, {cfg.quantize.method})") as update:
            result = run_scan(model, cfg, cfg.sensitivity, out, overwrite, stats_dir=stats, progress=update)
    except KeyboardInterrupt:
        err_console.print(f"[bold red]interrupted:[/] finished layers are kept in {out.parent / ('.' + out.name + '.partial')}; "
                          "run the same command again to resume", highlight=False)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    console.print(sensitivity_table(result, top))
    console.print(f"{len(result['units'])} units × {len(result['formats'])} formats in {result['timings_s']['total']:.0f} s → {out}")
    save_json(json_out, result)


def sensitivity_table(scan: dict, top: int):
    """The units that suffer most at their fewest-bit format, with their cost at every format."""
    fmts = [f for f in scan["formats"] if any(f in row for row in scan["costs"].values())]
    units = sorted(scan["units"], key=lambda u: -max(scan["costs"][u["name"]].values()))[:top]
    rows = [[_short(u["name"]), *[_fmt(scan["costs"][u["name"]].get(f)) for f in fmts]] for u in units]
    return table(f"most sensitive units ({scan['mode']}: {scan['cost']})", ["unit", *fmts], rows)


def _short(name: str) -> str:
    _, _, idx, rest = name.split(".", 3)
    return f"L{idx} {rest.replace('self_attn.', 'attn.')}"


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.3e}"


@handle_errors
def plan(
    scan: Annotated[Path, typer.Argument(help="A sensitivity scan folder (or its scan.json).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The plan JSON to write.")],
    target_bpw: Annotated[Optional[float], typer.Option(help="Bits per weight to spend (scales and zero points included).")] = None,
    max_cost: Annotated[Optional[float], typer.Option("--max-cost", "--max-kl", help="Fewest bits whose summed sensitivity stays within this (KL for a kl scan).")] = None,
    overwrite: o.OverwriteOpt = False,
) -> None:
    """Choose a format per layer from a scan: least summed sensitivity within a bit budget."""
    from inferkit.artifacts import write_json
    from inferkit.stages.plan import load_scan, make_plan

    if (target_bpw is None) == (max_cost is None):
        raise InferkitError("give one of --target-bpw and --max-cost")
    if out.exists() and not overwrite:
        raise InferkitError(f"output {out} already exists; pass --overwrite to replace it")
    data, file = load_scan(scan)
    result = make_plan(data, file, target_bpw=target_bpw, max_cost=max_cost)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    write_json(tmp, result)
    tmp.replace(out)
    console.print(plan_table(result))


def plan_table(result: dict):
    rows = [[name, count] for name, count in sorted(result["format_counts"].items())]
    rows.append(["bits per weight", f"{result['bits_per_weight']:.4f}"])
    rows.append(["predicted cost", f"{result['predicted_cost']:.4e}"])
    for name, u in result["uniform"].items():
        rows.append([f"uniform {name}", f"{u['bits_per_weight']:.4f} bpw, cost {u['predicted_cost']:.4e}"])
    return table(f"plan ({json.dumps(result['target'])})", ["", "value"], rows)
