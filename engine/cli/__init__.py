"""The typer CLI: one app, one module per command group, one harness.

- ``harness``: the error console, the one-line error rule, the early-exit
  harness of commands that write a store, opening models, stores and outputs;
- ``run``: `run`;
- ``results``: `status`, `tree`, `export`, `verify` (read a store);
- ``balance``: `baseline`, `diversity`, `balance`;
- ``plan``: `plan` (takes `run`'s options);
- ``report``: `report` (the HTML page);
- ``presets``: `presets`, `preset show`.

Command modules import the harness, never each other (``plan`` reads `run`'s
signature); nothing else in the package imports the CLI except the console
script, treesynth/engine/entry.py."""

from __future__ import annotations

import sys

import typer

from treesynth.engine.cli import balance, plan, presets, report, results, run

app = typer.Typer(add_completion=False, no_args_is_help=True, help="TreeSynth on a local model: one sentence to a diverse dataset.")

for _group in (run, results, presets, balance, report, plan):
    _group.register(app)


def main() -> None:
    try:
        app()
    except BrokenPipeError:
        # A reader such as `head` closed the pipe: not an error of ours.
        sys.stderr.close()
        raise SystemExit(0)


if __name__ == "__main__":
    main()
