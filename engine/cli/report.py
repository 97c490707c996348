"""CLI command `report`: one self-contained HTML page about a run's store.
Read-only on the store; the page is written through a temp file and a
rename, so OUTPUT is either the old file or the whole new one. Errors a user
can cause end in one line and exit code 2."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import typer

from treesynth.engine.cli import harness as cli
from treesynth.store.files import write_atomically


def _check_output(output: Path) -> None:
    cli.check_output_file(output)
    parent = output.parent if str(output.parent) else Path(".")
    if not os.access(parent, os.W_OK | os.X_OK):
        cli.fail(f"cannot write {output}: directory {parent} is not writable")


def report(
    store: Path = typer.Argument(..., help="The run's store."),
    output: Path = typer.Option(..., "--output", "-o", help="HTML file to write (replaced atomically)."),
) -> None:
    """One self-contained HTML page about a run: the tree with samples, leaf
    sizes, calls and tokens per role and session, dropped samples, diversity."""
    from treesynth.engine.report import report_html

    _check_output(output)
    db = cli.open_store_or_fail(store)
    try:
        page = report_html(db)
    except sqlite3.DatabaseError as error:
        cli.fail(f"cannot read {store} ({error}); check it with: treesynth verify {store}")
    finally:
        db.close()
    try:
        write_atomically(output, [page])
    except OSError as error:
        cli.fail(f"cannot write {output}: {error.strerror or error}")
    typer.echo(f"wrote {output}")


def register(app: typer.Typer) -> None:
    app.command()(report)
