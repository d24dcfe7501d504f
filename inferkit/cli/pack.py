"""inferkit pack ARTIFACT -o OUT [--draft DRAFT] [--serve-test DIR] [--report FILE] [--archive]"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from inferkit.cli import options as o
from inferkit.cli.ui import console, handle_errors, table


@handle_errors
def pack(
    artifact: Annotated[Path, typer.Argument(help="A quantized artifact (inferkit quantize's output).")],
    out: o.OutOpt,
    draft: Annotated[Optional[Path], typer.Option(help="A draft model folder (inferkit distill's output) → draft/.")] = None,
    serve_test: Annotated[Optional[Path], typer.Option(help="A serve-test output folder (report.json, junit.xml) → reports/.")] = None,
    report: Annotated[Optional[list[Path]], typer.Option(help="Any other report file (sensitivity JSON/PNG, quality JSON) → reports/; repeatable.")] = None,
    archive: Annotated[bool, typer.Option(help="Also write OUT.tar (.tar.zst with zstandard), the manifest first.")] = False,
    overwrite: o.OverwriteOpt = False,
) -> None:
    """Assemble the final artifact: weights, tokenizer, draft, reports, a model card and a manifest."""
    from inferkit.stages.pack import pack as run_pack

    manifest = run_pack(artifact, out, draft, serve_test, report or [], archive, overwrite)
    files = manifest["files"]
    rows = [[name, f"{entry['bytes']:,}"] for name, entry in files.items()]
    console.print(table(f"pack → {out}", ["file", "bytes"], rows))
