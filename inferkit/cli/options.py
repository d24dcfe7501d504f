"""Option aliases shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

ModelArg = Annotated[str, typer.Argument(help="A model folder, a .gguf file, an inferkit artifact, or 'demo'.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder (created atomically).")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace the output folder if it exists.")]
CalibrationOpt = Annotated[Optional[str], typer.Option("--calibration", help="Calibration source: a built-in name (builtin, pydoc, seed), a .txt/.jsonl/.parquet file, or a hub dataset NAME[:CONFIG].")]
NumSamplesOpt = Annotated[Optional[int], typer.Option("--num-samples", help="Number of calibration windows.")]
SeqLenOpt = Annotated[Optional[int], typer.Option("--seq-len", help="Tokens per calibration window.")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Seed for choosing calibration windows.")]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="Also write the results to this JSON file.")]
