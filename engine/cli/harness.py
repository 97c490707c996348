"""What every command shares: the error console, the one-line error rule
(``fail``), the one early-exit harness for commands that write a store
(``writing``), the command that continues a run, and opening models, stores
and output files so that what a user can get wrong ends in one line and exit
code 2. Command modules import this; it imports no command module."""

from __future__ import annotations

import shlex
import sqlite3
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import typer
from rich.console import Console

from treesynth.engine.config import ConfigError
from treesynth.models.base import ModelError
from treesynth.store import Store, StoreError

err = Console(stderr=True, soft_wrap=True)

USER_ERRORS = (ConfigError, StoreError, ModelError)

# Flags that must not be repeated by the command that continues a run.
ONE_OFF_FLAGS = ("--restart", "--yes", "-y")


def fail(message: str, code: int = 2) -> None:
    err.print(f"error: {message}", highlight=False, markup=False)
    raise typer.Exit(code)


def note(line: str) -> None:
    """A line for the user on stderr, printed as it is (no markup, no highlighting)."""
    err.print(line, highlight=False, markup=False)


def continue_command() -> str:
    """The command line that continues this one: the same arguments, less the one-off flags."""
    args = [a for a in sys.argv[1:] if a not in ONE_OFF_FLAGS]
    return "treesynth " + " ".join(shlex.quote(a) for a in args)


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
        note(f"\ninterrupted; {state}. Continue with:\n  {continue_command}")
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


def load_model_or_fail(spec, threads, n_ctx, server=None, parallel=None, gpu_layers=None):
    """The model a command asked for; its errors are the caller's to turn into one line."""
    from treesynth.models.loader import load_model

    def warn(line: str) -> None:
        note(f"warning: {line}")

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
    """An existing store, read-only."""
    try:
        return Store.open_existing(path, readonly=True)
    except USER_ERRORS as error:
        fail(str(error))
