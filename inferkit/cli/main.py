"""The root app: registers the commands, nothing else."""

from __future__ import annotations

import signal
from typing import Annotated

import typer

from inferkit import __version__
from inferkit.cli import calibrate, demo, distill, eval as eval_mod, models, pack, quantize, run, sensitivity, serve_test, tune_kernels, verify

app = typer.Typer(
    name="inferkit",
    help="Turn a trained checkpoint into a validated, quantized serving artifact.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"inferkit {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """inferkit: calibrate → sensitivity-scan → quantize → distill → pack → serve-test."""


app.command("calibrate")(calibrate.calibrate)
app.command("sensitivity-scan")(sensitivity.sensitivity_scan)
app.command("plan")(sensitivity.plan)
app.command("quantize")(quantize.quantize)
app.command("eval")(eval_mod.eval_cmd)
app.command("demo")(demo.demo)
app.command("serve-test")(serve_test.serve_test)
app.command("distill")(distill.distill)
app.command("verify")(verify.verify)
app.command("pack")(pack.pack)
app.command("run")(run.run)
app.command("tune-kernels")(tune_kernels.tune_kernels)
app.add_typer(models.app, name="models")


def _sigterm(_signum, _frame):
    raise KeyboardInterrupt  # unwinds through the atomic writers, which delete their temp folders


def main() -> None:
    signal.signal(signal.SIGTERM, _sigterm)
    app()
