"""Balancing an existing dataset with a finished tree.

Routing: each sample goes from the root down. At a split node with finite
values the model picks exactly one of the node's values: the answer's schema
is ``{"type": "string", "enum": values}``, so a value outside the node's
values cannot be produced. An infinite node (one child holding the whole value
list) passes samples through. Routing calls are greedy (temperature 0), keyed
and stored like every call, so a rerun replays them instead of sending them.

Balancing: a leaf holding more than ``per_leaf`` samples keeps a seeded random
``per_leaf`` of them (in input order); a leaf holding fewer gets the shortfall
made by leaf synthesis under its attributes, in calls of ``leaf_samples``
samples, each call stored like a tree run's leaf call.

Batching: like the tree driver, the balancer hands the model many requests
at once, ``calls.batch_size(model)`` of them: the routing
requests of a group of samples at one level of the tree, then the next
level's; every shortfall call's first attempt, then the retries. Every call
is keyed and seeded on its own, so an answer does not depend on its batch,
and a killed balance continues from the calls committed so far."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Generator, Sequence

from treesynth.engine import checks, prompts
from treesynth.engine.calls import answer, batch_size, look_up
from treesynth.engine.config import TaskConfig
from treesynth.engine.leaves import call_sizes, draw_attributes
from treesynth.engine.schemas import parse_samples, samples_schema
from treesynth.engine.spec import finish_sample
from treesynth.models.base import Model, ModelError, Request, Response
from treesynth.store import Node, Step, Store
from treesynth.store.keys import content_key, derive_seed

ROUTE_MAX_TOKENS = 128  # an enum value is at most 60 characters
ROUTE_TEXT_MAX_CHARS = 3000  # a longer sample is cut in the routing prompt only
LEAF_STATES = ("leaf", "planned", "done")

ROUTE = """Task: {description}
{subspace}
Sample:
{sample}

Dimension: {dimension}
Which value of this dimension does the sample have? Choose exactly one of: {values}.
Answer with the value as a JSON string."""


# -- events ----------------------------------------------------------------------


@dataclass(frozen=True)
class SampleRouted:
    index: int  # position among the input records
    leaf: str
    calls: int  # routing calls this sample took (sent or replayed)


@dataclass(frozen=True)
class ShortfallCall:
    leaf: str
    call: int
    samples: int


@dataclass(frozen=True)
class BalancePlanned:
    leaves_short: int  # leaves below the target
    shortfall: int  # samples to synthesise
    calls: int  # synthesis calls planned (before retries)


Events = Generator[Any, None, Any]


# -- the tree --------------------------------------------------------------------


class Tree:
    """A finished tree read from a store: nodes, children in tree order, leaves."""

    def __init__(self, store: Store):
        self.nodes = {n.key: n for n in store.nodes()}
        self.children: dict[str, list[Node]] = {}
        for node in sorted(self.nodes.values(), key=lambda n: n.position):
            if node.parent is not None:
                self.children.setdefault(node.parent, []).append(node)
        self.root = next(n for n in self.nodes.values() if n.depth == 0)
        self.leaves = sorted((n for n in self.nodes.values() if n.state in LEAF_STATES), key=lambda n: n.position)

    def label(self, leaf: Node) -> str:
        parts = [f"{dim}: any of {len(value)}" if isinstance(value, list) else str(value) for dim, value in leaf.path]
        return " > ".join(parts) if parts else "(root)"


def route_messages(description: str, attributes, dimension: str, values: Sequence[str], sample: str):
    text = sample if len(sample) <= ROUTE_TEXT_MAX_CHARS else sample[:ROUTE_TEXT_MAX_CHARS] + " ..."
    user = ROUTE.format(
        description=description,
        subspace=prompts.render_subspace(attributes),
        sample=text,
        dimension=dimension,
        values=", ".join(json.dumps(v, ensure_ascii=False) for v in values),
    )
    return (("system", prompts.SYSTEM), ("user", user))


def route_schema(values: Sequence[str]) -> dict[str, Any]:
    return {"type": "string", "enum": list(values)}


# -- the balancer ------------------------------------------------------------------


class Balancer:
    def __init__(self, store: Store, model: Model, *, seed: int | None = None, session: int | None = None):
        self.store = store
        self.model = model
        self.fingerprint = model.fingerprint
        self.config = TaskConfig.model_validate(store.run().config)
        self.seed = self.config.seed if seed is None else seed
        self.session = session
        self.validator = checks.SampleSchemaValidator(self.config.sample_schema)
        self.tree = Tree(store)
        self.calls_sent = 0
        self.calls_replayed = 0

    def _pass_infinite(self, node: Node) -> Node:
        """An infinite node passes samples through to its one child, without a call."""
        while node.state == "split" and node.infinite:
            node = self.tree.children[node.key][0]
        return node

    def _route_call(self, node: Node, text: str) -> tuple[Request, dict[str, Any], list[str]]:
        values = [child.path[-1][1] for child in self.tree.children[node.key]]
        attributes = [(d, v) for d, v in node.path if not isinstance(v, list)]
        step = "route:" + content_key(text)
        request = Request(
            messages=route_messages(self.config.description, attributes, node.dimension, values, text),
            schema=route_schema(values),
            max_tokens=ROUTE_MAX_TOKENS,
            temperature=0.0,
            top_p=self.config.top_p,
            seed=derive_seed(self.seed, node.key, step, 0),
        )
        return request, {"node": node.key, "role": "route", "step": step, "attempt": 0}, values

    def _child(self, node: Node, values: list[str], response: Response) -> Node:
        try:
            value = json.loads(response.text)
        except ValueError:
            value = None
        if value not in values:  # only an answer cut off at max_tokens could get here
            raise ModelError(f"routing answer {response.text[:80]!r} is not one of the node's values {values}")
        return self.tree.children[node.key][values.index(value)]

    def route(self, text: str) -> tuple[str, int]:
        """The leaf key this sample lands in, and how many routing calls it took."""
        [(leaf, calls)] = self._route_group([text])
        return leaf, calls

    def _route_group(self, texts: Sequence[str]) -> list[tuple[str, int]]:
        """Route a group of samples down the tree together, one batch per level."""
        nodes = [self._pass_infinite(self.tree.root) for _ in texts]
        calls = [0] * len(texts)
        while True:
            pending = [i for i, node in enumerate(nodes) if node.state == "split"]
            if not pending:
                return [(node.key, n) for node, n in zip(nodes, calls)]
            made = [self._route_call(nodes[i], texts[i]) for i in pending]
            responses = self._calls([(request, where) for request, where, _ in made])
            for i, (_, _, values), response in zip(pending, made, responses):
                nodes[i] = self._pass_infinite(self._child(nodes[i], values, response))
                calls[i] += 1

    def route_all(self, texts: Sequence[str]) -> Events:
        """Each text's leaf key, in input order; routed in groups of a batch."""
        leaves = []
        for start in range(0, len(texts), batch_size(self.model)):
            group = texts[start : start + batch_size(self.model)]
            for offset, (leaf, calls) in enumerate(self._route_group(group)):
                leaves.append(leaf)
                yield SampleRouted(start + offset, leaf, calls)
        return leaves

    def synthesise_all(self, shortfalls: Sequence[tuple[Node, int]]) -> Events:
        """Each (leaf, shortfall)'s new samples under the leaf's attributes, as
        (sample, attributes) pairs: every call's first attempt in batches, then
        the retries of the calls whose answer was unusable."""
        config = self.config
        pending = []  # (which shortfall, call index, samples asked, attributes, messages, schema)
        for which, (leaf, shortfall) in enumerate(shortfalls):
            for index, n in enumerate(call_sizes(shortfall, config.leaf_samples)):
                attributes = draw_attributes(leaf.path, derive_seed(self.seed, leaf.key, f"balance:{index}", 0))
                messages = prompts.leaf_messages(config.description, attributes, config.sample_schema, n, config.prompts.leaf)
                pending.append((which, index, n, attributes, messages, samples_schema(config.sample_schema, n)))
        made: dict[tuple[int, int], list[tuple[dict[str, Any], dict[str, str]]]] = {}
        for attempt in range(config.call_retries):
            retry = []
            for start in range(0, len(pending), batch_size(self.model)):
                batch = pending[start : start + batch_size(self.model)]
                requests = []
                for which, index, n, attributes, messages, schema in batch:
                    leaf = shortfalls[which][0]
                    step = f"balance:{index}"
                    request = Request(
                        messages=messages,
                        schema=schema,
                        max_tokens=config.max_tokens,
                        temperature=config.temperature.leaf,
                        top_p=config.top_p,
                        seed=derive_seed(self.seed, leaf.key, step, attempt),
                    )
                    requests.append((request, {"node": leaf.key, "role": "balance", "step": step, "attempt": attempt}))
                for entry, response in zip(batch, self._calls(requests)):
                    which, index, n, attributes, _, _ = entry
                    leaf = shortfalls[which][0]
                    parsed = parse_samples(response.text, n)
                    # An answer with a sample that breaks the schema is retried like unparsable text.
                    if parsed is not None and not any(checks.schema_problem(self.validator, s) for s in parsed):
                        samples = [finish_sample(config, s, leaf.key, index, i) for i, s in enumerate(parsed)]
                        made[which, index] = [(s, dict(attributes)) for s in samples]
                        yield ShortfallCall(leaf.key, index, len(samples))
                    elif attempt == config.call_retries - 1:
                        made[which, index] = []
                        yield ShortfallCall(leaf.key, index, 0)
                    else:
                        retry.append(entry)
            pending = retry
        return [
            [pair for index in range(len(call_sizes(shortfall, config.leaf_samples))) for pair in made[which, index]]
            for which, (_, shortfall) in enumerate(shortfalls)
        ]

    def _calls(self, calls: Sequence[tuple[Request, dict[str, Any]]]) -> list[Response]:
        """Each call's answer, from the store's call log or from the model in
        one batch; each new call committed (its own transaction) before it is
        used. A call repeated within the batch is sent once."""
        keyed = look_up(self.store, self.fingerprint, calls)
        first: dict[str, int] = {}
        unique = []
        for position, call in enumerate(keyed):
            if call.key not in first:
                first[call.key] = len(unique)
                unique.append(call)
        answered = answer(self.model, unique)
        responses = []
        for position, call in enumerate(keyed):
            record, response, replayed = answered[first[call.key]]
            if unique[first[call.key]] is not call or replayed:
                self.calls_replayed += 1
            else:
                self.calls_sent += 1
                self.store.commit(Step(call=record), self.session)
            responses.append(response)
        return responses


# -- the arithmetic ------------------------------------------------------------------


def downsample(indices: Sequence[int], per_leaf: int, seed: int) -> list[int]:
    """``per_leaf`` of the indices chosen by a RNG seeded with ``seed``, in
    input order; all of them when there are not more than ``per_leaf``."""
    if len(indices) <= per_leaf:
        return list(indices)
    return sorted(random.Random(seed).sample(list(indices), per_leaf))


@dataclass
class LeafPlan:
    leaf: Node
    label: str
    routed: list[int]  # input indices routed here, in input order
    kept: list[int]  # after the seeded downsample
    shortfall: int  # samples to synthesise
    synthesised: list[tuple[dict[str, Any], dict[str, str]]] = field(default_factory=list)

    @property
    def before(self) -> int:
        return len(self.routed)

    @property
    def after(self) -> int:
        return len(self.kept) + len(self.synthesised)


def plan_balance(tree: Tree, routes: Sequence[str], per_leaf: int, seed: int) -> list[LeafPlan]:
    """Per leaf, in tree order: the samples routed there, the ones kept, the shortfall."""
    routed: dict[str, list[int]] = {leaf.key: [] for leaf in tree.leaves}
    for index, leaf in enumerate(routes):
        routed[leaf].append(index)
    plans = []
    for leaf in tree.leaves:
        indices = routed[leaf.key]
        kept = downsample(indices, per_leaf, derive_seed(seed, leaf.key, "downsample", 0))
        plans.append(LeafPlan(leaf, tree.label(leaf), indices, kept, max(0, per_leaf - len(indices))))
    return plans


def balance(balancer: Balancer, texts: Sequence[str], per_leaf: int) -> Events:
    """Route every text, plan, then synthesise every shortfall; returns the plans."""
    routes = yield from balancer.route_all(texts)
    plans = plan_balance(balancer.tree, routes, per_leaf, balancer.seed)
    short = [p for p in plans if p.shortfall]
    yield BalancePlanned(
        len(short),
        sum(p.shortfall for p in short),
        sum(len(call_sizes(p.shortfall, balancer.config.leaf_samples)) for p in short),
    )
    made = yield from balancer.synthesise_all([(plan.leaf, plan.shortfall) for plan in short])
    for plan, synthesised in zip(short, made):
        plan.synthesised = synthesised
    return plans


# -- output ----------------------------------------------------------------------------


def output_lines(plans: Sequence[LeafPlan], raw_lines: Sequence[str], field_order: Sequence[str]) -> list[str]:
    """The balanced JSONL, leaf by leaf in tree order: kept originals as they
    were (their lines unchanged), then the leaf's synthesised samples, marked."""
    lines = []
    for plan in plans:
        lines += [raw_lines[i] + "\n" for i in plan.kept]
        for sample, attributes in plan.synthesised:
            record = {name: sample[name] for name in field_order if name in sample}
            record.update((k, v) for k, v in sample.items() if k not in record)
            record.update({"synthesised": True, "leaf": plan.leaf.key, "attributes": attributes})
            lines.append(json.dumps(record, ensure_ascii=False) + "\n")
    return lines


BAR_WIDTH = 30


def table_lines(plans: Sequence[LeafPlan], per_leaf: int) -> list[str]:
    """Samples per leaf before and after, a bar per leaf, then a summary.

    Bar: one cell per sample (scaled when the largest leaf or the target
    exceeds the width): '#' kept, 'x' dropped by the downsample, '+' synthesised."""
    if not plans:
        return []
    biggest = max([p.before for p in plans] + [p.after for p in plans] + [per_leaf])
    scale = min(1.0, BAR_WIDTH / biggest) if biggest else 1.0
    label_width = min(48, max(len("leaf"), *(len(p.label) for p in plans)))

    def cells(count: int) -> int:
        return round(count * scale)

    lines = [f"{'leaf'.ljust(label_width)}  {'before':>6}  {'after':>5}"]
    for p in plans:
        # Cut from the left: the leaf's own value, at the end, tells leaves apart.
        label = p.label if len(p.label) <= label_width else "..." + p.label[-(label_width - 3) :]
        kept, dropped, made = len(p.kept), p.before - len(p.kept), len(p.synthesised)
        bar = "#" * cells(kept) + "x" * (cells(kept + dropped) - cells(kept)) + "+" * (cells(kept + made) - cells(kept))
        lines.append(f"{label.ljust(label_width)}  {p.before:>6}  {p.after:>5}  {bar}".rstrip())
    before = sum(p.before for p in plans)
    after = sum(p.after for p in plans)
    kept = sum(len(p.kept) for p in plans)
    made = sum(len(p.synthesised) for p in plans)
    largest = max(plans, key=lambda p: p.before)
    smallest = min(plans, key=lambda p: p.before)
    empty_before = sum(1 for p in plans if p.before == 0)
    empty_after = sum(1 for p in plans if p.after == 0)
    short = [p for p in plans if p.after < per_leaf]
    lines += [
        f"bar: # kept, x dropped, + synthesised{'' if scale == 1 else f' (one cell = {1 / scale:.1f} samples)'}",
        f"leaves: {len(plans)}, target {per_leaf} per leaf; empty before: {empty_before}, after: {empty_after}",
        f"samples: {before} before, {after} after ({kept} kept, {before - kept} dropped, {made} synthesised)",
        f"largest leaf before: {largest.label} ({largest.before}); smallest: {smallest.label} ({smallest.before})",
    ]
    if short:
        missing = sum(per_leaf - p.after for p in short)
        lines.append(f"short: {len(short)} leaves below the target after synthesis ({missing} samples; their answers were unusable)")
    return lines
