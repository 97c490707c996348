"""`treesynth plan`: what `treesynth run` with the same flags would cost, before
any of its model calls: nodes, model calls by role, samples, tokens and time,
as an expected case and a worst case (engine/plan.py defines both).

The command takes `run`'s own options (its signature is `run`'s, so a new
option of `run` appears here too), with --store optional and unused, plus
--probe/--no-probe. The time estimate comes from a probe: the model is loaded,
answers the run's first pivot request once (which pays the one-time grammar
compile), then the run's first pivot requests as one batch, as many as the
model decodes at once (``--parallel``; the same prompts and seeds), which
measures tokens per sample, decoding seconds per token and the rest of a
call's time at the run's width. With --no-probe it comes from the last `make
bench` (bench.json at the repository root) for the same model file, decoded
one sequence at a time, or is left out."""

from __future__ import annotations

import inspect
import json
import time
import typing
from pathlib import Path
from typing import Any, Optional

import typer

from treesynth.engine import plan as plans
from treesynth.engine.cli import harness as cli
from treesynth.engine.cli.run import run as run_command
from treesynth.engine.config import TaskConfig, build_config
from treesynth.engine.presets import load_task

# Where `make bench` writes its report: the repository root (the package's folder).
BENCH_JSON = Path(__file__).resolve().parents[2] / "bench.json"  # an editable install's repo root


def config_overrides(values: dict[str, Any]) -> dict[str, Any]:
    """The config overrides among `run`'s arguments: every argument named as a
    TaskConfig field, and ``temperature_<step>`` as ``temperature.<step>``.
    (``description`` comes through load_task, as in `run`.)"""
    overrides = {}
    for name, value in values.items():
        if name.startswith("temperature_"):
            overrides["temperature." + name.removeprefix("temperature_")] = value
        elif name in TaskConfig.model_fields and name != "description":
            overrides[name] = value
    return overrides


def probe(model, config: TaskConfig, load_seconds: float, name: str) -> plans.Rates:
    """The run's first pivot requests, sent to the model: the first alone (it
    pays the one-time set-up, the grammar compile), then as many as the model
    decodes at once as one batch, as the run sends them. The batch's timings
    are kept: each response's seconds are its share of the batch's wall time,
    so the rates are per call at the run's width."""
    from treesynth.engine import prompts
    from treesynth.engine.calls import sequences
    from treesynth.engine.schemas import request_schema
    from treesynth.models.base import Request
    from treesynth.store.keys import derive_seed, root_key

    n = min(config.samples_per_request, config.pivots)
    messages = prompts.pivots_messages(config.description, [], config.sample_schema, n, config.prompts.pivots)
    width = min(sequences(model), plans.pivot_requests(config))
    requests = [
        Request(
            messages=messages,
            schema=request_schema(config.sample_schema, n),
            max_tokens=config.max_tokens,
            temperature=config.temperature.pivots,
            top_p=config.top_p,
            seed=derive_seed(config.seed, root_key(), f"pivots:{index}", 0),
        )
        for index in range(width)
    ]
    model.generate(requests[:1])  # the cold start
    started = time.perf_counter()
    batch = model.generate(requests)
    wall = time.perf_counter() - started
    tokens = max(sum(r.completion_tokens for r in batch), 1)
    # The batch's wall time, split as the responses split theirs between
    # decoding and the rest (a server's responses overlap: their seconds add
    # up to more than the wall time, which is what the run will take).
    decode = sum(r.extra.get("decode_seconds", r.seconds) for r in batch)
    total = sum(r.seconds for r in batch)
    decoding = min(decode / total, 1.0) if total > 0 else 1.0
    return plans.Rates(
        tokens_per_sample=sum(r.completion_tokens for r in batch) / (len(batch) * n),
        seconds_per_token=wall * decoding / tokens,
        seconds_per_call=wall * (1.0 - decoding) / len(batch),
        load_seconds=load_seconds,
        source=f"measured by {len(batch)} pivot request{'' if len(batch) == 1 else 's'} at once to {name} on this machine",
    )


def bench_rates(model_spec: Optional[str], path: Path | None = None) -> tuple[plans.Rates | None, str]:
    """Rates of the model file from the last `make bench`, or None and why not."""
    path = path or BENCH_JSON
    if model_spec and model_spec.startswith("fake:"):
        return None, "bench.json does not measure the fake model"
    if model_spec:
        name = Path(model_spec).expanduser().name
    else:
        from treesynth.models.embedded import FILENAME as name
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None, f"no probe (--no-probe) and no {path}; run without --no-probe, or `make bench`"
    except (OSError, ValueError) as error:
        return None, f"cannot read {path}: {error}"
    if report.get("quick"):
        return None, f"{path} is a --quick bench (too few tokens to time)"
    for entry in report.get("models", []):
        if entry.get("file") == name and entry.get("constrained_tok_s") and "schemas" in entry:
            leaf = entry["schemas"].get("leaf", {})
            if not leaf.get("tokens"):
                break
            return (
                plans.Rates(
                    tokens_per_sample=leaf["tokens"] / report.get("leaf_request_samples", 3),  # 3: the full bench before it said
                    seconds_per_token=1 / entry["constrained_tok_s"],
                    seconds_per_call=0.0,  # bench.json does not record prompt time
                    load_seconds=entry.get("load_s", 0.0),
                    source=f"from {path} ({name}, the bench's GSM8K prompts; prompt time not included)",
                ),
                "",
            )
    return None, f"{path} has no measurement of {name}"


def table_row(label: str, expected: str, worst: str) -> str:
    return f"{label:<14}{expected:>14}{worst:>16}"


def count_lines(the_plan: plans.Plan) -> list[str]:
    e, w = the_plan.expected, the_plan.worst
    rows = [
        table_row("", "expected", "worst case"),
        table_row("nodes", f"{e.nodes:,}", f"{w.nodes:,}"),
        table_row("  split", f"{e.internal:,}", f"{w.internal:,}"),
        table_row("  leaves", f"{e.leaves:,}", f"{w.leaves:,}"),
        table_row("model calls", f"{e.calls:,}", f"{w.calls:,}"),
    ]
    rows += [table_row(f"  {role}", f"{getattr(e, role):,}", f"{getattr(w, role):,}") for role in plans.ROLES]
    rows.append(table_row("samples", f"{e.samples:,}", f"{w.samples:,}"))
    return rows


def time_lines(the_plan: plans.Plan, config: TaskConfig, rates: plans.Rates | None) -> list[str]:
    if rates is None:
        return [
            table_row("tokens", "unknown", f"{the_plan.worst_tokens:,}"),
            table_row("time", "unknown", "unknown"),
        ]
    estimate = plans.estimate_time(the_plan, config, rates)
    return [
        table_row("tokens", plans.approx(estimate.expected_tokens), f"{the_plan.worst_tokens:,}"),
        table_row("time", plans.about(estimate.expected_seconds), plans.duration(estimate.worst_seconds)),
    ]


def assumption_lines(the_plan: plans.Plan, config: TaskConfig, rates: plans.Rates | None, why_not: str) -> list[str]:
    crit = min(config.criterion_candidates, config.criterion_retries)
    cov = plans.expected_coverage_rounds(config)
    leaves = "leaf requests ask for every sample once" if config.samples_per_request == 1 else (
        f"leaf requests of {config.samples_per_request} samples each"
    )
    lines = [
        f"expected: every step succeeds at its first try; every split has {the_plan.branching} values, all finite "
        f"(max_values {config.max_values}, pivots {config.pivots}, 10 new values a coverage round); "
        f"{plans.pivot_requests(config)} pivot requests, {crit} criterion attempts, {cov} coverage "
        f"round{'s' if cov != 1 else ''} a node; no sample dropped, no top-up ({leaves}). "
        "A rule, not a prediction: small models often split less.",
        f"worst case: every node below depth {config.depth} splits into {config.max_values} values; each pivot request "
        f"tried {config.call_retries} times, {config.criterion_retries} criterion attempts, {config.coverage_rounds} "
        f"coverage rounds a node; every leaf uses its request limit (requests_per_sample {config.requests_per_sample:g})"
        + (
            f" and each of the {plans.TOPUP_ROUNDS} top-up rounds asks again for all {config.samples:,} samples"
            if config.samples is not None
            else ""
        )
        + f"; every answer runs to max_tokens {config.max_tokens:,}.",
    ]
    if rates is None:
        lines.append(f"time: cannot estimate: {why_not}.")
    else:
        per_call = plans.tokens_per_call(config, rates)
        tok_s = f"{1 / rates.seconds_per_token:,.0f} tok/s" if rates.seconds_per_token > 0 else "no measurable time a token"
        lines.append(
            f"time: model time only (no sentence embedder, no engine overhead), at {tok_s} and "
            f"{rates.seconds_per_call:.2f} s a call beyond decoding, {rates.tokens_per_sample:.0f} tokens a sample, "
            f"model load {rates.load_seconds:.1f} s: {rates.source}; criterion and coverage answers assumed "
            f"{per_call['criterion']:.0f} and {per_call['coverage']:.0f} tokens."
        )
    return lines


def _plan_signature():
    """`run`'s signature with --store made optional and --probe/--no-probe added."""
    hints = typing.get_type_hints(run_command)
    params = []
    for param in inspect.signature(run_command).parameters.values():
        param = param.replace(annotation=hints[param.name])
        if param.name == "store":
            param = param.replace(
                annotation=Optional[Path],
                default=typer.Option(None, "--store", "-s", help="Accepted as `run` takes it; not read."),
            )
        params.append(param)
    params.append(
        inspect.Parameter(
            "probe",
            inspect.Parameter.KEYWORD_ONLY,
            annotation=bool,
            default=typer.Option(
                True,
                "--probe/--no-probe",
                help="Time two real pivot requests to the model (a few seconds); --no-probe uses bench.json if present.",
            ),
        )
    )
    return inspect.Signature(params)


def register(app: typer.Typer) -> None:

    def plan(**values: Any) -> None:
        """What `run` with the same flags would cost: nodes, model calls, samples,
        tokens and time, expected and worst case. No store is read or written."""
        with_probe = values.pop("probe")
        try:
            task = load_task(values["description"], values["spec"], values["preset"], missing="give a description or --spec TASK.toml")
            config = build_config(task, config_overrides(values), source=str(values["spec"]) if values["spec"] else "plan")
            if with_probe:  # a model that cannot be loaded fails before anything is printed
                started = time.perf_counter()
                server = cli.server_options(values["server"], values["server_model"], values["server_parallel"], values["api_key_env"], values["server_wait"])
                model = cli.load_model_or_fail(values["model"], values["threads"], values["n_ctx"], server, values["parallel"], values["gpu_layers"])
                load_seconds = time.perf_counter() - started
        except cli.USER_ERRORS as error:
            cli.fail(str(error))
        for warning in config.warnings:
            cli.note(f"warning: {warning}")
        the_plan = plans.plan(config)
        typer.echo(f"plan for: {config.description}")
        for line in count_lines(the_plan):
            typer.echo(line)
        rates, why_not = None, ""
        if with_probe:
            model_name = ", ".join(values["server"]) if values["server"] else values["model"] or "the embedded SmolLM2-135M"
            try:
                rates = probe(model, config, load_seconds, model_name)
            except cli.USER_ERRORS as error:
                cli.fail(str(error))
        else:
            rates, why_not = (None, "bench.json does not measure servers; run without --no-probe") if values["server"] else bench_rates(values["model"])
        for line in time_lines(the_plan, config, rates):
            typer.echo(line)
        typer.echo("")
        for line in assumption_lines(the_plan, config, rates, why_not):
            typer.echo(line)
        typer.echo(plans.bounds_line(config))
        advice = plans.hint(the_plan, config)
        if advice:
            typer.echo(advice)

    plan.__signature__ = _plan_signature()
    plan.__annotations__ = {p.name: p.annotation for p in plan.__signature__.parameters.values()}
    app.command("plan")(plan)
