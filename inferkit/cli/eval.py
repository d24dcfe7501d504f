"""inferkit eval MODEL_OR_ARTIFACT"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from inferkit.cli import options as o
from inferkit.cli.ui import console, handle_errors, progress_bar, save_json, table
from inferkit.errors import InferkitError


@handle_errors
def eval_cmd(
    model: o.ModelArg,
    text: Annotated[Optional[Path], typer.Option(help="Evaluate on this text file.")] = None,
    calibration: Annotated[Optional[str], typer.Option(help="Evaluate on a calibration source instead (e.g. builtin, split heldout).")] = None,
    split: Annotated[str, typer.Option(help="Split of the calibration source.")] = "heldout",
    window_size: Annotated[int, typer.Option(help="Tokens per window.")] = 512,
    windows: Annotated[int, typer.Option(help="Number of windows.")] = 40,
    stride: Annotated[Optional[int], typer.Option(help="Tokens between window starts (default: window size).")] = None,
    reference: Annotated[Optional[str], typer.Option(help="Reference model for KL divergence and top-1 agreement.")] = None,
    batch_size: Annotated[int, typer.Option(help="Windows per forward pass.")] = 4,
    json_out: o.JsonOpt = None,
) -> None:
    """Perplexity on fixed windows, and KL divergence against a reference model."""
    from inferkit.data.calibration import CalibrationConfig, load_documents, render
    from inferkit.eval import EvalWindows, evaluate, text_windows
    from inferkit.models import load_model
    from inferkit.models.demo import resolve_model_arg

    if (text is None) == (calibration is None):
        raise InferkitError("pass exactly one of --text FILE or --calibration SOURCE")
    spec = EvalWindows(window_size, windows, stride)
    loaded = load_model(resolve_model_arg(model, log=console.print))
    if text is not None:
        if not text.is_file():
            raise InferkitError(f"text file {text} does not exist")
        body = text.read_text(encoding="utf-8")
    else:
        docs = load_documents(CalibrationConfig(source=calibration, split=split))
        body = "\n\n".join(render(d, loaded.tokenizer, True) for d in docs)
    ids = text_windows(loaded.tokenizer, body, spec)
    ref = load_model(resolve_model_arg(reference, log=console.print), tokenizer=False).model if reference else None
    with progress_bar("evaluating") as update:
        result = evaluate(loaded.model, ids, ref, batch_size, progress=lambda d, t: update(d, t, "windows"))
    result.update(model=model, reference=reference, text=str(text) if text else f"{calibration}:{split}",
                  window_size=window_size, windows=windows, stride=stride or window_size)
    rows = [["perplexity", result["perplexity"]], ["tokens", result["tokens"]]]
    if ref is not None:
        rows += [["KL divergence (nats/token)", result["kl_divergence"]], ["top-1 agreement", result["top1_agreement"]]]
    console.print(table(f"eval {model}", ["metric", "value"], rows))
    save_json(json_out, result)
