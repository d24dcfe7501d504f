"""inferkit run RECIPE.yaml"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from inferkit.cli import options as o
from inferkit.cli.ui import console, handle_errors, progress_bar, table


@handle_errors
def run(
    recipe: Annotated[Path, typer.Argument(help="A recipe with `model:` and the stages' sections.")],
    work: Annotated[Path, typer.Option(help="Work folder: one sub-folder per stage, keyed by its inputs (reused by reruns).")] = Path("inferkit-work"),
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Copy the final packed artifact here.")] = None,
    from_stage: Annotated[Optional[str], typer.Option("--from", help="Rerun from this stage on, even if done before.")] = None,
    only: Annotated[Optional[str], typer.Option(help="Run only this stage (the earlier ones must be done).")] = None,
    overwrite: o.OverwriteOpt = False,
) -> None:
    """The whole pipeline from one recipe: calibrate, scan, quantize, distill, serve-test, pack.
    Finished stages are skipped; an interrupted run resumes at the stage it lost. Exit 1 when a
    stage fails or serve-test's thresholds do not pass."""
    import json

    from inferkit.stages.pipeline import run_pipeline

    with progress_bar("run") as update:
        summary = run_pipeline(recipe, work, out, from_stage, only, overwrite, log=console.print, progress=update)
    rows = [[s.stage, s.status, f"{s.seconds:.1f}", s.output, {True: "pass", False: "FAIL", None: ""}[s.passed]]
            for s in summary.stages]
    console.print(table(f"inferkit run {recipe.name}", ["stage", "status", "seconds", "output", "result"], rows))
    console.print(f"artifact: {summary.artifact}; summary: {Path(work) / 'run-summary.json'}")
    if not summary.passed:
        console.print("[red]FAILED[/]: " + json.dumps([s.stage for s in summary.stages if s.passed is False]))
        raise typer.Exit(1)
