"""Balance: routing down a finished tree, the seeded balancing arithmetic, the
CLI's refusals, and a real-model balance killed with SIGKILL and resumed."""

from __future__ import annotations

import json
from treesynth.engine.leaves import call_sizes
import os
import random
import re
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
from engine_helpers import make_store
from helpers_proc import TREESYNTH, treesynth_in_process

from treesynth.engine import balance as bal
from treesynth.engine.config import TaskConfig
from treesynth.models.base import ModelError
from treesynth.models.fake import FakeModel
from treesynth.store import Node, Step, Store
from treesynth.store.keys import canonical_json, child_key, derive_seed, root_key


# root: topic (finite) -> fractions | geometry | money
#   geometry: shape (infinite, one child holding the list) -> leaf
#   money: level (finite) -> easy | hard
TOPICS = ["fractions", "geometry", "money"]
SHAPES = ["circle", "square", "triangle"]
LEVELS = ["easy", "hard"]


def _node(parent, dimension, value, index, state, **fields):
    value_key = canonical_json(value) if isinstance(value, list) else value
    key = child_key(parent["key"], dimension, value_key)
    position = f"{parent['position']}.{index:04d}" if parent["position"] else f"{index:04d}"
    path = json.loads(parent["path"]) + [[dimension, value]]
    return {"key": key, "parent": parent["key"], "depth": parent["depth"] + 1, "position": position, "path": canonical_json(path), "state": state, **fields}


def _split(node, dimension, values, infinite=False):
    node.update(state="split", dimension=dimension, value_list=canonical_json(values), infinite=int(infinite))


def _leaf(node):
    node.update(state="done", plan="[]", calls_done=0)


def build_tree_store(path: Path, config: TaskConfig, model) -> dict[str, str]:
    """A finished tree written by hand through Store.commit: leaf label -> key."""
    store = make_store(path, config, model)
    root = {"key": root_key(), "parent": None, "depth": 0, "position": "", "path": "[]", "state": "open"}
    _split(root, "topic", TOPICS)
    nodes = [root]
    leaves = {}
    for i, topic in enumerate(TOPICS):
        child = _node(root, "topic", topic, i, "open")
        nodes.append(child)
        if topic == "geometry":
            _split(child, "shape", SHAPES, infinite=True)
            grandchild = _node(child, "shape", SHAPES, 0, "open")
            _leaf(grandchild)
            nodes.append(grandchild)
            leaves["geometry"] = grandchild["key"]
        elif topic == "money":
            _split(child, "level", LEVELS)
            for j, level in enumerate(LEVELS):
                grandchild = _node(child, "level", level, j, "open")
                _leaf(grandchild)
                nodes.append(grandchild)
                leaves[f"money/{level}"] = grandchild["key"]
        else:
            _leaf(child)
            leaves[topic] = child["key"]
    store.commit(Step(new_nodes=[Node.from_row(node) for node in nodes]))
    store.close()
    return leaves


def small_config(**overrides) -> TaskConfig:
    return TaskConfig.model_validate({"description": "grade-school math word problems", "depth": 2, "leaf_samples": 2, "seed": 3, **overrides})


@pytest.fixture
def tree(tmp_path):
    model = FakeModel()
    path = tmp_path / "tree.db"
    leaves = build_tree_store(path, small_config(), model)
    store = Store(path)
    yield store, model, leaves
    store.close()


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


# -- routing on the fake model ----------------------------------------------------------


def test_each_sample_lands_in_exactly_one_leaf_and_every_choice_is_among_the_node_values(tree):
    store, model, leaves = tree
    balancer = bal.Balancer(store, model)
    texts = [f"problem number {i} about {random.Random(i).choice(['pies', 'coins', 'angles'])}" for i in range(40)]
    routes = list(_drain(balancer.route_all(texts)))[-1]
    assert len(routes) == len(texts)
    assert set(routes) <= set(leaves.values())
    assert len(set(routes)) > 1  # the fake model's choices spread over the leaves
    # Every routing request offered exactly the node's values as an enum, and
    # every answer is one of them.
    tree_nodes = bal.Tree(store).nodes
    for request in model.history:
        values = request.schema["enum"]
        assert request.schema == {"type": "string", "enum": values}
        assert values in (TOPICS, LEVELS)
        assert request.temperature == 0.0
    for row in store.db.query("SELECT node, response FROM calls WHERE role = 'route'"):
        assert json.loads(row["response"]) in tree_nodes[row["node"]].value_list


def test_scripted_answers_route_to_their_leaves_and_an_infinite_node_costs_no_call(tree):
    store, model, leaves = tree
    model.enqueue('"money"', '"hard"', '"geometry"', '"fractions"')
    balancer = bal.Balancer(store, model)
    assert balancer.route("a shop sells pens") == (leaves["money/hard"], 2)
    assert balancer.route("a circle has radius 3") == (leaves["geometry"], 1)  # shape is infinite: passed through
    assert balancer.route("half of a pie") == (leaves["fractions"], 1)
    assert len(model.history) == 4


def test_a_label_outside_the_values_is_refused_never_used(tree):
    store, model, _ = tree
    model.enqueue('"algebra"')  # what an unconstrained model could say; the grammar never lets it
    with pytest.raises(ModelError, match="not one of the node's values"):
        bal.Balancer(store, model).route("x + 2 = 5")


def test_routing_calls_are_stored_and_replayed_not_resent(tree):
    store, model, _ = tree
    texts = [f"sample {i}" for i in range(12)] + ["sample 3"]  # a repeated text costs no new call
    first = bal.Balancer(store, model)
    routes = list(_drain(first.route_all(texts)))[-1]
    assert first.calls_replayed >= 1  # the repeat of "sample 3"
    again = FakeModel()
    second = bal.Balancer(store, again)
    assert list(_drain(second.route_all(texts)))[-1] == routes
    assert again.history == [] and second.calls_sent == 0
    assert second.calls_replayed == first.calls_sent + first.calls_replayed


# -- the arithmetic ---------------------------------------------------------------------------


def test_call_sizes_are_full_calls_then_the_remainder():
    assert call_sizes(25, 10) == [10, 10, 5]
    assert call_sizes(20, 10) == [10, 10]
    assert call_sizes(3, 10) == [3]
    assert call_sizes(0, 10) == []


def test_downsample_is_seeded_exact_and_in_input_order():
    indices = list(range(100, 130))
    kept = bal.downsample(indices, 7, seed=11)
    assert kept == sorted(random.Random(11).sample(indices, 7))  # recomputable by hand
    assert len(kept) == 7 and len(set(kept)) == 7 and set(kept) <= set(indices)
    assert kept == bal.downsample(indices, 7, seed=11)
    assert kept != bal.downsample(indices, 7, seed=12)
    assert bal.downsample([1, 2, 3], 7, seed=11) == [1, 2, 3]


def test_plan_balance_downsamples_crowded_leaves_and_counts_shortfalls(tree):
    store, _, leaves = tree
    t = bal.Tree(store)
    order = [leaf.key for leaf in t.leaves]
    # Leaves in tree order: fractions, geometry, money/easy, money/hard.
    assert order == [leaves["fractions"], leaves["geometry"], leaves["money/easy"], leaves["money/hard"]]
    routes = [leaves["fractions"]] * 9 + [leaves["geometry"]] * 2 + [leaves["money/hard"]] * 5
    random.Random(0).shuffle(routes)
    plans = bal.plan_balance(t, routes, 4, seed=5)
    assert [p.before for p in plans] == [9, 2, 0, 5]
    assert [len(p.kept) for p in plans] == [4, 2, 0, 4]
    assert [p.shortfall for p in plans] == [0, 2, 4, 0]
    fractions = [i for i, leaf in enumerate(routes) if leaf == leaves["fractions"]]
    assert plans[0].kept == sorted(random.Random(derive_seed(5, leaves["fractions"], "downsample", 0)).sample(fractions, 4))
    for p in plans:
        assert all(routes[i] == p.leaf.key for i in p.routed)
    assert sum(p.before for p in plans) == len(routes)


def test_balance_fills_every_shortfall_to_the_target_and_counts_add_up(tree):
    store, model, leaves = tree
    # 3 texts, 4 copies each: an occupied leaf holds >= 4 (crowded), and at most 3 of the 4 leaves are occupied (one short).
    texts = [f"text {i}" for i in range(3)] * 4
    plans = list(_drain(bal.balance(bal.Balancer(store, model, seed=9), texts, 3)))[-1]
    assert [p.after for p in plans] == [3, 3, 3, 3]
    assert sum(p.before for p in plans) == 12
    assert any(p.before > 3 for p in plans) and any(p.shortfall for p in plans)
    for p in plans:
        assert len(p.kept) == min(p.before, 3)
        assert len(p.synthesised) == p.shortfall == max(0, 3 - p.before)
        for sample, attributes in p.synthesised:
            assert set(sample) == {"text"}
            path = dict((d, v) for d, v in p.leaf.path)
            assert set(attributes) == set(path)
            for dimension, value in attributes.items():  # an infinite dimension's value is drawn from its list
                assert value in path[dimension] if isinstance(path[dimension], list) else value == path[dimension]
    # Synthesis calls are leaf calls under the leaf's attributes, stored with role 'balance'.
    prompts = [r.messages[1][1] for r in model.history if r.schema.get("type") == "array"]
    assert prompts and all(re.search(r"^[A-Z][\w '-]*: \S", p, re.M) for p in prompts)  # the leaf's "Dimension: value" lines
    assert store.db.execute("SELECT count(*) FROM calls WHERE role = 'balance'").fetchone()[0] == len(prompts)


def test_output_keeps_original_lines_verbatim_and_marks_synthesised(tree):
    store, model, _ = tree
    raw = ['{"text": "one",   "id": 1}', '{"id": 2, "text": "two"}', '{"text":"three","id":3}']
    texts = [json.loads(r)["text"] for r in raw]
    plans = list(_drain(bal.balance(bal.Balancer(store, model), texts, 3)))[-1]
    lines = bal.output_lines(plans, raw, ["text"])
    originals = [line for line in lines if '"synthesised"' not in line]
    assert sorted(originals) == sorted(r + "\n" for r in raw)
    made = [json.loads(line) for line in lines if '"synthesised"' in line]
    assert len(made) == sum(len(p.synthesised) for p in plans) == 12 - 3
    assert all(m["synthesised"] is True and m["leaf"] and isinstance(m["attributes"], dict) for m in made)


def test_table_shows_bars_counts_extremes_and_empty_leaves(tree):
    store, _, leaves = tree
    t = bal.Tree(store)
    routes = [leaves["fractions"]] * 5 + [leaves["money/hard"]]
    plans = bal.plan_balance(t, routes, 3, seed=0)
    plans[2].synthesised = [({"text": "x"}, {})] * 3  # money/easy: filled
    plans[1].synthesised = [({"text": "x"}, {})] * 2  # geometry: one short
    plans[3].synthesised = [({"text": "x"}, {})] * 2
    lines = bal.table_lines(plans, 3)
    assert lines[1].split() == ["fractions", "5", "3", "###xx"]
    assert lines[2].endswith("0      2  ++")
    assert lines[4].endswith("1      3  #++")
    assert "empty before: 2, after: 0" in "\n".join(lines)
    assert "6 before, 11 after (4 kept, 2 dropped, 7 synthesised)" in "\n".join(lines)
    assert "largest leaf before: fractions (5); smallest: geometry > shape: any of 3 (0)" in "\n".join(lines)
    assert lines[-1].startswith("short: 1 leaves below the target")
    crowded = bal.plan_balance(t, [leaves["fractions"]] * 90, 3, seed=0)
    for p in crowded[1:]:
        p.synthesised = [({"text": "x"}, {})] * 3
    scaled = bal.table_lines(crowded, 3)
    assert scaled[1].split() == ["fractions", "90", "3", "#" + "x" * 29]  # 30 cells for 90 samples
    assert scaled[2].split()[-1] == "+"
    assert scaled[5] == "bar: # kept, x dropped, + synthesised (one cell = 3.0 samples)"


# -- the CLI's refusals ---------------------------------------------------------------------


def _cli(*args, cwd):
    """In this process: only the killed balance below needs a real one."""
    return treesynth_in_process(*args, cwd=cwd)


@pytest.mark.parametrize(
    "lines, extra, message",
    [
        (None, [], "no such file"),
        ([], [], "is empty"),
        (['{"text": "a"}', "not json"], [], "line 2: not JSON"),
        (['{"text": "a"}', '{"body": "b"}'], ["--field", "text"], "line 2: no field 'text'"),
        (['{"text": "a"}', "[1, 2]"], [], "line 2: not a JSON object"),
        (['{"text": "a"}'], ["--per-leaf", "0"], "--per-leaf must be at least 1"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, lines, extra, message):
    build_tree_store(tmp_path / "tree.db", small_config(), FakeModel())
    data = tmp_path / "data.jsonl"
    if lines is not None:
        write_jsonl(data, lines)
    per_leaf = [] if "--per-leaf" in extra else ["--per-leaf", "2"]
    result = _cli("balance", str(data), "--store", "tree.db", *per_leaf, *extra, "--model", "fake:", "-o", "out.jsonl", cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out.jsonl").exists()
    assert Store(tmp_path / "tree.db").db.execute("SELECT count(*) FROM calls").fetchone()[0] == 0


def test_skip_bad_skips_and_counts(tmp_path):
    build_tree_store(tmp_path / "tree.db", small_config(), FakeModel())
    write_jsonl(tmp_path / "data.jsonl", ['{"text": "a pie cut in halves"}', "oops", '{"body": 1}', '{"text": "coins"}'])
    result = _cli("balance", "data.jsonl", "--store", "tree.db", "--per-leaf", "1", "--field", "text", "--skip-bad", "--model", "fake:", "-o", "out.jsonl", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "skipped 2 bad lines" in result.stderr
    assert "samples: 2 before, 4 after" in result.stdout
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 4


def test_a_store_without_a_finished_tree_is_refused(tmp_path):
    config = small_config()
    store = make_store(tmp_path / "tree.db", config, FakeModel())
    store.commit(Step(new_nodes=[Node(key=root_key(), parent=None, depth=0, position="", path=[], state="open")]))
    store.close()
    write_jsonl(tmp_path / "data.jsonl", ['{"text": "a"}'])
    result = _cli("balance", "data.jsonl", "--store", "tree.db", "--per-leaf", "2", "--model", "fake:", cwd=tmp_path)
    assert result.returncode == 2 and "has no finished tree" in result.stderr
    missing = _cli("balance", "data.jsonl", "--store", "nothere.db", "--per-leaf", "2", "--model", "fake:", cwd=tmp_path)
    assert missing.returncode == 2 and "no store at nothere.db" in missing.stderr


# -- real model: killed once and resumed ------------------------------------------------------------

PROBLEMS = [
    "Sara cuts a pie into 8 equal slices and eats 3. What fraction of the pie is left?",
    "A square garden has sides of 5 meters. What is its area?",
    "Tom buys 3 pens at 2 dollars each and pays with a 10 dollar bill. How much change does he get?",
    "Mia saves 4 dollars a week. How much has she saved after 6 weeks?",
]


def _calls(path: Path) -> list[tuple[str, str]]:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)  # never creates the file
    try:
        return sorted(conn.execute("SELECT key, response FROM calls").fetchall())
    finally:
        conn.close()


def test_real_model_balance_killed_and_resumed_gives_the_same_output(tmp_path):
    # Short samples keep the synthesis calls of the small model short.
    schema = {"type": "object", "properties": {"question": {"type": "string", "minLength": 10, "maxLength": 100}}, "required": ["question"]}
    config = small_config(sample_schema=schema, max_tokens=256)
    for name in ("a.db", "b.db"):
        build_tree_store(tmp_path / name, config, FakeModel())
    write_jsonl(tmp_path / "data.jsonl", [{"id": i, "question": q} for i, q in enumerate(PROBLEMS)])
    args = ["balance", "data.jsonl", "--field", "question", "--per-leaf", "1", "--threads", "1", "--no-progress"]

    whole = _cli(*args, "--store", "a.db", "-o", "a.jsonl", cwd=tmp_path)
    assert whole.returncode == 0, whole.stderr

    process = subprocess.Popen([*TREESYNTH, *args, "--store", "b.db", "-o", "b.jsonl"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            done = len(_calls(tmp_path / "b.db"))
        except sqlite3.OperationalError:
            done = 0
        if done >= 2:
            break
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL  # killed mid-run, not finished
    assert not (tmp_path / "b.jsonl").exists()
    committed = len(_calls(tmp_path / "b.db"))
    assert committed >= 2

    resumed = _cli(*args, "--store", "b.db", "-o", "b.jsonl", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert (tmp_path / "b.jsonl").read_bytes() == (tmp_path / "a.jsonl").read_bytes()
    assert _calls(tmp_path / "b.db") == _calls(tmp_path / "a.db")
    assert f"{committed} replayed from the store" in resumed.stdout  # nothing committed was sent again
    assert resumed.stdout.split("model calls:")[0] == whole.stdout.split("model calls:")[0]  # same table

    out = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    originals = [r for r in out if not r.get("synthesised")]
    assert {r["id"] for r in originals} <= set(range(len(PROBLEMS)))
    counts = Counter(r["leaf"] for r in out if r.get("synthesised"))
    assert len(out) == len(originals) + sum(counts.values())
    assert "leaves: 4, target 1 per leaf" in whole.stdout
    after = int(re.search(r"samples: 4 before, (\d+) after", whole.stdout)[1])
    assert len(out) == after <= 4  # one sample per leaf at most


def _drain(generator):
    """Run an engine generator to the end: its events, then its return value."""
    while True:
        try:
            yield next(generator)
        except StopIteration as stop:
            yield stop.value
            return
