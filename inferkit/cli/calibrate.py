"""inferkit calibrate MODEL -o OUT"""

from __future__ import annotations

from typing import Annotated

import typer

from inferkit.cli import options as o
from inferkit.cli.ui import console, handle_errors, progress_bar, save_json, table
from inferkit.data.calibration import CalibrationConfig


@handle_errors
def calibrate(
    model: o.ModelArg,
    out: o.OutOpt,
    calibration: o.CalibrationOpt = None,
    num_samples: o.NumSamplesOpt = None,
    seq_len: o.SeqLenOpt = None,
    seed: o.SeedOpt = None,
    split: Annotated[str, typer.Option(help="train, heldout or all (built-in and jsonl sources).")] = "train",
    chat_template: Annotated[bool, typer.Option(help="Apply the tokenizer's chat template to chat records.")] = True,
    batch_size: Annotated[int, typer.Option(help="Calibration windows per forward pass.")] = 2,
    overwrite: o.OverwriteOpt = False,
    json_out: o.JsonOpt = None,
) -> None:
    """Run calibration text through the model layer by layer and save per-linear input statistics."""
    from inferkit.models.demo import resolve_model_arg
    from inferkit.stages.calibrate import run_calibrate

    defaults = CalibrationConfig()
    cfg = CalibrationConfig(
        source=calibration or defaults.source,
        num_samples=num_samples or defaults.num_samples,
        seq_len=seq_len or defaults.seq_len,
        seed=defaults.seed if seed is None else seed,
        split=split,
        apply_chat_template=chat_template,
    )
    model = resolve_model_arg(model, log=console.print)
    with progress_bar("calibrating") as update:
        summary = run_calibrate(model, cfg, out, overwrite, batch_size, progress=update)
    rows = [[k, v] for k, v in summary["timings_s"].items()]
    console.print(table(f"calibrated {summary['num_tokens']} tokens → {out}", ["phase", "seconds"], rows))
    save_json(json_out, summary)
