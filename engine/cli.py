"""The typer CLI: parse, build the config, open store and model, run the
engine, render its events. Errors a user can cause end in one line on stderr
and exit code 2."""

from __future__ import annotations

import os
import shlex
import sqlite3
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import typer
from rich.console import Console

from treesynth.engine.config import ConfigError, build_config
from treesynth.engine.presets import load_task
from treesynth.engine.export import is_finished, render_tree, status_lines, write_jsonl
from treesynth.engine.render import Renderer
from treesynth.engine.runs import load_embedder, method_of, open_run_store  # noqa: F401 (cli_balance uses them through this module)
from treesynth.engine.tree import TreeSynth
from treesynth.models.base import ModelError
from treesynth.store import Store, StoreError, acquire_lock, check_store_file

app = typer.Typer(add_completion=False, no_args_is_help=True, help="TreeSynth on a local model: one sentence to a diverse dataset.")
err = Console(stderr=True, soft_wrap=True)

USER_ERRORS = (ConfigError, StoreError, ModelError)


def fail(message: str, code: int = 2) -> None:
    err.print(f"error: {message}", highlight=False, markup=False)
    raise typer.Exit(code)


@contextmanager
def writing(store: Path, continue_command: str, opened: Callable[[], bool] = lambda: True) -> Iterator[None]:
    """The one way a command that writes a store ends when it stops early, for
    `run`, `baseline` and `balance` alike: Ctrl-C says the store is consistent
    (or that nothing was written, while ``opened()`` is false) and how to
    continue, exit 130; a model, config or store error, a full disk, a damaged
    store or an OS error is one line, saying that nothing committed was lost
    and how to continue (exit 2 for what the user can fix, 1 otherwise).
    Every step commits in its own transaction, so any of these leaves the
    store as it was after the last committed step."""
    try:
        yield
    except KeyboardInterrupt:
        state = "the store is consistent" if opened() else "nothing was written"
        err.print(f"\ninterrupted; {state}. Continue with:\n  {continue_command}", highlight=False, markup=False)
        raise typer.Exit(130)
    except USER_ERRORS as error:
        fail(f"{error}; nothing committed was lost. Fix it, then continue with: {continue_command}")
    except sqlite3.OperationalError as error:
        fail(
            f"cannot write to the store {store} ({error}); nothing committed was lost. "
            f"Free space or fix permissions, then continue with: {continue_command}",
            1,
        )
    except sqlite3.DatabaseError as error:
        fail(f"the store {store} is damaged ({error}); check it with: treesynth verify {shlex.quote(str(store))}", 1)
    except OSError as error:
        what = f"{error.strerror}: {error.filename}" if error.filename else str(error)
        fail(f"stopped: {what}; nothing committed was lost. Continue with: {continue_command}", 1)


@app.command()
def run(
    description: Optional[str] = typer.Argument(None, help="The data space, in one sentence (or use --spec)."),
    store: Path = typer.Option(..., "--store", "-s", help="SQLite store for this run: created, or continued."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="TOML task file; flags override its keys."),
    preset: Optional[str] = typer.Option(None, "--preset", help="A shipped task preset (see `treesynth presets`)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Path to a local GGUF model (default: the embedded SmolLM2-135M)."),
    server: Optional[List[str]] = typer.Option(None, "--server", metavar="URL", help="An OpenAI-compatible server's URL (llama-server, vLLM, SGLang) instead of --model; repeat for replicas of one model."),
    server_model: Optional[str] = typer.Option(None, "--server-model", help="The served model's id (default: the server's only model)."),
    server_parallel: Optional[int] = typer.Option(None, "--server-parallel", help="Requests at once per server (default: the slots it reports, else 1)."),
    server_wait: Optional[float] = typer.Option(None, "--server-wait", help="Seconds to wait for a server that went away [60]."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Environment variable holding the server's API key (never stored)."),
    depth: Optional[int] = typer.Option(None, "--depth", help="Maximum tree depth [task file or 2]."),
    pivots: Optional[int] = typer.Option(None, "--pivots", help="Pivot samples per node [10]."),
    leaf_samples: Optional[int] = typer.Option(None, "--leaf-samples", help="Samples per leaf call [10]."),
    max_values: Optional[int] = typer.Option(None, "--max-values", help="Values above which a dimension is infinite [50]."),
    infinite_samples: Optional[int] = typer.Option(None, "--infinite-samples", help="Leaf calls per infinite dimension [3]."),
    samples: Optional[int] = typer.Option(None, "--samples", "-n", help="Exactly this many records after dedup, spread equally over the leaves."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", help="Global sample budget; scales leaf calls (an upper bound)."),
    samples_per_request: Optional[int] = typer.Option(None, "--samples-per-request", help="Samples one request asks for [1: each sample independent]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Run seed [0]."),
    temperature_pivots: Optional[float] = typer.Option(None, "--temperature-pivots", help="[0.9]"),
    temperature_criterion: Optional[float] = typer.Option(None, "--temperature-criterion", help="[0.5]"),
    temperature_coverage: Optional[float] = typer.Option(None, "--temperature-coverage", help="[0.5]"),
    temperature_leaf: Optional[float] = typer.Option(None, "--temperature-leaf", help="[0.9]"),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Most tokens per answer [2048]."),
    threads: Optional[int] = typer.Option(None, "--threads", help="llama.cpp threads [half the cores] (does not change content)."),
    n_ctx: int = typer.Option(4096, "--n-ctx", help="Model context size in tokens, per sequence."),
    parallel: Optional[int] = typer.Option(None, "--parallel", help="Sequences a local model decodes at once [the embedded model: 8 on a CPU, 4 on a GPU; another model: 1] (see README: batch invariance)."),
    gpu_layers: Optional[int] = typer.Option(None, "--gpu-layers", help="Layers offloaded to the GPU, -1 for all [all where llama.cpp has a GPU backend, else 0]."),
    restart: bool = typer.Option(False, "--restart", help="Delete the existing store and start over."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask before --restart deletes a store."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on a terminal."),
) -> None:
    """Build the tree and synthesise its leaves, or continue an interrupted run."""
    continue_command = _continue_command()
    db: Store | None = None
    try:
        with writing(store, continue_command, opened=lambda: db is not None):
            try:
                task = load_task(description, spec, preset, missing="give a description or --spec TASK.toml")
                overrides = {
                    "depth": depth,
                    "pivots": pivots,
                    "leaf_samples": leaf_samples,
                    "max_values": max_values,
                    "infinite_samples": infinite_samples,
                    "max_samples": max_samples,
                    "samples": samples,
                    "samples_per_request": samples_per_request,
                    "seed": seed,
                    "max_tokens": max_tokens,
                    "temperature.pivots": temperature_pivots,
                    "temperature.criterion": temperature_criterion,
                    "temperature.coverage": temperature_coverage,
                    "temperature.leaf": temperature_leaf,
                }
                config = build_config(task, overrides, source=str(spec) if spec else "run")
                for warning in config.warnings:
                    err.print(f"warning: {warning}", highlight=False, markup=False)
                if restart and store.exists():
                    _restart(store, yes)
                embedder = load_embedder()
                the_model = load_model_or_fail(
                    model, threads, n_ctx, server_options(server, server_model, server_parallel, api_key_env, server_wait), parallel, gpu_layers
                )
                db, resumed = open_run_store(store, config, the_model.fingerprint, method_of(embedder))
                # Settings that do not change content: recorded per session, free to change between runs.
                settings = {"threads": threads, "parallel": getattr(the_model, "parallel", None), "progress": progress, "argv": sys.argv[1:]}
                session = db.begin_session(settings, resumed)
            except USER_ERRORS as error:
                fail(str(error))
            from treesynth.engine.plan import plan as plan_of, summary_line

            err.print(summary_line(plan_of(config)), highlight=False, markup=False)
            engine = TreeSynth(config, the_model, db, embedder, session)
            live = progress and err.is_terminal
            with Renderer(err, live) as renderer:
                for event in engine.run():
                    renderer.handle(event)
                    last = event
    finally:
        if db is not None:
            db.close()
    for line in finish_lines(last, config.samples):
        err.print(line, highlight=False, markup=False)
    typer.echo(
        f"done: {last.samples} samples in {store} ({last.dropped} dropped; {last.calls_sent} model calls sent, "
        f"{last.calls_replayed} replayed from the store, {last.wall_seconds:.1f} s)"
    )


def finish_lines(last, samples: int | None) -> list[str]:
    """What a finished run must say in plain words beyond the count."""
    lines = []
    if last.root_reason:
        lines.append(
            f"note: the root could not be split ({last.root_reason}); every sample comes from the whole "
            "data space, as plain sampling would make them. A larger model (--model) splits more reliably."
        )
    wanted = samples if samples is not None else last.wanted
    if last.samples < wanted:
        lines.append(
            f"note: {last.samples} of the {wanted} samples asked for were made: the leaves' answers kept "
            "repeating earlier samples until the request limit (requests_per_sample in a task file) was reached."
        )
    return lines


# Flags that must not be repeated by the command that continues a run.
_ONE_OFF_FLAGS = ("--restart", "--yes", "-y")


def _continue_command() -> str:
    args = [a for a in sys.argv[1:] if a not in _ONE_OFF_FLAGS]
    return "treesynth " + " ".join(shlex.quote(a) for a in args)


def _restart(path: Path, yes: bool) -> None:
    """Delete a store to start over: only a treesynth store, only when no
    live run holds it, only after confirmation (or --yes)."""
    check_store_file(path)
    fd = acquire_lock(path)
    try:
        if not yes and not typer.confirm(f"Delete {path} and start over?", default=False, err=True):
            if not sys.stdin.isatty():
                err.print()  # the answer came from a pipe, so no newline was echoed
            fail("not restarted; the store was left as it was")
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
    finally:
        os.close(fd)


def load_model_or_fail(spec, threads, n_ctx, server=None, parallel=None, gpu_layers=None):
    from treesynth.models.loader import load_model

    def warn(line: str) -> None:
        err.print(f"warning: {line}", highlight=False, markup=False)

    return load_model(spec, threads=threads, n_ctx=n_ctx, server=server, parallel=parallel, gpu_layers=gpu_layers, warn=warn)


def server_options(urls, model, parallel, api_key_env, wait):
    from treesynth.models.loader import ServerOptions

    return ServerOptions(tuple(urls or ()), model, parallel, api_key_env, wait)


def check_output_file(output: Path) -> None:
    """Before any work: an output file's directory exists and the path is not a directory."""
    parent = output.parent if str(output.parent) else Path(".")
    if not parent.is_dir():
        fail(f"cannot write {output}: directory {parent} does not exist")
    if output.is_dir():
        fail(f"cannot write {output}: it is a directory")


def open_store_or_fail(path: Path) -> Store:
    try:
        return Store.open_existing(path, readonly=True)
    except USER_ERRORS as error:
        fail(str(error))


@app.command()
def status(store: Path = typer.Argument(..., help="The run's store.")) -> None:
    """Where a run stands: nodes, leaves, samples, calls."""
    db = open_store_or_fail(store)
    for line in status_lines(db):
        typer.echo(line)


@app.command()
def tree(store: Path = typer.Argument(..., help="The run's store.")) -> None:
    """The tree in the terminal: dimensions, values, sample counts."""
    db = open_store_or_fail(store)
    for line in render_tree(db):
        typer.echo(line)


@app.command()
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
    fields = list(db.run()["config"]["sample_schema"]["properties"])
    if output is not None and not output.parent.is_dir():
        fail(f"cannot write {output}: directory {output.parent} does not exist")
    try:
        count = write_jsonl(db, fields, output, sys.stdout)
    except OSError as error:
        fail(f"cannot write {output}: {error.strerror}")
    err.print(f"exported {count} samples{_unfinished_note(db)}", highlight=False, markup=False)


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
            argv = [a for a in argv if a not in _ONE_OFF_FLAGS]
            here = ["export", str(db.path), "--to", str(folder)] + (["--split", split] if split else []) + (["--jsonl"] if jsonl else [])
            reproduce = "treesynth " + shlex.join(argv) + "\ntreesynth " + shlex.join(here)
        written = write_dataset(db, folder, splits=splits, jsonl=jsonl, reproduce=reproduce)
    except DatasetError as error:
        fail(str(error))
    except OSError as error:
        fail(f"cannot write {folder}: {error.strerror or error}")
    rows = ", ".join(f"{name} {n}" for name, n in written.rows.items())
    err.print(f"exported {sum(written.rows.values())} samples to {folder} ({rows}){_unfinished_note(db)}", highlight=False, markup=False)


@app.command()
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


# Command groups that live in their own modules; each has register(app).
EXTENSIONS = ("treesynth.engine.cli_presets", "treesynth.engine.cli_balance", "treesynth.engine.cli_report", "treesynth.engine.cli_plan")


def _register_extensions() -> None:
    import importlib

    for name in EXTENSIONS:
        importlib.import_module(name).register(app)


_register_extensions()


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        # A reader such as `head` closed the pipe: not an error of ours.
        sys.stderr.close()
        raise SystemExit(0)


if __name__ == "__main__":
    main()
