"""Every step of the method on scripted and fake models: no llama.cpp here
(the sentence embedder is the real one: it decides which samples are kept)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from engine_helpers import distinct_text, export_lines, run_engine
from treesynth.engine import events as ev
from treesynth.engine.config import TaskConfig
from treesynth.engine.leaves import plan_leaves
from treesynth.models.base import Response
from treesynth.models.fake import FakeModel


def role_of(request) -> str:
    properties = request.schema.get("properties", {})
    if "dimension" in properties:
        return "criterion"
    if "status" in properties:
        return "coverage"
    return "samples"  # a pivot or a leaf request: the same prompt shape


class ScriptedModel:
    """Answers by role; each role's script is a function (request, nth call of that role) -> JSON value."""

    fingerprint = {"backend": "scripted"}

    def __init__(self, **scripts):
        self.scripts = scripts
        self.calls: list[tuple[str, object]] = []
        self.seen = Counter()

    def generate(self, requests):
        out = []
        for request in requests:
            role = role_of(request)
            n = self.seen[role]
            self.seen[role] += 1
            self.calls.append((role, request))
            value = self.scripts[role](request, n)
            text = value if isinstance(value, str) else json.dumps(value)
            out.append(Response(text, 5, 10, 0.001, "stop"))
        return out


def samples(request, n):
    """A new, unrelated sentence for every request: nothing is a duplicate."""
    return {"text": distinct_text(n)}


def roles(store) -> Counter:
    return Counter(row["role"] for row in store.db.query("SELECT role FROM calls"))


def config(**kw) -> TaskConfig:
    base = dict(description="grade-school math word problems", depth=1, pivots=3, leaf_samples=2, max_values=5)
    return TaskConfig(**{**base, **kw})


def test_one_split_makes_one_leaf_per_value(store_path):
    model = ScriptedModel(
        samples=samples,
        criterion=lambda r, n: {"dimension": "operation", "labels": ["addition", "subtraction", "addition"]},
        coverage=lambda r, n: {"status": "complete", "new_values": ["division"]},
    )
    store, events = run_engine(config(), model, store_path)
    split = [e for e in events if isinstance(e, ev.NodeSplit)]
    assert split[0].dimension == "operation"
    assert split[0].values == ("addition", "subtraction", "division")
    records = export_lines(store)
    assert len(records) == 3 * 2
    assert [r["attributes"] for r in records[::2]] == [
        {"operation": "addition"},
        {"operation": "subtraction"},
        {"operation": "division"},
    ]
    # one sample per request: 3 pivots + 6 leaf samples, each its own call and seed
    assert roles(store) == {"pivots": 3, "criterion": 3, "coverage": 1, "leaf": 6}
    seeds = [req.seed for role, req in model.calls if role == "samples"]
    assert len(set(seeds)) == len(seeds)


def test_samples_is_exact_and_spread_equally(store_path):
    model = ScriptedModel(
        samples=samples,
        criterion=lambda r, n: {"dimension": "operation", "labels": ["addition", "subtraction", "division"]},
        coverage=lambda r, n: {"status": "null", "new_values": []},
    )
    store, events = run_engine(config(samples=7), model, store_path)
    counts = Counter(r["leaf"] for r in export_lines(store))
    assert sorted(counts.values()) == [2, 2, 3] and sum(counts.values()) == 7
    assert events[-1].samples == 7 and events[-1].wanted == 7


def test_pivot_prompt_names_task_and_path_and_never_the_format(store_path):
    model = ScriptedModel(
        samples=samples,
        criterion=lambda r, n: {"dimension": ["operation", "setting"][min(n // 3, 1)], "labels": ["alpha", "beta", "alpha"]},
        coverage=lambda r, n: {"status": "null", "new_values": []},
    )
    store, _ = run_engine(config(depth=2), model, store_path)
    rows = list(store.db.query("SELECT node, request FROM calls WHERE role = 'pivots' ORDER BY rowid"))
    root, child = json.loads(rows[0]["request"]), json.loads(rows[3]["request"])
    assert "grade-school math word problems" in root["messages"][-1][1]
    assert "Operation: alpha" in child["messages"][-1][1]
    assert root["schema"] == config().sample_schema  # one sample, not an array
    for _, request in model.calls:
        for role, content in request.messages:
            if role != "assistant":
                assert not re.search(r"\bjson\b|\barrays?\b|\bschema\b|\{", content.lower()), content


def test_criterion_retries_are_bounded_then_the_node_becomes_a_leaf(store_path):
    model = ScriptedModel(
        samples=samples,
        criterion=lambda r, n: {"dimension": "kind", "labels": ["other", "x", "y"]},
        coverage=lambda r, n: pytest.fail("no coverage without a criterion"),
    )
    store, events = run_engine(config(criterion_retries=4), model, store_path)
    assert model.seen["criterion"] == 4
    rejected = [e for e in events if isinstance(e, ev.AnswerRejected)]
    assert len(rejected) == 4 and all("catch-all" in e.reason for e in rejected)
    root = store.nodes(depth=0)[0]
    assert root.state == "done" and "no usable criterion" in root.reason
    assert len(export_lines(store)) == 2  # the root leaf's one leaf call of two samples
    assert events[-1].root_reason.startswith("no usable criterion")


def test_the_best_scoring_candidate_wins_not_the_first(store_path):
    answers = [
        {"dimension": "colour", "labels": ["red", "red", "blue"]},  # usable, unbalanced
        {"dimension": "kind", "labels": ["a", "a", "a"]},  # one value only
        {"dimension": "operation", "labels": ["addition", "subtraction", "division"]},  # balanced, on task
    ]
    model = ScriptedModel(
        samples=samples,
        criterion=lambda r, n: answers[n],
        coverage=lambda r, n: {"status": "null", "new_values": []},
    )
    _, events = run_engine(config(criterion_candidates=2), model, store_path)
    seeds = [req.seed for role, req in model.calls if role == "criterion"]
    assert len(set(seeds)) == 3
    chosen = [e for e in events if isinstance(e, ev.CriterionChosen)]
    assert [(e.dimension, e.candidates) for e in chosen] == [("operation", 2)]
    assert [e.values for e in events if isinstance(e, ev.NodeSplit)] == [("addition", "subtraction", "division")]


def test_each_attempt_shows_other_shots_and_skips_used_facets(store_path):
    model = ScriptedModel(
        samples=samples,
        criterion=lambda r, n: {"dimension": ["mood", "topic"][min(n // 3, 1)], "labels": ["calm", "tense", "calm"]},
        coverage=lambda r, n: {"status": "null", "new_values": []},
    )
    run_engine(config(depth=2, criterion_candidates=3), model, store_path)
    requests = [req for role, req in model.calls if role == "criterion"]
    shots_of = [tuple(json.loads(m[1])["dimension"] for m in req.messages if m[0] == "assistant") for req in requests]
    assert len(set(shots_of[:3])) == 3  # three attempts, three pairs of shots
    after_mood = shots_of[3:]
    assert after_mood and all("mood" not in shots for shots in after_mood)


def test_repeated_dimension_on_the_path_is_rejected(store_path):
    model = ScriptedModel(
        samples=samples,
        criterion=lambda r, n: {"dimension": "Operation", "labels": ["plus", "minus", "plus"]},
        coverage=lambda r, n: {"status": "null", "new_values": []},
    )
    store, events = run_engine(config(depth=2, criterion_retries=2), model, store_path)
    reasons = [e.reason for e in events if isinstance(e, ev.AnswerRejected)]
    assert reasons and all("already used" in r for r in reasons)
    assert len([e for e in events if isinstance(e, ev.NodeSplit)]) == 1


def test_coverage_infinite_rounds_until_max_values_then_one_infinite_child(store_path):
    names = ["ann", "bo", "cy", "dee", "eve", "flo", "gus", "hal", "ivy", "jo", "kai", "lu"]

    def coverage(request, n):
        return {"status": "infinite", "new_values": names[3 + 3 * n : 6 + 3 * n]}

    model = ScriptedModel(
        samples=samples,
        criterion=lambda r, n: {"dimension": "name", "labels": names[:3]},
        coverage=coverage,
    )
    store, events = run_engine(config(max_values=7, infinite_samples=3), model, store_path)
    split = [e for e in events if isinstance(e, ev.NodeSplit)][0]
    assert split.infinite and len(split.values) == 9  # 3 labels + 3 + 3 passes 7 after two rounds
    assert model.seen["coverage"] == 2
    leaves = store.nodes(depth=1)
    assert len(leaves) == 1 and isinstance(leaves[0].path[0][1], list)
    # one infinite dimension: infinite_samples ** 1 leaf calls of 2, each request drawing a value
    assert roles(store)["leaf"] == 6
    drawn = [r["attributes"]["name"] for r in export_lines(store)]
    assert set(drawn) <= set(split.values) and len(set(drawn)) > 1


def test_coverage_filters_values_and_stops_when_a_round_adds_nothing(store_path):
    model = ScriptedModel(
        samples=samples,
        criterion=lambda r, n: {"dimension": "name", "labels": ["ann", "bo", "cy"]},
        coverage=lambda r, n: {"status": "infinite", "new_values": ["ANN", "bo", "other", "ann lee", "name"]},
    )
    _, events = run_engine(config(), model, store_path)
    assert model.seen["coverage"] == 1
    assert [e.values for e in events if isinstance(e, ev.NodeSplit)] == [("ann", "bo", "cy")]

    model = ScriptedModel(
        samples=samples,
        criterion=lambda r, n: {"dimension": "name", "labels": ["ann", "bo", "cy"]},
        coverage=lambda r, n: {"status": "infinite", "new_values": [f"v{n}x"]},
    )
    run_engine(config(coverage_rounds=4, max_values=50), model, store_path.with_name("b.db"))
    assert model.seen["coverage"] == 4


def test_coverage_null_keeps_the_labels_and_ignores_new_values(store_path):
    model = ScriptedModel(
        samples=samples,
        criterion=lambda r, n: {"dimension": "name", "labels": ["ann", "bo", "ann"]},
        coverage=lambda r, n: {"status": "null", "new_values": ["cy"]},
    )
    _, events = run_engine(config(), model, store_path)
    assert [e.values for e in events if isinstance(e, ev.NodeSplit)] == [("ann", "bo")]
    assert model.seen["coverage"] == 1


def test_duplicates_and_debris_are_dropped_recorded_and_made_up(store_path):
    script = [
        {"text": "The farmer sells 3 apples at the market and earns 6 dollars."},
        {"text": "The farmer sells 3 apples at the market and earns 6 dollars!"},  # exact (normalised)
        {"text": "The farmer sold 3 apples at the market and earned 6 dollars."},  # near
        {"text": "Hello {json_string} - {value_type}"},  # debris
    ]

    def leaf(request, n):
        return script[n] if n < len(script) else samples(request, n)

    model = ScriptedModel(samples=leaf, criterion=None, coverage=None)
    store, events = run_engine(config(depth=0, samples=3), model, store_path)
    assert len(export_lines(store)) == 3
    reasons = [row["reason"] for row in store.db.query("SELECT reason FROM dropped ORDER BY call")]
    assert reasons[0] == "exact duplicate"
    assert reasons[1].startswith("near duplicate (cosine 0.9")
    assert reasons[2] == "template placeholder"
    assert events[-1].dropped == 3 and roles(store)["leaf"] == 6


def test_a_sample_that_breaks_the_sample_schema_is_dropped_never_committed(store_path):
    # The grammar makes this impossible on a real model; a scripted answer
    # stands for a grammar-engine bug (text under minLength, an unknown field).
    script = [{"text": "too short"}, {"text": "A farmer sells 4 apples to each of 5 neighbours.", "extra": 1}]

    def leaf(request, n):
        return script[n] if n < len(script) else samples(request, n)

    model = ScriptedModel(samples=leaf, criterion=None, coverage=None)
    store, events = run_engine(config(depth=0, samples=2), model, store_path)
    assert [len(r["text"]) >= 20 and set(r) == {"text", "leaf", "attributes"} for r in export_lines(store)] == [True, True]
    reasons = [row["reason"] for row in store.db.query("SELECT reason FROM dropped ORDER BY call")]
    assert reasons == [
        "does not match the sample schema (text: minLength)",
        "does not match the sample schema (the sample: additionalProperties)",
    ]
    assert events[-1].dropped == 2 and roles(store)["leaf"] == 4


def test_a_leaf_that_only_repeats_itself_stops_at_its_request_limit(store_path):
    model = ScriptedModel(samples=lambda r, n: {"text": "The same problem about apples, every time."}, criterion=None, coverage=None)
    store, events = run_engine(config(depth=0, samples=3, requests_per_sample=2.0), model, store_path)
    # 7 requests for the leaf (2 x 3 + 1), then three top-up rounds that each ask for the
    # shortfall, 2 (2 x 2 + 1 more requests each): bounded, and the run says how short it fell.
    assert len(export_lines(store)) == 1
    assert events[-1].samples == 1 and events[-1].wanted == 3
    assert roles(store)["leaf"] == 7 + 3 * 5
    assert [e.round for e in events if isinstance(e, ev.TopUp)] == [1, 2, 3]


def test_leaf_calls_follow_infinite_samples_to_the_power_k():
    assert plan_leaves([0, 1, 2], leaf_samples=10, infinite_samples=3, max_samples=None) == [
        [10],
        [10] * 3,
        [10] * 9,
    ]


def test_max_samples_scales_the_allocation_exactly():
    plans = plan_leaves([0, 1, 2], leaf_samples=10, infinite_samples=3, max_samples=65)
    assert sum(map(sum, plans)) == 65
    assert [sum(p) for p in plans] == [5, 15, 45]
    assert all(all(1 <= n <= 10 for n in p) for p in plans)


def test_breadth_first_order_level_by_level_and_each_batch_in_path_order(store_path):
    model = FakeModel()
    cfg = config(depth=3, pivots=2, max_values=3, leaf_samples=1, infinite_samples=1, criterion_retries=12)
    store, events = run_engine(cfg, model, store_path)
    split_depths = [e.depth for e in events if isinstance(e, ev.NodeSplit)]
    assert split_depths == sorted(split_depths) and split_depths[-1] == 2
    # The calls of a batch go out in tree (path) order; a batch's calls are
    # the CallFinished events between two BatchStarted events.
    position = {n.key: n.position for n in store.nodes()}
    batches: list[list[str]] = []
    for e in events:
        if isinstance(e, ev.BatchStarted):
            batches.append([])
        elif isinstance(e, ev.CallFinished):
            batches[-1].append(position[e.node])
    several_nodes = [b for b in batches if len(set(b)) >= 2]
    assert len(several_nodes) >= 3
    assert all(b == sorted(b) for b in batches)


def test_leaves_take_turns_every_first_request_before_any_second(store_path):
    # Leaf requests are ordered by (request index, path position): the filter,
    # shared by all leaves, sees samples in that order at every --parallel.
    cfg = config(depth=1, pivots=3, max_values=10, leaf_samples=1, infinite_samples=1, samples=12)
    store, events = run_engine(cfg, FakeModel(), store_path)
    position = {n.key: n.position for n in store.nodes()}
    order = [(e.call, position[e.node]) for e in events if isinstance(e, ev.LeafCallDone)]
    leaves = {p for _, p in order}
    assert len(leaves) >= 3 and max(c for c, _ in order) >= 1
    assert order[: len(leaves)] == [(0, p) for p in sorted(leaves)]
    first_round = [c for c, _ in order if c == 0]
    assert order[len(first_round):][0][0] == 1 and sorted(order[: len(first_round)]) == order[: len(first_round)]


class Widths(FakeModel):
    """The fake model, remembering how many requests each generate call carried."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.widths: list[int] = []

    def generate(self, requests):
        self.widths.append(len(requests))
        return super().generate(requests)


def calls_of(store) -> list[tuple]:
    return store.db.execute("SELECT key, node, step, attempt, response FROM calls ORDER BY key").fetchall()


def test_a_leafs_certain_next_requests_decode_beside_its_current_one_and_change_nothing(tmp_path):
    # Seven leaves sharing 24 samples, one sample per request: one request per
    # leaf at a time would keep 7 of 8 sequences busy, then fewer. With several
    # sequences the driver decodes a leaf's next requests too (those it needs
    # even if every answer is kept), holding their answers until it asks.
    cfg = config(depth=1, pivots=3, max_values=10, leaf_samples=8, samples=24)
    one, wide = Widths(parallel=1), Widths(parallel=8)
    a, _ = run_engine(cfg, one, tmp_path / "one.db")
    b, _ = run_engine(cfg, wide, tmp_path / "wide.db")
    assert export_lines(a) == export_lines(b) and len(export_lines(a)) == 24
    assert calls_of(a) == calls_of(b)
    # Nothing decoded in vain, nothing twice: every request sent is a stored call.
    assert len(wide.history) == len(one.history) == len(calls_of(b))
    leaves = sum(1 for n in b.nodes() if n.state == "done")
    # All 24 leaf requests in one generate (7 asked, 17 ahead) at 8 sequences;
    # at 1 the batches stay the driver's own (at most 4 calls).
    assert leaves == 7 and max(wide.widths) == 24 and max(one.widths) <= 4


def test_a_big_leaf_decodes_at_most_a_batch_ahead(tmp_path):
    # One leaf of 60 samples at 2 sequences (batches of 8): its current
    # request and 7 ahead, never its whole shortfall at once.
    cfg = config(depth=0, samples=60)
    one, two = Widths(parallel=1), Widths(parallel=2)
    a, _ = run_engine(cfg, one, tmp_path / "one.db")
    b, _ = run_engine(cfg, two, tmp_path / "two.db")
    assert export_lines(a) == export_lines(b) and len(export_lines(b)) == 60
    assert max(two.widths) == 8 and len(two.history) == len(one.history) == len(calls_of(b))


def test_same_inputs_same_tree_and_bytes(tmp_path):
    cfg = config(depth=2, pivots=3, max_values=3, leaf_samples=2)
    a, _ = run_engine(cfg, FakeModel(), tmp_path / "a.db")
    b, _ = run_engine(cfg, FakeModel(), tmp_path / "b.db")
    c, _ = run_engine(cfg.model_copy(update={"seed": 1}), FakeModel(), tmp_path / "c.db")
    assert export_lines(a) and export_lines(a) == export_lines(b)
    assert export_lines(a) != export_lines(c)


def test_rerun_on_a_finished_store_sends_nothing(store_path):
    cfg = config(depth=2, pivots=3, max_values=3, leaf_samples=2)
    first, _ = run_engine(cfg, FakeModel(), store_path)
    before = export_lines(first)
    again = FakeModel()
    second, events = run_engine(cfg, again, store_path)
    assert again.history == []
    assert before and export_lines(second) == before
    assert events[-1].calls_sent == 0


def test_unusable_pivots_are_retried_then_the_node_becomes_a_leaf(store_path):
    # 3 pivot requests at once, then the 3 again: the first of them is cut off
    # twice, so the node has no usable pivots after 2 attempts.
    model = ScriptedModel(samples=lambda r, n: "{\"text\": \"cut" if n < 4 else samples(r, n), criterion=None, coverage=None)
    store, events = run_engine(config(pivots=3, call_retries=2), model, store_path)
    assert roles(store)["pivots"] == 6
    rejected = [(e.step, e.attempt) for e in events if isinstance(e, ev.AnswerRejected)]
    assert rejected[:4] == [("pivots:0", 0), ("pivots:1", 0), ("pivots:2", 0), ("pivots:0", 1)]
    assert "no usable pivot samples" in store.nodes(depth=0)[0].reason
