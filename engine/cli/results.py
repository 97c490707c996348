"""The commands that read a finished or unfinished run's store: `status`,
`tree`, `export` (JSONL, or a dataset folder) and `verify`. None of them
writes the store."""

from __future__ import annotations

import shlex
import sqlite3
import sys
from pathlib import Path
from typing import Optional

import typer

from treesynth.engine.cli.harness import ONE_OFF_FLAGS, fail, note, open_store_or_fail
from treesynth.engine.export import is_finished, render_tree, status_lines, write_jsonl
from treesynth.store import Store


def status(store: Path = typer.Argument(..., help="The run's store.")) -> None:
    """Where a run stands: nodes, leaves, samples, calls."""
    db = open_store_or_fail(store)
    for line in status_lines(db):
        typer.echo(line)


def tree(store: Path = typer.Argument(..., help="The run's store.")) -> None:
    """The tree in the terminal: dimensions, values, sample counts."""
    db = open_store_or_fail(store)
    for line in render_tree(db):
        typer.echo(line)


def export(
    store: Path = typer.Argument(..., help="The run's store."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="JSONL file to write (default: stdout)."),
    to: Optional[Path] = typer.Option(None, "--to", help="Write a Hugging Face dataset folder instead: Parquet per split and a README.md card."),
    split: Optional[str] = typer.Option(None, "--split", help="With --to: seeded splits, e.g. train=0.9,test=0.1 [all in train]."),
    jsonl: bool = typer.Option(False, "--jsonl", help="With --to: also write each split as JSONL."),
) -> None:
    """Write the samples as JSONL (fields, leaf key, the path's attributes), or a dataset folder with --to."""
    if to is not None and output is not None:
        fail("give -o FILE (JSONL) or --to DIR (dataset folder), not both")
    if to is None and (split is not None or jsonl):
        fail("--split and --jsonl go with --to DIR")
    db = open_store_or_fail(store)
    if to is not None:
        return _export_folder(db, to, split, jsonl)
    fields = list(db.run().config["sample_schema"]["properties"])
    if output is not None and not output.parent.is_dir():
        fail(f"cannot write {output}: directory {output.parent} does not exist")
    try:
        count = write_jsonl(db, fields, output, sys.stdout)
    except OSError as error:
        fail(f"cannot write {output}: {error.strerror}")
    note(f"exported {count} samples{_unfinished_note(db)}")


def _unfinished_note(db: Store) -> str:
    return "" if is_finished(db.counts()["states"]) else " (the run is not finished; rerun it to continue)"


def _export_folder(db: Store, folder: Path, split: Optional[str], jsonl: bool) -> None:
    from treesynth.engine.dataset import DatasetError, parse_splits, write_dataset

    try:
        splits = parse_splits(split)
        made = [s["settings"].get("argv") for s in db.sessions()]
        argv = next((a for a in made if a and a[0] in ("run", "baseline")), None)
        reproduce = None
        if argv:
            argv = [a for a in argv if a not in ONE_OFF_FLAGS]
            here = ["export", str(db.path), "--to", str(folder)] + (["--split", split] if split else []) + (["--jsonl"] if jsonl else [])
            reproduce = "treesynth " + shlex.join(argv) + "\ntreesynth " + shlex.join(here)
        written = write_dataset(db, folder, splits=splits, jsonl=jsonl, reproduce=reproduce)
    except DatasetError as error:
        fail(str(error))
    except OSError as error:
        fail(f"cannot write {folder}: {error.strerror or error}")
    rows = ", ".join(f"{name} {n}" for name, n in written.rows.items())
    note(f"exported {sum(written.rows.values())} samples to {folder} ({rows}){_unfinished_note(db)}")


def verify(store: Path = typer.Argument(..., help="The run's store.")) -> None:
    """Check the SQLite file and recompute every stored hash and key (read-only)."""
    db = open_store_or_fail(store)
    problems = 0
    try:
        for line in db.integrity_problems():
            typer.echo(f"sqlite integrity: {line}")
            problems += 1
        for line in db.verify():
            typer.echo(line)
            problems += 1
        counts = db.counts()
    except sqlite3.DatabaseError as error:
        fail(f"{store} is damaged: {error}", 1)
    finally:
        db.close()
    if problems:
        typer.echo(f"{problems} problem{'s' if problems != 1 else ''} found in {store}")
        raise typer.Exit(1)
    typer.echo(
        f"ok: {counts['samples']} samples, {counts['calls']} calls and {sum(counts['states'].values())} nodes verified"
    )


def register(app: typer.Typer) -> None:
    for command in (status, tree, export, verify):
        app.command()(command)
