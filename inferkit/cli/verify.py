"""inferkit verify ARTIFACT"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from inferkit.cli.ui import console, handle_errors, table


@handle_errors
def verify(
    artifact: Annotated[Path, typer.Argument(help="The artifact folder to check.")],
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Also write the report as JSON here.")] = None,
) -> None:
    """Re-hash every file against the manifest, check the tensors against config.json, and say at
    which tensor-parallel degrees the artifact can be sharded. Exit 0 when clean, 1 otherwise."""
    import json

    from inferkit.stages.verify import verify_artifact

    report = verify_artifact(artifact)
    rows = [["error", e] for e in report.errors] + [["warning", w] for w in report.warnings]
    if rows:
        console.print(table(f"verify {artifact}: findings", ["kind", "finding"], rows))
    if report.tensor_parallel:
        console.print(table("tensor parallelism (vLLM-style sharding)", ["degree", "shards", "why not"],
                            [[tp, "yes" if not why else "no", "; ".join(why)] for tp, why in report.tensor_parallel.items()]))
    verdict = "[green]OK[/]" if report.ok else f"[red]FAILED[/] ({len(report.errors)} errors)"
    console.print(f"{verdict}: {report.files_checked} files hashed, {report.tensors_checked} tensors checked")
    if json_out:
        json_out.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    raise typer.Exit(0 if report.ok else 1)
