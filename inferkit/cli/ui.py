"""Console output, progress bars, error handling and JSON results, shared by all commands."""

from __future__ import annotations

import functools
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from inferkit.errors import InferkitError

console = Console()
err_console = Console(stderr=True)

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def handle_errors(fn):
    """Print an InferkitError as one line and exit non-zero; tracebacks only with INFERKIT_DEBUG=1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except InferkitError as exc:
            if os.environ.get("INFERKIT_DEBUG") == "1":
                raise
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_ERROR) from None
        except KeyboardInterrupt:
            err_console.print("[bold red]interrupted:[/] nothing was written", highlight=False)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


@contextmanager
def progress_bar(description: str):
    """Yield a ``callback(done, total, label)`` that drives a rich progress bar."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[label]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, console=err_console, transient=False, disable=not sys.stderr.isatty() and os.environ.get("INFERKIT_PROGRESS") != "1") as prog:
        task = prog.add_task(description, total=None, label="")

        def update(done: int, total: int, label: str = "") -> None:
            prog.update(task, completed=done, total=total, label=label)

        yield update


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    t = Table(title=title, title_justify="left")
    for i, col in enumerate(columns):
        t.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        t.add_row(*[fmt_cell(v) for v in row])
    return t


def fmt_cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 100 else f"{v:.1f}"
    return "" if v is None else str(v)


def save_json(path: Path | None, data: dict) -> None:
    if path is None:
        return
    from inferkit.artifacts import write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, data)
    console.print(f"results written to {path}")
