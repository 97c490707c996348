"""The console script. Ctrl-C before a command's own handler is in place
(importing llama.cpp, numpy and rich; typer building the commands) ends
quietly with exit code 130, like Ctrl-C later; nothing has been written then."""

from __future__ import annotations

import sys


def main() -> None:
    try:
        from treesynth.engine.cli import main as cli_main

        cli_main()
    except KeyboardInterrupt:
        sys.stderr.write("\ninterrupted\n")
        raise SystemExit(130)
