"""Every step of the method on scripted and fake models: no llama.cpp here."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from engine_helpers import export_lines, run_engine
from treesynth.engine import events as ev
from treesynth.engine.config import TaskConfig
from treesynth.engine.leaves import plan_leaves
from treesynth.models.base import Response
from treesynth.models.fake import FakeModel


def role_of(request) -> str:
    schema = request.schema
    if schema["type"] == "array":
        return "leaf" if "new, varied samples" in request.messages[-1][1] else "pivots"
    return "criterion" if "dimension" in schema["properties"] else "coverage"


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
    count = request.schema["minItems"]
    return [{"text": f"sample {n}-{i}"} for i in range(count)]


def config(**kw) -> TaskConfig:
    base = dict(description="grade-school math word problems", depth=1, pivots=3, leaf_samples=2, max_values=5)
    return TaskConfig(**{**base, **kw})


def test_one_split_makes_one_leaf_per_value(store_path):
    model = ScriptedModel(
        pivots=samples,
        criterion=lambda r, n: {"dimension": "operation", "labels": ["addition", "subtraction", "addition"]},
        coverage=lambda r, n: {"status": "complete", "new_values": ["division"]},
        leaf=samples,
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


def test_pivot_prompt_names_task_and_path_and_asks_for_exact_count(store_path):
    model = ScriptedModel(
        pivots=samples,
        criterion=lambda r, n: {"dimension": ["operation", "setting"][n // 1 if n < 2 else 1], "labels": ["a1", "b1", "a1"]},
        coverage=lambda r, n: {"status": "null", "new_values": []},
        leaf=samples,
    )
    run_engine(config(depth=2), model, store_path)
    pivot_requests = [req for role, req in model.calls if role == "pivots"]
    root, child = pivot_requests[0], pivot_requests[1]
    assert "grade-school math word problems" in root.messages[-1][1]
    assert "whole data space" in root.messages[-1][1]
    assert "- operation: a1" in child.messages[-1][1]
    assert root.schema["minItems"] == root.schema["maxItems"] == 3


def test_criterion_retries_are_bounded_then_the_node_becomes_a_leaf(store_path):
    model = ScriptedModel(
        pivots=samples,
        criterion=lambda r, n: {"dimension": "kind", "labels": ["other", "x", "y"]},
        coverage=lambda r, n: pytest.fail("no coverage without a criterion"),
        leaf=samples,
    )
    store, events = run_engine(config(criterion_retries=4), model, store_path)
    assert model.seen["criterion"] == 4
    rejected = [e for e in events if isinstance(e, ev.AnswerRejected)]
    assert len(rejected) == 4 and all("catch-all" in e.reason for e in rejected)
    root = store.nodes("depth = 0")[0]
    assert root["state"] == "done" and "no usable criterion" in root["reason"]
    assert len(export_lines(store)) == 2  # the root leaf's one call


def test_criterion_retry_uses_a_new_seed_and_can_succeed(store_path):
    answers = [
        {"dimension": "kind", "labels": ["a", "a", "a"]},  # one value only
        {"dimension": "kind", "labels": ["a / b", "c", "d"]},  # combined value
        {"dimension": "kind", "labels": ["a", "b", "a"]},
    ]
    model = ScriptedModel(
        pivots=samples,
        criterion=lambda r, n: answers[n],
        coverage=lambda r, n: {"status": "null", "new_values": []},
        leaf=samples,
    )
    _, events = run_engine(config(), model, store_path)
    seeds = [req.seed for role, req in model.calls if role == "criterion"]
    assert len(set(seeds)) == 3
    assert [e.values for e in events if isinstance(e, ev.NodeSplit)] == [("a", "b")]


def test_repeated_dimension_on_the_path_is_rejected(store_path):
    model = ScriptedModel(
        pivots=samples,
        criterion=lambda r, n: {"dimension": "Operation", "labels": ["p", "q", "p"]},
        coverage=lambda r, n: {"status": "null", "new_values": []},
        leaf=samples,
    )
    store, events = run_engine(config(depth=2, criterion_retries=2), model, store_path)
    reasons = [e.reason for e in events if isinstance(e, ev.AnswerRejected)]
    assert reasons and all("already used" in r for r in reasons)
    assert len([e for e in events if isinstance(e, ev.NodeSplit)]) == 1


def test_coverage_infinite_rounds_until_max_values_then_one_infinite_child(store_path):
    def coverage(request, n):
        return {"status": "infinite", "new_values": [f"value {n}-{i}" for i in range(3)]}

    model = ScriptedModel(
        pivots=samples,
        criterion=lambda r, n: {"dimension": "name", "labels": ["ann", "bo", "cy"]},
        coverage=coverage,
        leaf=samples,
    )
    store, events = run_engine(config(max_values=7, infinite_samples=3), model, store_path)
    split = [e for e in events if isinstance(e, ev.NodeSplit)][0]
    assert split.infinite and len(split.values) == 9  # 3 labels + 3 + 3 passes 7 after two rounds
    assert model.seen["coverage"] == 2
    leaves = store.nodes("depth = 1")
    assert len(leaves) == 1 and isinstance(leaves[0]["path"][0][1], list)
    # one infinite dimension on the path: infinite_samples ** 1 leaf calls, each drawing a value
    assert model.seen["leaf"] == 3
    drawn = {r["attributes"]["name"] for r in export_lines(store)}
    assert drawn <= set(split.values)


def test_coverage_stops_when_a_round_adds_nothing_and_is_bounded(store_path):
    model = ScriptedModel(
        pivots=samples,
        criterion=lambda r, n: {"dimension": "name", "labels": ["ann", "bo", "cy"]},
        coverage=lambda r, n: {"status": "infinite", "new_values": ["ANN", "bo"]},
        leaf=samples,
    )
    run_engine(config(), model, store_path)
    assert model.seen["coverage"] == 1

    model = ScriptedModel(
        pivots=samples,
        criterion=lambda r, n: {"dimension": "name", "labels": ["ann", "bo", "cy"]},
        coverage=lambda r, n: {"status": "infinite", "new_values": [f"v{n}"]},
        leaf=samples,
    )
    run_engine(config(coverage_rounds=4, max_values=50), model, store_path.with_name("b.db"))
    assert model.seen["coverage"] == 4


def test_coverage_null_keeps_the_labels_and_ignores_new_values(store_path):
    model = ScriptedModel(
        pivots=samples,
        criterion=lambda r, n: {"dimension": "name", "labels": ["ann", "bo", "ann"]},
        coverage=lambda r, n: {"status": "null", "new_values": ["cy"]},
        leaf=samples,
    )
    _, events = run_engine(config(), model, store_path)
    assert [e.values for e in events if isinstance(e, ev.NodeSplit)] == [("ann", "bo")]
    assert model.seen["coverage"] == 1


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


def test_breadth_first_order_level_by_level_in_path_order(store_path):
    model = FakeModel()
    cfg = config(depth=3, pivots=2, max_values=3, leaf_samples=1, infinite_samples=1)
    store, events = run_engine(cfg, model, store_path)
    split_depths = [e.depth for e in events if isinstance(e, ev.NodeSplit)]
    assert split_depths == sorted(split_depths) and split_depths[-1] == 2
    pivot_nodes = [
        r.messages[-1][1] for r in model.history if r.schema["type"] == "array" and "as different" in r.messages[-1][1]
    ]
    assert len(pivot_nodes) >= 3
    # within a level, nodes are split in tree (path) order
    positions = [n["position"] for n in store.nodes("state = 'split'")]
    by_level = {}
    for p in positions:
        by_level.setdefault(p.count(".") + (1 if p else 0), []).append(p)
    assert all(v == sorted(v) for v in by_level.values())


def test_same_inputs_same_tree_and_bytes(tmp_path):
    cfg = config(depth=2, pivots=3, max_values=3, leaf_samples=2)
    a, _ = run_engine(cfg, FakeModel(), tmp_path / "a.db")
    b, _ = run_engine(cfg, FakeModel(), tmp_path / "b.db")
    c, _ = run_engine(cfg.model_copy(update={"seed": 1}), FakeModel(), tmp_path / "c.db")
    assert export_lines(a) == export_lines(b)
    assert export_lines(a) != export_lines(c)


def test_rerun_on_a_finished_store_sends_nothing(store_path):
    cfg = config(depth=2, pivots=3, max_values=3, leaf_samples=2)
    first, _ = run_engine(cfg, FakeModel(), store_path)
    before = export_lines(first)
    again = FakeModel()
    second, events = run_engine(cfg, again, store_path)
    assert again.history == []
    assert export_lines(second) == before
    assert events[-1].calls_sent == 0


def test_unusable_pivots_are_retried_then_the_node_becomes_a_leaf(store_path):
    model = ScriptedModel(pivots=lambda r, n: "[{\"text\": \"cut", criterion=None, coverage=None, leaf=samples)
    store, events = run_engine(config(call_retries=2), model, store_path)
    assert model.seen["pivots"] == 2
    assert "no usable pivot samples" in store.nodes("depth = 0")[0]["reason"]
