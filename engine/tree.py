"""The breadth-first TreeSynth driver over three seams: a model, a store and
an independent sentence embedder.

Level by level: pivot samples -> criterion determination -> subspace
coverage -> children for every node of the level; then the leaf plan; then
leaf synthesis, one committed transaction per leaf request. Every model call
is keyed by its content and answered from the store's call log when it is
there, so a rerun after a crash replays finished calls instead of sending
them again. What the embedder decides (the criterion among candidates, the
samples kept) is described in engine/selection.py.

The driver gathers, the backend batches: each node's step is a generator
that yields the calls it needs (``Ask``) and gets their answers back, so
the calls of every node of a level, or of every leaf, go to the model
together (``_drive``). Which calls a step makes never depends on how they
are grouped: the steps' calls go out round by round (a round is a step's
place in its node's life: its pivot attempt, criterion attempt or coverage
round, or a leaf's request index), in path order within a round, cut into
batches of a fixed size; answers are handed back in that order. So the
near-duplicate filter, shared by all leaves, sees samples in the same order
at every ``--parallel``, and a resumed run sends what is left in the order a
fresh run would."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Generator, Iterator

from treesynth.engine import events as ev
from treesynth.engine import checks, prompts
from treesynth.engine.calls import answer, batch_size, look_up, sequences
from treesynth.engine.checks import clean, copied_problem, criterion_problem, path_value_problem, usable_values, words_of
from treesynth.engine.config import TaskConfig
from treesynth.engine.leaves import (
    TOPUP_ROUNDS,
    draw_attributes,
    equal_targets,
    infinite_dimensions,
    plan_leaves,
    request_limit,
    topup_extras,
)
from treesynth.engine.schemas import COVERAGE_STATUSES, coverage_schema, criterion_schema, parse_samples, request_schema
from treesynth.engine.selection import SampleFilter, criterion_score, task_words
from treesynth.engine.spec import finish_sample
from treesynth.models.base import Model, Request, Response
from treesynth.store import Dropped, Node, Sample, Step, Store
from treesynth.store.keys import canonical_json, content_key, derive_seed, node_key

Events = Generator[Any, Any, Any]  # yields events and Asks; an Ask is sent back its answers
LEAF_STATES = ("leaf", "planned", "done")


@dataclass(frozen=True)
class Ask:
    """Calls a node step needs answered before it can go on, in the order its
    answers come back. ``order`` is (round, path position); the round counts
    the step's place in the node's life (pivot attempt, then criterion
    attempt, then coverage round; a leaf's request index), so a fresh and a
    resumed run send their calls in the same order."""

    order: tuple[int, str]
    calls: tuple[tuple[Request, dict[str, Any]], ...]  # (request, where it belongs: node, role, step, attempt)
    # The first ``room`` of the calls the step will certainly make later,
    # whatever these answers are (a leaf's next requests, as many as it needs
    # even if every one is kept): the driver may decode them now, beside
    # these, to fill the model's sequences, and builds only as many as the
    # batch has room for. Their answers wait in memory, uncommitted, until the
    # step makes the call; so what is asked, committed and kept is the same.
    ahead: Callable[[int], list[tuple[Request, dict[str, Any]]]] = lambda room: []


class TreeSynth:
    def __init__(self, config: TaskConfig, model: Model, store: Store, embedder, session: int | None = None):
        self.config = config
        self.model = model
        self.store = store
        self.embedder = embedder
        self.session = session
        self.fingerprint = model.fingerprint
        self.words = task_words(config.description)
        self.filter = SampleFilter(embedder, config.near_duplicate, self.words)
        self.validator = checks.SampleSchemaValidator(config.sample_schema)
        self.calls_sent = 0
        self.calls_replayed = 0
        self.model_seconds = 0.0
        self.parallel = sequences(model)
        self.decoded_ahead: dict[str, Response] = {}  # call key -> answer decoded before its step asked (never stored)
        self.batch_size = batch_size(model)

    # -- driver --------------------------------------------------------

    def run(self) -> Iterator[ev.Event]:
        started = time.perf_counter()
        counts = self.store.counts()
        resumed = self.store.has_root()
        yield ev.RunStarted(resumed=resumed, nodes=sum(counts["states"].values()), samples=counts["samples"])
        if not resumed:
            self._commit(Step(new_nodes=[self._new_node(None, [], 0, leaf=self.config.depth == 0)]))
        for depth in range(self.config.depth):
            yield from self._drive([self._split(node) for node in self.store.nodes(("open", "pivoted", "criterion"), depth=depth)])
        if self.store.nodes(("leaf",)):
            self._plan()
        self.filter.load((_text_of(data), vector) for data, vector in self.store.kept_texts())
        leaves = self.store.nodes(("planned", "done"))
        yield ev.TreeBuilt(
            leaves=len(leaves),
            planned_samples=sum(leaf.target or 0 for leaf in leaves),
            kept_samples=sum(leaf.kept or 0 for leaf in leaves),
        )
        yield from self._synthesise_planned()
        if self.config.samples is not None:
            yield from self._top_up()
        yield self._finished(started)

    def _finished(self, started: float) -> ev.RunFinished:
        root = self.store.nodes(depth=0)[0]
        root_reason = root.reason if self.config.depth > 0 and root.state in LEAF_STATES else None
        return ev.RunFinished(
            samples=self.store.sample_count(),
            wanted=self.config.samples
            if self.config.samples is not None
            else sum(leaf.target or 0 for leaf in self.store.nodes(("planned", "done"))),
            dropped=sum(self.store.dropped_reasons().values()),
            calls_sent=self.calls_sent,
            calls_replayed=self.calls_replayed,
            model_seconds=self.model_seconds,
            wall_seconds=time.perf_counter() - started,
            root_reason=root_reason,
        )

    # -- one node --------------------------------------------------------

    def _split(self, node: Node) -> Events:
        if node.state == "open":
            node = yield from self._pivot_samples(node)
        if node.state == "pivoted":
            node = yield from self._criterion(node)
        if node.state == "criterion":
            yield from self._coverage(node)

    def _pivot_samples(self, node: Node) -> Events:
        """``pivots`` samples of the node's subspace, ``samples_per_request``
        per request, each request its own seed and its own draw of infinite
        values. All requests are asked at once; one whose answer is unusable is
        asked again (a new attempt) with the others still missing."""
        wanted, per_request = self.config.pivots, self.config.samples_per_request
        sizes = [min(per_request, wanted - start) for start in range(0, wanted, per_request)]
        got: dict[int, list[dict]] = {}
        for attempt in range(self.config.call_retries):
            missing = [index for index in range(len(sizes)) if index not in got]
            if not missing:
                break
            calls = []
            for index in missing:
                step = f"pivots:{index}"
                attributes = self._attributes(node, step, attempt)
                messages = prompts.pivots_messages(self.config.description, attributes, self.config.sample_schema, sizes[index], self.config.prompts.pivots)
                calls.append(self._request(node, "pivots", step, attempt, messages, request_schema(self.config.sample_schema, sizes[index]), self.config.temperature.pivots))
            answers = yield Ask((attempt, node.position), tuple(calls))
            for index, (call, response) in zip(missing, answers):
                self._commit(Step(call=call))
                samples = parse_samples(response.text, sizes[index])
                if samples is not None:
                    got[index] = samples
                else:
                    yield ev.AnswerRejected(node.key, f"pivots:{index}", attempt, _unusable(response))
        if len(got) < len(sizes):
            return (yield from self._become_leaf(node, f"no usable pivot samples in {self.config.call_retries} attempts"))
        pivots = [sample for index in range(len(sizes)) for sample in got[index]]
        self._commit(Step(node_updates={node.key: {"state": "pivoted", "pivots": canonical_json(pivots)}}))
        return replace(node, state="pivoted", pivots=pivots)

    def _criterion(self, node: Node) -> Events:
        """Gather up to ``criterion_candidates`` usable answers in at most
        ``criterion_retries`` attempts, then keep the best-scoring one."""
        pivots = node.pivots
        used = [dimension for dimension, _ in node.path]
        schema = criterion_schema(len(pivots))
        echo = prompts.instruction_text("criterion", self.config.prompts.criterion)
        own_words = self.words | frozenset(w for p in pivots for w in words_of(prompts.pivot_text(p)))
        example_words = prompts.shot_words()
        candidates: list[tuple[float, int, str, list[str]]] = []
        problem = "no attempt"
        attempt, wanted, retries = 0, self.config.criterion_candidates, self.config.criterion_retries
        while attempt < retries and len(candidates) < wanted:
            # As many attempts at once as usable answers are still wanted: each
            # is needed even if all are usable, so none is made in vain.
            attempts = range(attempt, min(retries, attempt + wanted - len(candidates)))
            calls = []
            for a in attempts:
                attributes = self._attributes(node, "criterion", a)
                messages = prompts.criterion_messages(self.config.description, attributes, pivots, used, self.config.prompts.criterion, a)
                calls.append(self._request(node, "criterion", "criterion", a, messages, schema, self.config.temperature.criterion))
            answers = yield Ask((self.config.call_retries + attempts.start, node.position), tuple(calls))
            for a, (call, response) in zip(attempts, answers):
                self._commit(Step(call=call))
                answer = _parse_json(response)
                if not isinstance(answer, dict) or len(answer.get("labels", [])) != len(pivots):
                    problem = _unusable(response)
                else:
                    dimension, labels = clean(answer["dimension"]), [clean(v) for v in answer["labels"]]
                    problem = (
                        criterion_problem(dimension, labels, used, self.words, echo)
                        or copied_problem(labels, example_words, own_words)
                        or path_value_problem(labels, node.path)
                    )
                    if problem is None:
                        score = criterion_score(dimension, labels, self.config.description, self.embedder)
                        candidates.append((score, a, dimension, labels))
                        continue
                yield ev.AnswerRejected(node.key, "criterion", a, problem)
            attempt = attempts.stop
        if not candidates:
            return (yield from self._become_leaf(node, f"no usable criterion in {self.config.criterion_retries} attempts; last: {problem}"))
        score, attempt, dimension, labels = max(candidates, key=lambda c: (c[0], -c[1]))
        update = {"state": "criterion", "dimension": dimension, "labels": canonical_json(labels)}
        self._commit(Step(node_updates={node.key: update}))
        yield ev.CriterionChosen(node.key, dimension, score, len(candidates))
        return replace(node, state="criterion", dimension=dimension, labels=labels)

    def _coverage(self, node: Node) -> Events:
        dimension = node.dimension
        echo = prompts.instruction_text("coverage", self.config.prompts.coverage)
        values = usable_values([], node.labels, dimension, self.words, "")
        schema = coverage_schema()
        call = None
        for round_ in range(self.config.coverage_rounds):
            if call is not None:
                self._commit(Step(call=call))
            attributes = self._attributes(node, f"coverage:{round_}", 0)
            messages = prompts.coverage_messages(
                self.config.description, attributes, dimension, values, self.config.prompts.coverage, round_
            )
            request = self._request(node, "coverage", f"coverage:{round_}", 0, messages, schema, self.config.temperature.coverage)
            [(call, response)] = yield Ask((self.config.call_retries + self.config.criterion_retries + round_, node.position), (request,))
            answer = _parse_json(response)
            if not isinstance(answer, dict) or answer.get("status") not in COVERAGE_STATUSES:
                yield ev.AnswerRejected(node.key, f"coverage:{round_}", 0, _unusable(response))
                break
            if answer["status"] == "null":  # the values so far already cover the dimension
                break
            # A value copied from a shot about another dimension is a lazy copy; one
            # that belongs to a shot of the same dimension (mood: sad) is not.
            example_words = prompts.coverage_shot_words(round_, dimension)
            offered = [
                v for v in answer.get("new_values", [])
                if copied_problem([v], example_words, self.words) is None and path_value_problem([v], node.path) is None
            ]
            new = usable_values(values, offered, dimension, self.words, echo)
            values += new
            if answer["status"] == "complete" or not new or len(values) > self.config.max_values:
                break
        infinite = len(values) > self.config.max_values
        child_depth = node.depth + 1
        at_max = child_depth == self.config.depth
        if infinite:
            children = [self._new_node(node, [dimension, values], 0, leaf=at_max)]
        else:
            children = [self._new_node(node, [dimension, v], i, leaf=at_max) for i, v in enumerate(values)]
        update = {"state": "split", "value_list": canonical_json(values), "infinite": int(infinite)}
        self._commit(Step(call=call, node_updates={node.key: update}, new_nodes=children))
        yield ev.NodeSplit(node.key, node.depth, dimension, tuple(values), infinite)
        if at_max:
            for child in children:
                yield ev.NodeBecameLeaf(child.key, child_depth, None)

    def _become_leaf(self, node: Node, reason: str) -> Events:
        self._commit(Step(node_updates={node.key: {"state": "leaf", "reason": reason}}))
        yield ev.NodeBecameLeaf(node.key, node.depth, reason)
        return replace(node, state="leaf", reason=reason)

    # -- leaves ------------------------------------------------------------

    def _plan(self) -> None:
        """Each leaf's target: its plan's sum, or an equal share of --samples."""
        leaves = self.store.nodes(("leaf", "planned", "done"))
        leaves.sort(key=lambda n: n.position)
        plans = plan_leaves(
            [infinite_dimensions(leaf.path) for leaf in leaves],
            self.config.leaf_samples,
            self.config.infinite_samples,
            self.config.max_samples,
        )
        if self.config.samples is not None:
            targets = equal_targets(len(leaves), self.config.samples)
        else:
            targets = [sum(plan) for plan in plans]
        updates = {
            leaf.key: {
                "state": "planned" if target else "done",
                "plan": canonical_json(plan),
                "target": target,
                "request_limit": request_limit(target, self.config.samples_per_request, self.config.requests_per_sample),
                "calls_done": 0,
                "kept": 0,
            }
            for leaf, plan, target in zip(leaves, plans, targets)
            if leaf.state == "leaf"
        }
        self._commit(Step(node_updates=updates))

    def _synthesise_planned(self) -> Events:
        yield from self._drive([self._synthesise(leaf) for leaf in self.store.nodes(("planned",))])

    def _top_up(self) -> Events:
        """--samples N: while the run holds fewer than N samples, ask the
        leaves with the fewest for the shortfall (``topup_extras``), at most
        TOPUP_ROUNDS times; the round count is committed with the new targets."""
        rounds = self.store.run().topup_rounds
        while rounds < TOPUP_ROUNDS:
            shortfall = self.config.samples - self.store.sample_count()
            if shortfall <= 0:
                return
            leaves = sorted(self.store.nodes(("done",)), key=lambda n: n.position)
            if not leaves:
                return
            extras = topup_extras([leaf.kept or 0 for leaf in leaves], shortfall)
            rounds += 1
            per_request, factor = self.config.samples_per_request, self.config.requests_per_sample
            updates = {
                leaf.key: {
                    "target": (leaf.kept or 0) + extra,
                    "request_limit": (leaf.calls_done or 0) + request_limit(extra, per_request, factor),
                    "state": "planned",
                }
                for leaf, extra in zip(leaves, extras)
                if extra
            }
            self._commit(Step(node_updates=updates, run_updates={"topup_rounds": rounds}))
            yield ev.TopUp(rounds, shortfall, len(updates))
            yield from self._synthesise_planned()

    def _synthesise(self, leaf: Node) -> Events:
        """Leaf requests until the leaf keeps its target or reaches its request limit."""
        target, kept, index = leaf.target or 0, leaf.kept or 0, leaf.calls_done or 0
        per_request = self.config.samples_per_request
        limit = leaf.request_limit or 0
        if not (kept < target and index < limit):  # a leaf whose target was already met
            self._commit(Step(node_updates={leaf.key: {"state": "done"}}))
        while kept < target and index < limit:
            n = min(per_request, target - kept)
            request, attributes = self._leaf_request(leaf, index, n)
            # Requests index+1 .. are certain while even a fully kept answer
            # to each earlier one leaves the leaf short of its target; decoded
            # ahead only where several sequences decode at once.
            certain = range(index + 1, min(limit, index + (target - kept) // per_request)) if self.parallel > 1 else range(0)

            def ahead(room: int, leaf=leaf, certain=certain) -> list[tuple[Request, dict[str, Any]]]:
                return [self._leaf_request(leaf, j, per_request)[0] for j in certain[:room]]

            # Ordered by request index first: the filter sees every leaf's first
            # request before any leaf's second, fresh or resumed.
            [(call, response)] = yield Ask((index, leaf.position), (request,), ahead)
            samples = parse_samples(response.text, n)
            rows, dropped = [], []
            if samples is None:
                dropped.append(self._dropped(leaf, index, 0, response.text, _unusable(response)))
            else:
                dimensions = [dimension for dimension, _ in attributes]
                valid = []
                for i, sample in enumerate(samples):
                    problem = checks.schema_problem(self.validator, sample)
                    if problem:
                        dropped.append(self._dropped(leaf, index, i, canonical_json(sample), problem))
                    else:
                        valid.append((i, sample))
                verdicts = self.filter.judge([sample for _, sample in valid], dimensions)
                for (i, sample), verdict in zip(valid, verdicts):
                    if verdict.keep:
                        rows.append(self._sample(leaf, index, i, kept + len(rows), sample, attributes, verdict.vector))
                    else:
                        dropped.append(self._dropped(leaf, index, i, canonical_json(sample), verdict.reason))
            kept += len(rows)
            index += 1
            finished = kept >= target or index >= limit
            update = {"calls_done": index, "kept": kept, "state": "done" if finished else "planned"}
            self._commit(Step(call=call, samples=rows, dropped=dropped, node_updates={leaf.key: update}))
            yield ev.LeafCallDone(leaf.key, index - 1, len(rows), len(dropped))

    def _leaf_request(self, leaf: Node, index: int, n: int) -> tuple[tuple[Request, dict[str, Any]], list[tuple[str, str]]]:
        """A leaf's request ``index`` for ``n`` samples, and the attributes drawn for it."""
        step = f"leaf:{index}"
        attributes = draw_attributes(leaf.path, derive_seed(self.config.seed, leaf.key, step, 0))
        messages = prompts.leaf_messages(self.config.description, attributes, self.config.sample_schema, n, self.config.prompts.leaf)
        schema = request_schema(self.config.sample_schema, n)
        return self._request(leaf, "leaf", step, 0, messages, schema, self.config.temperature.leaf), attributes

    def _sample(self, leaf, call: int, index: int, ordinal: int, sample: dict, attributes, vector) -> Sample:
        # The choice shuffle is placed by the sample's ordinal among the
        # leaf's kept samples, so every leaf is balanced however many were dropped.
        sample = finish_sample(self.config, sample, leaf.key, 0, ordinal)
        return Sample(
            leaf=leaf.key,
            call=call,
            idx=index,
            position=leaf.position,
            data=sample,
            attributes=dict(attributes),
            hash=content_key(sample),
            vector=vector.tobytes(),
        )

    @staticmethod
    def _dropped(leaf, call: int, index: int, data: str, reason: str) -> Dropped:
        return Dropped(leaf=leaf.key, call=call, idx=index, data=data, reason=reason)

    # -- helpers -------------------------------------------------------------

    def _attributes(self, node: Node, step: str, attempt: int) -> list[tuple[str, str]]:
        return draw_attributes(node.path, derive_seed(self.config.seed, node.key, "draw:" + step, attempt))

    def _new_node(self, parent: Node | None, attribute, index: int, leaf: bool) -> Node:
        if parent is None:
            return Node(key=node_key(None), parent=None, depth=0, position="", path=[], state="leaf" if leaf else "open")
        return Node(
            key=node_key(parent.key, *attribute),
            parent=parent.key,
            depth=parent.depth + 1,
            position=f"{parent.position}.{index:04d}" if parent.position else f"{index:04d}",
            path=parent.path + [attribute],
            state="leaf" if leaf else "open",
        )

    def _request(self, node, role: str, step: str, attempt: int, messages, schema, temperature: float) -> tuple[Request, dict[str, Any]]:
        request = Request(
            messages=messages,
            schema=schema,
            max_tokens=self.config.max_tokens,
            temperature=temperature,
            top_p=self.config.top_p,
            seed=derive_seed(self.config.seed, node.key, step, attempt),
        )
        return request, {"node": node.key, "role": role, "step": step, "attempt": attempt}

    # -- gathering and batching -------------------------------------------------

    def _drive(self, steps: list[Events]) -> Iterator[ev.Event]:
        """Run node steps side by side. Each turn takes the waiting steps of
        the lowest round, in path order, cuts their calls into batches of at
        most ``batch_size`` (a step's calls stay together), and hands each
        batch's answers back in that order; a step that asks again waits for
        a later turn."""
        waiting: list[tuple[Ask, Events]] = []
        for step in steps:
            ask = yield from _advance(step, None)
            if ask is not None:
                waiting.append((ask, step))
        while waiting:
            waiting.sort(key=lambda item: item[0].order)
            first = waiting[0][0].order[0]
            now = [item for item in waiting if item[0].order[0] == first]
            waiting = [item for item in waiting if item[0].order[0] != first]
            for batch in _batches(now, self.batch_size):
                calls = [call for ask, _ in batch for call in ask.calls]
                ahead: list[tuple[Request, dict[str, Any]]] = []
                for ask, _ in batch:
                    room = self.batch_size - len(calls) - len(ahead)
                    if room > 0:
                        ahead += ask.ahead(room)
                answers = yield from self._answer(calls, ahead)
                for ask, step in batch:
                    mine, answers = answers[: len(ask.calls)], answers[len(ask.calls) :]
                    again = yield from _advance(step, mine)
                    if again is not None:
                        waiting.append((again, step))

    def _answer(self, calls: list[tuple[Request, dict[str, Any]]], ahead: list[tuple[Request, dict[str, Any]]] = ()) -> Iterator[ev.Event]:
        """(call record, response) per call: from the store's call log, from
        the answers decoded ahead, or from the model, all unanswered ones in
        one ``generate`` together with the ``ahead`` calls not yet decoded."""
        keyed = look_up(self.store, self.fingerprint, calls)
        taken = {call.key for call in keyed} | set(self.decoded_ahead)
        extra = [call for call in look_up(self.store, self.fingerprint, ahead) if call.stored is None and call.key not in taken]
        sent = sum(1 for call in keyed if call.stored is None and call.key not in self.decoded_ahead) + len(extra)
        if sent:
            yield ev.BatchStarted(calls=len(calls) + len(extra), sent=sent, in_flight=min(sent, self.parallel))
        answered = answer(self.model, keyed, self.decoded_ahead, extra)
        for (call, response, replayed), (_, where) in zip(answered, calls):
            if replayed:
                self.calls_replayed += 1
            else:
                self.calls_sent += 1
                self.model_seconds += response.seconds
            yield ev.CallFinished(where["role"], where["node"], response.completion_tokens, response.seconds, replayed)
        return [(call, response) for call, response, _ in answered]

    def _commit(self, step: Step) -> None:
        if step == Step():  # a replayed call and nothing else: already in the store
            return
        self.store.commit(step, self.session)


def _text_of(data: str) -> str:
    from treesynth.engine.selection import sample_text

    return sample_text(json.loads(data))


def _parse_json(response: Response) -> Any:
    try:
        return json.loads(response.text)
    except ValueError:
        return None


def _unusable(response: Response) -> str:
    if response.finish_reason == "length":
        return "answer cut off at max_tokens"
    return "answer is not valid JSON of the expected shape"


def _advance(step: Events, answers) -> Iterator[ev.Event]:
    """Run a node step until it asks for calls (its Ask is returned) or ends
    (None), passing its events on."""
    while True:
        try:
            item = step.send(answers)
        except StopIteration:
            return None
        answers = None
        if isinstance(item, Ask):
            return item
        yield item


def _batches(items: list[tuple[Ask, Events]], size: int) -> Iterator[list[tuple[Ask, Events]]]:
    """Consecutive groups of steps with at most ``size`` calls (or one step)."""
    batch: list[tuple[Ask, Events]] = []
    count = 0
    for item in items:
        n = len(item[0].calls)
        if batch and count + n > size:
            yield batch
            batch, count = [], 0
        batch.append(item)
        count += n
    if batch:
        yield batch
