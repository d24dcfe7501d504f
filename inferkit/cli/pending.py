"""Commands of the pipeline that later releases fill in: they say so and exit 2."""

from __future__ import annotations

import typer

from inferkit.cli.ui import EXIT_NOT_BUILT, err_console

PENDING = {
}


def make_pending(name: str, help_text: str):
    def command(ctx: typer.Context) -> None:
        err_console.print(f"inferkit {name} is not built yet in this release.", highlight=False)
        raise typer.Exit(EXIT_NOT_BUILT)

    command.__doc__ = f"{help_text} [not built yet]"
    return command


def register(app: typer.Typer) -> None:
    for name, help_text in PENDING.items():
        app.command(name, context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(make_pending(name, help_text))
