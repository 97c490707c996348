"""`treesynth run`: parse, build the config, open store and model, run the
engine, render its events. A run stopped at any point continues with the
same command (engine/cli/harness.py ends it in one line)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

from treesynth.engine.cli.harness import (
    USER_ERRORS,
    continue_command,
    err,
    fail,
    finish_lines,
    load_model_or_fail,
    note,
    server_options,
    writing,
)
from treesynth.engine.config import build_config
from treesynth.engine.presets import load_task
from treesynth.engine.render import Renderer
from treesynth.engine.runs import load_embedder, method_of, open_run_store
from treesynth.engine.tree import TreeSynth
from treesynth.store import Store, acquire_lock, check_store_file


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
    to_continue = continue_command()
    db: Store | None = None
    try:
        with writing(store, to_continue, opened=lambda: db is not None):
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
                    note(f"warning: {warning}")
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

            note(summary_line(plan_of(config)))
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
        note(line)
    typer.echo(
        f"done: {last.samples} samples in {store} ({last.dropped} dropped; {last.calls_sent} model calls sent, "
        f"{last.calls_replayed} replayed from the store, {last.wall_seconds:.1f} s)"
    )


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


def register(app: typer.Typer) -> None:
    app.command()(run)
