"""The breadth-first TreeSynth driver over two seams: a model and a store.

Level by level, nodes in path order: pivot samples -> criterion
determination -> subspace coverage -> children; then the leaf plan; then leaf
synthesis, one committed transaction per leaf call. Every model call is keyed
by its content and answered from the store's call log when it is there, so a
rerun after a crash replays finished calls instead of sending them again."""

from __future__ import annotations

import json
import time
from typing import Any, Generator, Iterator

from treesynth.engine import events as ev
from treesynth.engine import prompts
from treesynth.engine.calls import answer_call
from treesynth.engine.checks import clean, criterion_problem, dedupe_values
from treesynth.engine.config import TaskConfig
from treesynth.engine.leaves import draw_attributes, infinite_dimensions, plan_leaves
from treesynth.engine.schemas import COVERAGE_STATUSES, coverage_schema, criterion_schema, samples_schema
from treesynth.engine.spec import finish_sample
from treesynth.models.base import Model, Request, Response
from treesynth.store import Step, Store
from treesynth.store.keys import canonical_json, child_key, content_key, derive_seed, root_key

Events = Generator[ev.Event, None, Any]


class TreeSynth:
    def __init__(self, config: TaskConfig, model: Model, store: Store, session: int | None = None):
        self.config = config
        self.model = model
        self.store = store
        self.session = session
        self.fingerprint = model.fingerprint
        self.calls_sent = 0
        self.calls_replayed = 0
        self.model_seconds = 0.0

    # -- driver --------------------------------------------------------

    def run(self) -> Iterator[ev.Event]:
        started = time.perf_counter()
        counts = self.store.counts()
        resumed = self.store.has_root()
        yield ev.RunStarted(resumed=resumed, nodes=sum(counts["states"].values()), samples=counts["samples"])
        if not resumed:
            self._commit(Step(new_nodes=[self._new_node(None, [], 0, "", leaf=self.config.depth == 0)]))
        for depth in range(self.config.depth):
            for node in self.store.nodes("depth = ? AND state IN ('open', 'pivoted', 'criterion')", [depth]):
                yield from self._split(node)
        if self.store.nodes("state = 'leaf'"):
            self._plan()
        leaves = self.store.nodes("state IN ('planned', 'done')")
        yield ev.TreeBuilt(
            leaves=len(leaves),
            leaf_calls=sum(len(leaf["plan"]) for leaf in leaves),
            planned_samples=sum(sum(leaf["plan"]) for leaf in leaves),
            calls_done=sum(leaf["calls_done"] or 0 for leaf in leaves),
        )
        for leaf in self.store.nodes("state = 'planned'"):
            yield from self._synthesise(leaf)
        yield ev.RunFinished(
            samples=self.store.counts()["samples"],
            calls_sent=self.calls_sent,
            calls_replayed=self.calls_replayed,
            model_seconds=self.model_seconds,
            wall_seconds=time.perf_counter() - started,
        )

    # -- one node --------------------------------------------------------

    def _split(self, node: dict[str, Any]) -> Events:
        if node["state"] == "open":
            node = yield from self._pivot_samples(node)
        if node["state"] == "pivoted":
            node = yield from self._criterion(node)
        if node["state"] == "criterion":
            yield from self._coverage(node)

    def _pivot_samples(self, node: dict[str, Any]) -> Events:
        n = self.config.pivots
        schema = samples_schema(self.config.sample_schema, n)
        for attempt in range(self.config.call_retries):
            attributes = self._attributes(node, "pivots", attempt)
            messages = prompts.pivots_messages(self.config.description, attributes, self.config.sample_schema, n, self.config.prompts.pivots)
            call, response = yield from self._call(node, "pivots", "pivots", attempt, messages, schema, self.config.temperature.pivots)
            pivots = _parse_samples(response, n)
            if pivots is not None:
                update = {"state": "pivoted", "pivots": canonical_json(pivots)}
                self._commit(Step(call=call, node_updates={node["key"]: update}))
                return {**node, "state": "pivoted", "pivots": pivots}
            self._commit(Step(call=call))
            yield ev.AnswerRejected(node["key"], "pivots", attempt, _unusable(response))
        return (yield from self._become_leaf(node, f"no usable pivot samples in {self.config.call_retries} attempts"))

    def _criterion(self, node: dict[str, Any]) -> Events:
        pivots = node["pivots"]
        used = [dimension for dimension, _ in node["path"]]
        schema = criterion_schema(len(pivots))
        problem = "no attempt"
        for attempt in range(self.config.criterion_retries):
            attributes = self._attributes(node, "criterion", attempt)
            messages = prompts.criterion_messages(self.config.description, attributes, pivots, used, self.config.prompts.criterion)
            call, response = yield from self._call(node, "criterion", "criterion", attempt, messages, schema, self.config.temperature.criterion)
            answer = _parse_json(response)
            if answer is None or len(answer.get("labels", [])) != len(pivots):
                problem = _unusable(response)
            else:
                dimension, labels = clean(answer["dimension"]), [clean(v) for v in answer["labels"]]
                problem = criterion_problem(dimension, labels, used)
                if problem is None:
                    update = {"state": "criterion", "dimension": dimension, "labels": canonical_json(labels)}
                    self._commit(Step(call=call, node_updates={node["key"]: update}))
                    return {**node, "state": "criterion", "dimension": dimension, "labels": labels}
            self._commit(Step(call=call))
            yield ev.AnswerRejected(node["key"], "criterion", attempt, problem)
        return (yield from self._become_leaf(node, f"no usable criterion in {self.config.criterion_retries} attempts; last: {problem}"))

    def _coverage(self, node: dict[str, Any]) -> Events:
        dimension = node["dimension"]
        values = dedupe_values([], node["labels"])
        schema = coverage_schema()
        call = None
        for round_ in range(self.config.coverage_rounds):
            if call is not None:
                self._commit(Step(call=call))
            attributes = self._attributes(node, f"coverage:{round_}", 0)
            messages = prompts.coverage_messages(self.config.description, attributes, dimension, values, self.config.prompts.coverage)
            call, response = yield from self._call(node, "coverage", f"coverage:{round_}", 0, messages, schema, self.config.temperature.coverage)
            answer = _parse_json(response)
            if answer is None or answer.get("status") not in COVERAGE_STATUSES:
                yield ev.AnswerRejected(node["key"], f"coverage:{round_}", 0, _unusable(response))
                break
            if answer["status"] == "null":  # the values so far already cover the dimension
                break
            new = dedupe_values(values, answer.get("new_values", []))
            values += new
            if answer["status"] == "complete" or not new or len(values) > self.config.max_values:
                break
        infinite = len(values) > self.config.max_values
        child_depth = node["depth"] + 1
        at_max = child_depth == self.config.depth
        if infinite:
            children = [self._new_node(node, [dimension, values], 0, canonical_json(values), leaf=at_max)]
        else:
            children = [self._new_node(node, [dimension, v], i, v, leaf=at_max) for i, v in enumerate(values)]
        update = {"state": "split", "value_list": canonical_json(values), "infinite": int(infinite)}
        self._commit(Step(call=call, node_updates={node["key"]: update}, new_nodes=children))
        yield ev.NodeSplit(node["key"], node["depth"], dimension, tuple(values), infinite)
        if at_max:
            for child in children:
                yield ev.NodeBecameLeaf(child["key"], child_depth, None)

    def _become_leaf(self, node: dict[str, Any], reason: str) -> Events:
        self._commit(Step(node_updates={node["key"]: {"state": "leaf", "reason": reason}}))
        yield ev.NodeBecameLeaf(node["key"], node["depth"], reason)
        return {**node, "state": "leaf", "reason": reason}

    # -- leaves ------------------------------------------------------------

    def _plan(self) -> None:
        leaves = self.store.nodes("state IN ('leaf', 'planned', 'done')")
        leaves.sort(key=lambda n: n["position"])
        plans = plan_leaves(
            [infinite_dimensions(leaf["path"]) for leaf in leaves],
            self.config.leaf_samples,
            self.config.infinite_samples,
            self.config.max_samples,
        )
        updates = {
            leaf["key"]: {"state": "planned" if plan else "done", "plan": canonical_json(plan), "calls_done": 0}
            for leaf, plan in zip(leaves, plans)
            if leaf["state"] == "leaf"
        }
        self._commit(Step(node_updates=updates))

    def _synthesise(self, leaf: dict[str, Any]) -> Events:
        plan = leaf["plan"]
        for index in range(leaf["calls_done"] or 0, len(plan)):
            n = plan[index]
            step = f"leaf:{index}"
            attributes = draw_attributes(leaf["path"], derive_seed(self.config.seed, leaf["key"], step, 0))
            messages = prompts.leaf_messages(self.config.description, attributes, self.config.sample_schema, n, self.config.prompts.leaf)
            schema = samples_schema(self.config.sample_schema, n)
            update = {"calls_done": index + 1, "state": "done" if index + 1 == len(plan) else "planned"}
            for attempt in range(self.config.call_retries):
                call, response = yield from self._call(leaf, "leaf", step, attempt, messages, schema, self.config.temperature.leaf)
                samples = _parse_samples(response, n)
                if samples is not None:
                    rows = [self._sample_row(leaf, index, i, s, attributes) for i, s in enumerate(samples)]
                    self._commit(Step(call=call, samples=rows, node_updates={leaf["key"]: update}))
                    yield ev.LeafCallDone(leaf["key"], index, len(rows))
                    break
                self._commit(Step(call=call))
                yield ev.AnswerRejected(leaf["key"], step, attempt, _unusable(response))
            else:
                self._commit(Step(node_updates={leaf["key"]: update}))
                yield ev.LeafCallDone(leaf["key"], index, 0)

    def _sample_row(self, leaf, call: int, index: int, sample: dict, attributes) -> dict[str, Any]:
        sample = finish_sample(self.config, sample, leaf["key"], call, index)
        return {
            "leaf": leaf["key"],
            "call": call,
            "idx": index,
            "position": leaf["position"],
            "data": canonical_json(sample),
            "attributes": canonical_json(dict(attributes)),
            "hash": content_key(sample),
        }

    # -- helpers -------------------------------------------------------------

    def _attributes(self, node: dict[str, Any], step: str, attempt: int) -> list[tuple[str, str]]:
        return draw_attributes(node["path"], derive_seed(self.config.seed, node["key"], "draw:" + step, attempt))

    def _new_node(self, parent, attribute, index: int, value_key: str, leaf: bool) -> dict[str, Any]:
        if parent is None:
            key, path, depth, position = root_key(), [], 0, ""
        else:
            key = child_key(parent["key"], attribute[0], value_key)
            path = parent["path"] + [attribute]
            depth = parent["depth"] + 1
            position = f"{parent['position']}.{index:04d}" if parent["position"] else f"{index:04d}"
        return {
            "key": key,
            "parent": parent["key"] if parent else None,
            "depth": depth,
            "position": position,
            "path": canonical_json(path),
            "state": "leaf" if leaf else "open",
        }

    def _call(self, node, role: str, step: str, attempt: int, messages, schema, temperature: float) -> Events:
        request = Request(
            messages=messages,
            schema=schema,
            max_tokens=self.config.max_tokens,
            temperature=temperature,
            top_p=self.config.top_p,
            seed=derive_seed(self.config.seed, node["key"], step, attempt),
        )
        call, response, replayed = answer_call(
            self.model, self.store, self.fingerprint, request, node=node["key"], role=role, step=step, attempt=attempt
        )
        if replayed:
            self.calls_replayed += 1
        else:
            self.calls_sent += 1
            self.model_seconds += response.seconds
        yield ev.CallFinished(role, node["key"], response.completion_tokens, response.seconds, replayed)
        return call, response

    def _commit(self, step: Step) -> None:
        self.store.commit(step, self.session)


def _parse_json(response: Response) -> Any:
    try:
        return json.loads(response.text)
    except ValueError:
        return None


def _parse_samples(response: Response, n: int) -> list[dict] | None:
    samples = _parse_json(response)
    if not isinstance(samples, list) or len(samples) != n or not all(isinstance(s, dict) and s for s in samples):
        return None
    return samples


def _unusable(response: Response) -> str:
    if response.finish_reason == "length":
        return "answer cut off at max_tokens"
    return "answer is not valid JSON of the expected shape"
