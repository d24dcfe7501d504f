"""inferkit tune-kernels ARTIFACT -o TABLE.json"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from inferkit.cli.ui import console, handle_errors, progress_bar, save_json, table
from inferkit.errors import InferkitError


def _rows(text: str) -> list[int]:
    try:
        rows = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InferkitError(f"--rows takes row counts separated by commas (e.g. 1,2,4,16), got {text!r}") from None
    return sorted(set(rows))


def describe(cfg: dict) -> str:
    """A config in a few characters: ``gemv 128x128 k8 w4`` (BN x BK, splits of K, warps)."""
    from inferkit.kernels.tuned import kernel_for

    kernel = kernel_for(cfg["M"], cfg)
    variant = {("gemv", False): " strided-x", ("mma", False): " dot/value", ("swap", False): " dot/value"}.get((kernel, cfg.get("VEC_X", cfg.get("ONE_DOT", True))), "")
    cap = f" regs{cfg['REG_CAP'] or '-uncapped'}" if "REG_CAP" in cfg else ""
    ahead = f" pf{cfg['PREFETCH']}" if cfg.get("PREFETCH", 1) != 1 else ""
    ahead += f" st{cfg['STAGES']}" if cfg.get("STAGES") else ""
    launch = " pdl" if cfg.get("PDL") else ""
    return f"{kernel} {cfg['BN']}x{cfg['BK']} k{cfg['SPLIT_K']} w{cfg['num_warps']}{variant}{cap}{ahead}{launch}"


def duration(us: float | None) -> str:
    """A time per call in three or four digits and its unit (GPU calls take µs, interpreted ones seconds)."""
    if us is None:
        return ""
    unit, scale = next((u, s) for u, s in (("µs", 1.0), ("ms", 1e3), ("s", 1e6))
                       if us < 999.5 * s or u == "s")  # thresholds as rounded: 999.6 µs is 1.0 ms
    return f"{us / scale:.1f} {unit}" if us < 99.95 * scale else f"{us / scale:.0f} {unit}"


@handle_errors
def tune_kernels(
    model: Annotated[str, typer.Argument(help="A quantized artifact (compressed-tensors pack-quantized, as inferkit quantize writes).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The table to write (JSON); point INFERKIT_KERNEL_CONFIGS at it.")],
    rows: Annotated[str, typer.Option(help="Activation row counts to tune, one per bucket: 1, 2, 3, 4 exactly, then 5-16, 17-32, 33-64.")] = "1,2,3,4,16,32,64",
    dtype: Annotated[str, typer.Option(help="Activation dtype the runtime will serve in: bfloat16, float16 or float32.")] = "bfloat16",
    grid: Annotated[str, typer.Option(help="Configs per shape and row count: full (about 30-70), quick (6-33, around the heuristic), smoke (one per kernel: checks the command).")] = "full",
    device: Annotated[Optional[str], typer.Option(help="cuda (default when there is one), or cpu under TRITON_INTERPRET=1 (a functional check; its times mean nothing).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the table if it exists.")] = False,
    update: Annotated[bool, typer.Option("--update", help="Add to an existing table for this GPU (entries measured again are replaced).")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write every config's time and error as JSON here.")] = None,
    pdl: Annotated[bool, typer.Option("--pdl", help="Also time the 3 fastest configs per shape as programmatic dependent launches (sm_90+ GPUs; back to back, each call starts during the one before) and keep one if faster.")] = False,
) -> None:
    """Time the INT4/INT8 matmul's tile configs for this model's layer shapes on this GPU and write
    the fastest per shape and row count as a table the runtime launches with."""
    from inferkit.stages.tune_kernels import tune, write

    if overwrite and update:
        raise InferkitError("give --overwrite or --update, not both")
    if out.exists() and not (overwrite or update):
        raise InferkitError(f"{out} exists: pass --overwrite to replace it or --update to add to it")
    if out.suffix != ".json":
        raise InferkitError(f"--out must be a .json file, got {out}")
    with progress_bar("tuning the matmul") as update_bar:
        result = tune(model, _rows(rows), dtype=dtype, device=device, grid=grid, pdl=pdl, progress=update_bar)
    entries = write(out, result, model, overwrite, update)
    shown = []
    for r in result["results"]:
        best = r["best"]
        heur = best.get("heuristic_us") if best else None
        failed = sum(1 for c in r["configs"] if c["error"])
        shown.append([r["shape"], len(r["layers"]), r["M"], duration(heur), duration(best["us"] if best else None),
                      f"{heur / best['us']:.2f}x" if best and heur else None, describe(best) if best else "none ran",
                      f"{failed}/{len(r['configs'])}" if failed else ""])
    columns = ["shape", "layers", "rows", "heuristic", "best", "gain", "best config", "failed"]
    if not any(row[-1] for row in shown):  # the column only when a config failed
        columns, shown = columns[:-1], [row[:-1] for row in shown]
    console.print(table(f"matmul tiles on {result['device']} ({result['dtype']} activations; time per call; "
                        "config: kernel BNxBK, k splits of K, w warps)", columns, shown))
    if result["interpreted"]:
        console.print("[yellow]interpreted on the CPU: these times are the interpreter's, not a GPU's[/]")
    console.print(f"{len(entries)} configs in {out}; serve with them: INFERKIT_KERNEL_CONFIGS={out}")
    save_json(json_out, {k: v for k, v in result.items() if k != "entries"} | {"table": str(out)})
