"""CLI commands `baseline`, `diversity` and `balance`: parse, check every
input before any model is loaded, run the engine, render. Errors a user can
cause end in one line and exit code 2; no output file is written half-way."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from treesynth.engine import runs
from treesynth.engine.cli import harness as cli
from treesynth.engine.diversity import DEFAULT_MAX_EMBED, DEFAULT_NEAR, InputError
from treesynth.store.keys import canonical_json


def _write_atomically(output: Optional[Path], lines: List[str]) -> None:
    """To a file through a temp file and a rename (never half-written), or to stdout."""
    if output is None:
        sys.stdout.writelines(lines)
        sys.stdout.flush()
        return
    from treesynth.store.files import write_atomically

    try:
        write_atomically(output, lines)
    except OSError as error:
        cli.fail(f"cannot write {output}: {error.strerror}")


def _is_sqlite(path: Path) -> bool:
    from treesynth.store import SQLITE_HEADER

    try:
        with open(path, "rb") as f:
            return f.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        return False


# -- baseline ------------------------------------------------------------------------


def baseline(
    description: Optional[str] = typer.Argument(None, help="The data space, in one sentence (or --spec, --preset, --like)."),
    samples: Optional[int] = typer.Option(None, "-n", "--samples", help="Samples to make: the tree run's budget [with --like: its sample count]."),
    store: Path = typer.Option(..., "--store", "-s", help="SQLite store for the baseline: created, or continued."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="TOML task file; flags override its keys."),
    preset: Optional[str] = typer.Option(None, "--preset", help="A shipped task preset (see `treesynth presets`)."),
    like: Optional[Path] = typer.Option(None, "--like", help="A tree run's store: copy its task, sample schema, leaf samples, seed and sampling settings."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Path to a local GGUF model (default: the embedded SmolLM2-135M)."),
    server: Optional[List[str]] = typer.Option(None, "--server", metavar="URL", help="An OpenAI-compatible server's URL instead of --model (as `run` takes it)."),
    server_model: Optional[str] = typer.Option(None, "--server-model", help="The served model's id (default: the server's only model)."),
    server_parallel: Optional[int] = typer.Option(None, "--server-parallel", help="Requests at once per server (default: the slots it reports, else 1)."),
    server_wait: Optional[float] = typer.Option(None, "--server-wait", help="Seconds to wait for a server that went away [60]."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Environment variable holding the server's API key (never stored)."),
    leaf_samples: Optional[int] = typer.Option(None, "--leaf-samples", help="Samples per call [10]."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Run seed [0]."),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="Sampling temperature (the leaf temperature of a run) [0.9]."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Most tokens per answer [2048]."),
    threads: Optional[int] = typer.Option(None, "--threads", help="llama.cpp threads (does not change content)."),
    n_ctx: int = typer.Option(4096, "--n-ctx", help="Model context size in tokens."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on a terminal."),
) -> None:
    """The paper's baseline: temperature sampling from the root prompt alone,
    same model, sample schema and budget as a tree run; resumable like a run."""
    from treesynth.engine.baseline import baseline_config, like_task, prepare
    from treesynth.engine.config import ConfigError
    from treesynth.engine.presets import load_task
    from treesynth.engine.render import Renderer
    from treesynth.engine.tree import TreeSynth
    from treesynth.store import Store, check_store_file

    try:
        if sum(x is not None for x in (spec, preset, like)) > 1:
            raise ConfigError("give one of --spec, --preset and --like")
        like_model = None
        if like is not None:
            tree_store = Store.open_existing(like, readonly=True)
            run_row = tree_store.run()
            task = like_task(run_row.config)
            like_model = run_row.model
            if samples is None:
                samples = tree_store.counts()["samples"]
                if samples < 1:
                    raise ConfigError(f"{like} holds no samples yet; give -n")
            tree_store.close()
            if description is not None:
                task["description"] = description
        else:
            task = load_task(description, spec, preset, missing="give a description, --spec TASK.toml, --preset NAME or --like STORE")
        if samples is None:
            raise ConfigError("give -n, the number of samples (the tree run's budget)")
        if samples < 1:
            raise ConfigError(f"-n must be at least 1, not {samples}")
        overrides = {"leaf_samples": leaf_samples, "seed": seed, "temperature.leaf": temperature, "max_tokens": max_tokens}
        config = baseline_config(task, overrides, samples, source=str(spec) if spec else "baseline")
        if store.exists():
            check_store_file(store)
        embedder = runs.load_embedder()
        the_model = cli.load_model_or_fail(model, threads, n_ctx, cli.server_options(server, server_model, server_parallel, api_key_env, server_wait))
        db, resumed = runs.open_run_store(store, config, the_model.fingerprint, runs.method_of(embedder))
        try:
            prepare(db, config)
        except BaseException:
            db.close()
            raise
    except (*cli.USER_ERRORS, InputError) as error:
        cli.fail(str(error))
    if like_model is not None and like_model != the_model.fingerprint:
        cli.note(f"note: {like} was made with another model ({like_model.get('file', like_model.get('backend'))})")
    session = db.begin_session({"threads": threads, "argv": sys.argv[1:], "command": "baseline"}, resumed)
    engine = TreeSynth(config, the_model, db, embedder, session)
    live = progress and cli.err.is_terminal
    last = None
    try:
        with cli.writing(store, cli.continue_command()), Renderer(cli.err, live) as renderer:
            for event in engine.run():
                if not (type(event).__name__ == "RunStarted" and not resumed):
                    renderer.handle(event)
                last = event
    finally:
        db.close()
    for line in cli.finish_lines(last, config.samples):
        cli.note(line)
    typer.echo(
        f"done: baseline of {last.samples} samples in {store} ({last.dropped} dropped; {last.calls_sent} model calls sent, "
        f"{last.calls_replayed} replayed from the store, {last.wall_seconds:.1f} s)"
    )


# -- diversity --------------------------------------------------------------------------


def diversity(
    inputs: List[Path] = typer.Argument(..., help="JSONL files or run stores, measured side by side."),
    field: Optional[List[str]] = typer.Option(None, "--field", "-f", help="Field(s) whose text is measured [every string field but leaf and attributes]."),
    reference: Optional[Path] = typer.Option(None, "--reference", help="JSONL of real data of the domain: adds each file's mean cosine to its nearest reference record."),
    embedder: Optional[str] = typer.Option(None, "--embedder", help="minilm (an independent sentence embedder), generator (the embedded SmolLM2's own hidden states) or a local GGUF for llama.cpp embeddings [minilm]."),
    no_embeddings: bool = typer.Option(False, "--no-embeddings", help="Skip the embedding measures (no model loaded)."),
    max_embed: int = typer.Option(DEFAULT_MAX_EMBED, "--max-embed", help="Beyond this many samples, embed a seeded random subset of this size."),
    seed: int = typer.Option(0, "--seed", help="Seed of the subset drawn beyond --max-embed."),
    near: float = typer.Option(DEFAULT_NEAR, "--near", help="Jaccard similarity of word 3-gram sets from which two samples are near duplicates."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip (and count) lines that are not JSON objects or lack a --field."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per file instead of the table."),
    threads: Optional[int] = typer.Option(None, "--threads", help="llama.cpp threads (--embedder generator or a GGUF)."),
) -> None:
    """Diversity of datasets side by side: mean pairwise cosine similarity of
    sentence embeddings (the paper's figure), near duplicates by embedding,
    similarity to real data (--reference), distinct-1/2, exact and near duplicates."""
    from treesynth.engine.diversity import embed_reference, measure, read_jsonl, read_reference, store_texts, table_lines
    from treesynth.models.embed import describe_embedder, load_embedder
    from treesynth.store import Store

    fields = list(field) if field else None
    texts_by_input: list[tuple[str, list[str]]] = []
    the_reference = None
    try:
        if max_embed < 2:
            raise InputError(f"--max-embed must be at least 2, not {max_embed}")
        if not 0 < near <= 1:
            raise InputError(f"--near must be in (0, 1], not {near}")
        if reference is not None and no_embeddings:
            raise InputError("--reference needs embeddings; drop --no-embeddings")
        for path in inputs:
            if _is_sqlite(path):
                db = Store.open_existing(path, readonly=True)
                texts, missing = store_texts(db, fields)
                db.close()
                if missing and not skip_bad:
                    lacking = f"field(s) {', '.join(fields)}" if fields else "a string field (name one with --field)"
                    raise InputError(f"{path}: {missing} samples lack {lacking} (--skip-bad skips them)")
                if not texts:
                    raise InputError(f"{path} holds no samples" + (f" with field(s) {', '.join(fields)}" if fields else ""))
                bad = missing
            else:
                records, bad = read_jsonl(path, fields, skip_bad)
                texts = [r.text for r in records]
            if bad:
                cli.note(f"{path}: skipped {bad} bad lines")
            texts_by_input.append((str(path), texts))
        if reference is not None:
            reference_texts, bad = read_reference(reference, fields, skip_bad)  # before any model loads
            if bad:
                cli.note(f"{reference}: skipped {bad} bad lines")
        the_embedder = None if no_embeddings else load_embedder(embedder, threads=threads)
        if reference is not None:
            the_reference = embed_reference(str(reference), reference_texts, the_embedder, max_embed=max_embed, seed=seed)
    except (*cli.USER_ERRORS, InputError) as error:
        cli.fail(str(error))
    results = [
        measure(name, texts, the_embedder, max_embed=max_embed, seed=seed, near=near, reference=the_reference)
        for name, texts in texts_by_input
    ]
    if as_json:
        for r in results:
            typer.echo(canonical_json(r.as_dict()))
        return
    for line in table_lines(results):
        typer.echo(line)
    if the_reference is not None:
        subset = f"a seeded random {the_reference.embedded} of " if the_reference.embedded < the_reference.records else ""
        typer.echo(f"reference: {the_reference.name} ({subset}{the_reference.records} records)")
    if the_embedder is not None:
        typer.echo(f"embedder: {describe_embedder(the_embedder.fingerprint)}")


# -- balance -------------------------------------------------------------------------------


def balance(
    data: Path = typer.Argument(..., help="The JSONL dataset to balance."),
    store: Path = typer.Option(..., "--store", "-s", help="A finished tree run's store (routing calls are stored in it)."),
    per_leaf: int = typer.Option(..., "--per-leaf", help="Samples per leaf after balancing."),
    field: Optional[List[str]] = typer.Option(None, "--field", "-f", help="Field(s) whose text is routed [every string field but leaf and attributes]."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Balanced JSONL to write (default: stdout, table on stderr)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Path to a local GGUF model (default: the embedded SmolLM2-135M)."),
    server: Optional[List[str]] = typer.Option(None, "--server", metavar="URL", help="An OpenAI-compatible server's URL instead of --model (as `run` takes it)."),
    server_model: Optional[str] = typer.Option(None, "--server-model", help="The served model's id (default: the server's only model)."),
    server_parallel: Optional[int] = typer.Option(None, "--server-parallel", help="Requests at once per server (default: the slots it reports, else 1)."),
    server_wait: Optional[float] = typer.Option(None, "--server-wait", help="Seconds to wait for a server that went away [60]."),
    api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Environment variable holding the server's API key (never stored)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed of the downsample and the synthesis calls [the run's seed]."),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="Skip (and count) lines that are not JSON objects or lack a --field."),
    threads: Optional[int] = typer.Option(None, "--threads", help="llama.cpp threads (does not change content)."),
    n_ctx: int = typer.Option(4096, "--n-ctx", help="Model context size in tokens."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on a terminal."),
) -> None:
    """Route each sample down a finished tree, downsample crowded leaves and
    synthesise the shortfall of sparse ones; print samples per leaf before and after."""
    from treesynth.engine import balance as bal
    from treesynth.engine.baseline import baseline_mark
    from treesynth.engine.diversity import read_jsonl
    from treesynth.engine.export import is_finished
    from treesynth.store import Store

    fields = list(field) if field else None
    try:
        if per_leaf < 1:
            raise InputError(f"--per-leaf must be at least 1, not {per_leaf}")
        if seed is not None and seed < 0:
            raise InputError(f"--seed must be at least 0, not {seed}")
        tree_store = Store.open_existing(store, readonly=True)
        finished = is_finished(tree_store.counts()["states"])
        is_baseline = baseline_mark(tree_store) is not None
        tree_store.close()
        if not finished:
            raise InputError(f"{store} has no finished tree; finish it with `treesynth run` first")
        if is_baseline:
            raise InputError(f"{store} is a baseline (no tree); balance with a tree run's store")
        records, bad = read_jsonl(data, fields, skip_bad)
        if output is not None:
            cli.check_output_file(output)
        the_model = cli.load_model_or_fail(model, threads, n_ctx, cli.server_options(server, server_model, server_parallel, api_key_env, server_wait))
        db = Store.open_writer(store)  # locked before it is opened for writing
    except (*cli.USER_ERRORS, InputError) as error:
        cli.fail(str(error))
    if bad:
        cli.note(f"{data}: skipped {bad} bad lines")
    resumed = bool(db.call_count("route"))
    session = db.begin_session({"threads": threads, "argv": sys.argv[1:], "command": "balance"}, resumed)
    balancer = bal.Balancer(db, the_model, seed=seed, session=session)
    field_order = list(balancer.config.sample_schema["properties"])
    try:
        with cli.writing(store, cli.continue_command()):
            plans = _run_balance(balancer, [r.text for r in records], per_leaf, progress and cli.err.is_terminal)
    finally:
        db.close()
    _write_atomically(output, bal.output_lines(plans, [r.raw for r in records], field_order))
    lines = bal.table_lines(plans, per_leaf) + [
        f"model calls: {balancer.calls_sent} sent, {balancer.calls_replayed} replayed from the store"
        + (f"; wrote {output}" if output is not None else "")
    ]
    for line in lines:
        if output is None:
            cli.note(line)
        else:
            typer.echo(line)


def _run_balance(balancer, texts: List[str], per_leaf: int, live: bool):
    """Drive the balance engine, showing routing and synthesis progress."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from treesynth.engine import balance as bal

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=cli.err, disable=not live) as bar:
        task = bar.add_task("routing", total=len(texts))
        if not live:
            cli.note(f"routing {len(texts)} samples down {len(balancer.tree.leaves)} leaves")
        engine = bal.balance(balancer, texts, per_leaf)
        try:
            while True:
                event = next(engine)
                if isinstance(event, (bal.SampleRouted, bal.ShortfallCall)):
                    bar.advance(task)
                elif isinstance(event, bal.BalancePlanned):
                    bar.update(task, description="synthesising", total=event.calls, completed=0)
                    if not live and event.calls:
                        cli.note(f"synthesising {event.shortfall} samples for {event.leaves_short} leaves in {event.calls} calls")
        except StopIteration as stop:
            return stop.value


def register(app: typer.Typer) -> None:
    app.command()(baseline)
    app.command()(diversity)
    app.command()(balance)
