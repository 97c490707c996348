"""The console script. Ctrl-C before a command's own handler is in place
(importing llama.cpp, numpy and rich; typer building the commands) ends
quietly with exit code 130, like Ctrl-C later; nothing has been written then.

Python may wrap the KeyboardInterrupt on its way out: one that lands while a
class is being built (pydantic's models, at import) leaves as "RuntimeError:
Error calling __set_name__", caused by it. That is still the user's Ctrl-C."""

from __future__ import annotations

import sys


def _interrupted(error: BaseException) -> bool:
    """Whether a KeyboardInterrupt caused ERROR (through __cause__ or __context__)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def main() -> None:
    try:
        from treesynth.engine.cli import main as cli_main

        cli_main()
    except (KeyboardInterrupt, Exception) as error:  # not SystemExit: a command's own exit stands
        if not _interrupted(error):
            raise
        sys.stderr.write("\ninterrupted\n")
        raise SystemExit(130) from None
