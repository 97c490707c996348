"""`treesynth presets` (one line each) and `treesynth preset show NAME` (the
TOML file, ready to edit and run with --spec)."""

from __future__ import annotations

import typer

from treesynth.engine.cli.harness import fail
from treesynth.engine.config import ConfigError


def register(app: typer.Typer) -> None:
    from treesynth.engine.presets import preset_names, preset_summary, preset_text

    @app.command()
    def presets() -> None:
        """The shipped task presets, one line each (run one with `treesynth run --preset NAME`)."""
        names = preset_names()
        width = max(map(len, names))
        for name in names:
            typer.echo(f"{name:<{width}}  {preset_summary(name)}")

    preset = typer.Typer(no_args_is_help=True, help="Show a shipped task preset.")

    @preset.command("show")
    def show(name: str = typer.Argument(..., help="The preset's name (see `treesynth presets`).")) -> None:
        """Print the preset's TOML task file: a starting point for --spec."""
        try:
            text = preset_text(name)
        except ConfigError as error:
            fail(str(error))
        typer.echo(text, nl=not text.endswith("\n"))

    app.add_typer(preset, name="preset")
