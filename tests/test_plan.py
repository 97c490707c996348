"""`treesynth plan`: the arithmetic of engine/plan.py against counts worked
out by hand, a real run on the fake model inside the worst case, the CLI's
output and errors, and the ETA line of `treesynth status`."""

from __future__ import annotations

import itertools
import json
import re
from collections import Counter

import pytest
from typer.testing import CliRunner

from engine_helpers import make_store, run_engine
from treesynth.engine.cli import plan as cli_plan
from treesynth.engine import plan as plans
from treesynth.engine.cli import app
from treesynth.engine.config import TaskConfig
from treesynth.engine.export import status_lines
from treesynth.engine.leaves import equal_targets, plan_leaves
from treesynth.engine.tree import TreeSynth
from treesynth.models.fake import FakeModel

DEMO = ["Short product reviews of kitchen appliances", "--depth", "2", "--pivots", "4", "--max-values", "4", "--samples", "30"]


def config(**fields) -> TaskConfig:
    return TaskConfig(description="short product reviews", **fields)


def counts(c: plans.Counts) -> dict:
    return {"internal": c.internal, "leaves": c.leaves, **c.by_role(), "samples": c.samples}


# -- arithmetic, by hand ----------------------------------------------------------


def test_demo_config_by_hand():
    # Defaults: call_retries 3, criterion_retries 8, criterion_candidates 3,
    # coverage_rounds 8, requests_per_sample 2, samples_per_request 1.
    p = plans.plan(config(depth=2, pivots=4, max_values=4, samples=30))
    # Expected: 1 + 4 split nodes, 16 leaves; each split node 4 pivot
    # requests, 3 criterion attempts, 1 coverage round (4 labels reach 4
    # values); 30 samples, one request each.
    assert counts(p.expected) == {"internal": 5, "leaves": 16, "pivots": 20, "criterion": 15, "coverage": 5, "leaf": 30, "samples": 30}
    # Worst: 4 x 3 pivot attempts, 8 criterion, 8 coverage a node; 30 over 16
    # leaves is 14 x 2 + 2 x 1, request limits 2*2+1 = 5 and 2*1+1 = 3, so
    # 14*5 + 2*3 = 76 requests, and again in each of 3 top-up rounds: 304.
    assert counts(p.worst) == {"internal": 5, "leaves": 16, "pivots": 60, "criterion": 40, "coverage": 40, "leaf": 304, "samples": 30}
    assert (p.expected.nodes, p.expected.calls, p.worst.calls) == (21, 70, 444)
    assert p.worst_tokens == 444 * 2048


def test_requests_of_several_samples_by_hand():
    p = plans.plan(config(depth=1, pivots=6, samples_per_request=4, max_values=3, leaf_samples=5, infinite_samples=2))
    # 6 pivots in ceil(6/4) = 2 requests; 3 values already from the labels:
    # one coverage round; 3 leaves of 5 samples, ceil(5/4) = 2 requests each.
    assert counts(p.expected) == {"internal": 1, "leaves": 3, "pivots": 2, "criterion": 3, "coverage": 1, "leaf": 6, "samples": 15}
    # Request limit of 5 samples: ceil(2*5/4) + 1 = 4; infinite_samples 2 <= 3 values.
    assert counts(p.worst) == {"internal": 1, "leaves": 3, "pivots": 6, "criterion": 8, "coverage": 8, "leaf": 12, "samples": 15}


def test_infinite_samples_above_max_values_count_infinite_trees():
    p = plans.plan(config(depth=2, pivots=2, max_values=2, infinite_samples=5, leaf_samples=1))
    assert counts(p.expected) == {"internal": 3, "leaves": 4, "pivots": 6, "criterion": 9, "coverage": 3, "leaf": 4, "samples": 4}
    # 2 pivot requests x 3 attempts x 3 nodes = 18. Leaf trees: 4 leaves of 1
    # (4 x 3 = 12 requests), 2 of 5 (2 x 11 = 22),
    # 1 of 25 (51): the infinite chain is the worst.
    assert counts(p.worst) == {"internal": 3, "leaves": 4, "pivots": 18, "criterion": 24, "coverage": 24, "leaf": 51, "samples": 25}


def test_max_samples_scales_the_leaves_by_hand():
    p = plans.plan(config(depth=1, max_values=4, leaf_samples=10, max_samples=10))
    # 4 leaves would make 40 > 10: targets 3, 3, 2, 2.
    assert (p.expected.leaf, p.expected.samples) == (10, 10)
    # Request limits 7, 7, 5, 5.
    assert (p.worst.leaf, p.worst.samples) == (24, 10)


def test_depth_zero_is_one_leaf():
    p = plans.plan(config(depth=0, samples=7))
    assert counts(p.expected) == {"internal": 0, "leaves": 1, "pivots": 0, "criterion": 0, "coverage": 0, "leaf": 7, "samples": 7}
    assert p.worst.leaf == (2 * 7 + 1) * 4 and p.worst.nodes == 1


def test_expected_coverage_rounds():
    # 10 labels, 10 new values a round: 4 rounds to reach 50 values.
    assert plans.expected_coverage_rounds(config(pivots=10, max_values=50)) == 4
    # Two rounds can reach only 10 + 20 = 30 values.
    two = config(pivots=10, max_values=50, coverage_rounds=2)
    assert (plans.expected_branching(two), plans.expected_coverage_rounds(two)) == (30, 2)


@pytest.mark.parametrize("leaves, total", [(1, 7), (3, 10), (16, 30), (5, 3), (7, 49)])
def test_leaf_targets_match_the_engine(leaves, total):
    """The closed forms must give the targets the engine's own functions give."""
    split = Counter(dict(plans._equal_split(total, leaves)))
    assert +split == +Counter(equal_targets(leaves, total))
    scaled = plans._leaf_targets(config(max_samples=total, leaf_samples=4), leaves)
    engine = Counter(sum(plan) for plan in plan_leaves([0] * leaves, 4, 3, total))
    assert +Counter(dict(scaled)) == +engine


def test_expected_never_exceeds_worst():
    grid = itertools.product((0, 1, 2, 3), (2, 5), (2, 3, 60), (1, 4), (None, 7, 100), (1, 3), (1, 2))
    for depth, pivots, max_values, infinite_samples, samples, per_request, candidates in grid:
        c = config(depth=depth, pivots=pivots, max_values=max_values, infinite_samples=infinite_samples,
                   samples=samples, samples_per_request=per_request, criterion_candidates=candidates)  # fmt: skip
        p = plans.plan(c)
        for key, value in counts(p.expected).items():
            assert value <= counts(p.worst)[key], (key, c)


def test_remaining_calls_by_hand():
    c = config(depth=2, pivots=4, max_values=4, samples=30)  # 4 + 3 + 1 = 8 calls a split node
    start = plans.Progress(unsplit={(0, "open"): 1}, leaves=0, unplanned_leaves=0, shortfalls=[])
    assert plans.remaining_calls(c, start) == plans.plan(c).expected.calls == 70
    # Two depth-1 nodes have their criterion (1 coverage call each), one is
    # open (8), one became a leaf: 1 + 3 x 4 leaves, 30 samples: 30 requests.
    middle = plans.Progress(unsplit={(1, "criterion"): 2, (1, "open"): 1}, leaves=1, unplanned_leaves=1, shortfalls=[])
    assert plans.remaining_calls(c, middle) == 2 + 8 + 30
    pairs = config(depth=2, pivots=4, max_values=4, samples=30, samples_per_request=2)
    leaves_only = plans.Progress(unsplit={}, leaves=3, unplanned_leaves=0, shortfalls=[2, 0, 3])
    assert plans.remaining_calls(pairs, leaves_only) == 1 + 0 + 2


def test_eta_text():
    stored = config(depth=2, pivots=4, max_values=4, samples=30).model_dump(mode="json")
    start = {"unsplit": {(0, "open"): 1}, "leaves": 0, "unplanned_leaves": 0, "shortfalls": []}
    assert plans.eta_text(stored, start, 0, 0.0, False).startswith("unknown")
    assert plans.eta_text(stored, start, 5, 3.0, True).startswith("none")
    # 2 s a call x 70 calls = 140 s.
    assert plans.eta_text(stored, start, 10, 20.0, False).startswith("~2.3 min of model time (2.00 s a call over the 10 calls so far, x ~70 calls left")
    assert plans.eta_text({"description": "x", "no such key": 1}, start, 10, 20.0, False).startswith("unknown")


def test_duration_and_approx():
    assert [plans.duration(s) for s in (0.2, 45, 150, 5400, 86400 * 3)] == ["under 1 s", "45 s", "2.5 min", "1.5 h", "3 days"]
    assert [plans.approx(n) for n in (7, 5335, 909312)] == ["~7", "~5,300", "~910,000"]


def test_hint_names_the_flag_to_lower():
    small = config(depth=2, pivots=4, max_values=4, samples=30)
    assert plans.hint(plans.plan(small), small) is None
    tree = config(depth=3, max_values=50, samples=100)
    assert "--max-values or --depth" in plans.hint(plans.plan(tree), tree)
    unbounded = config(depth=1, max_values=3, leaf_samples=50, infinite_samples=20, pivots=2)
    assert "--samples N or --max-samples N" in plans.hint(plans.plan(unbounded), unbounded)
    budget = config(depth=1, max_values=3, pivots=2, samples=2000)
    assert "lower --samples first" in plans.hint(plans.plan(budget), budget)


# -- a real run on the fake model --------------------------------------------------------


def test_fake_run_stays_within_the_worst_case(tmp_path):
    c = config(depth=2, pivots=3, max_values=3, samples=8, seed=3)
    store, _ = run_engine(c, FakeModel(), tmp_path / "run.db")
    p = plans.plan(c)
    roles = Counter(dict(store.db.execute("SELECT role, count(*) FROM calls GROUP BY role").fetchall()))
    states = Counter(dict(store.db.execute("SELECT state, count(*) FROM nodes GROUP BY state").fetchall()))
    assert sum(roles.values()) > 0
    for role in plans.ROLES:
        assert roles[role] <= getattr(p.worst, role), role
    assert sum(states.values()) <= p.worst.nodes and states["split"] <= p.worst.internal
    assert store.sample_count() <= p.worst.samples
    # The fake model's pivots are always usable: exactly the expected requests a split node.
    assert roles["pivots"] == states["split"] * plans.pivot_requests(c)
    # A split has at most max_values (here the expected branching) values: no more nodes than expected.
    assert sum(states.values()) <= p.expected.nodes


# -- the CLI ------------------------------------------------------------------------------


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def rows(output: str) -> dict[str, list[str]]:
    table = {}
    for line in output.splitlines():
        match = re.match(r"^(\s*[a-z][a-z ]*?)\s{2,}(\S+(?: \S+)*)\s{2,}(\S+(?: \S+)*)$", line)
        if match:
            table[match.group(1).strip()] = [match.group(2), match.group(3)]
    return table


def test_plan_prints_the_numbers_and_bounds(monkeypatch, tmp_path):
    monkeypatch.setattr(cli_plan, "BENCH_JSON", tmp_path / "bench.json")  # absent
    result = invoke("plan", *DEMO, "--no-probe")
    assert result.exit_code == 0, result.output
    table = rows(result.stdout)
    assert table["nodes"] == ["21", "21"] and table["leaves"] == ["16", "16"]
    assert table["model calls"] == ["70", "444"]
    assert [table[r] for r in plans.ROLES] == [["20", "60"], ["15", "40"], ["5", "40"], ["30", "304"]]
    assert table["samples"] == ["30", "30"]
    assert table["tokens"] == ["unknown", "909,312"] and table["time"] == ["unknown", "unknown"]
    assert "time: cannot estimate: no probe (--no-probe)" in result.stdout
    assert "bounds: --samples 30, --max-samples none, --max-values 4, --infinite-samples 3, --depth 2" in result.stdout
    assert "expected: every step succeeds at its first try" in result.stdout
    assert "hint:" not in result.stdout
    large = invoke("plan", "notes", "--depth", "3", "--no-probe")
    assert re.search(r"^hint: .*max_values\^depth \(50\^3 = 125,000 leaves at worst\)", large.stdout, re.M), large.stdout


def test_plan_times_from_bench_json(monkeypatch, tmp_path):
    from treesynth.models.embedded import FILENAME

    bench = tmp_path / "bench.json"
    entry = {"name": "smollm2-135m", "file": FILENAME, "constrained_tok_s": 100.0, "load_s": 2.0, "schemas": {"leaf": {"tokens": 240}}}
    bench.write_text(json.dumps({"quick": False, "models": [entry]}))
    monkeypatch.setattr(cli_plan, "BENCH_JSON", bench)
    result = invoke("plan", *DEMO, "--no-probe")
    assert result.exit_code == 0, result.output
    # 80 tokens a sample (240 over the bench's 3): 20 pivot + 30 leaf calls at
    # 80, 15 criterion at 8 + 3*5 = 23, 5 coverage at 38: 4,535 tokens; at
    # 100 tok/s with no prompt time, plus 2 s of load: 47.35 s.
    assert rows(result.stdout)["tokens"] == ["~4,500", "909,312"]
    assert rows(result.stdout)["time"][0] == "~47 s"
    assert f"from {bench}" in result.stdout
    other = invoke("plan", *DEMO, "--no-probe", "--model", str(tmp_path / "other.gguf"))
    assert f"time: cannot estimate: {bench} has no measurement of other.gguf" in other.stdout


def test_plan_probe_on_the_fake_model():
    result = invoke("plan", *DEMO, "--model", "fake:")
    assert result.exit_code == 0, result.output
    assert rows(result.stdout)["time"][0] == "under 1 s"
    assert "measured by 1 pivot request at once to fake:" in result.stdout
    # The probe decodes as the run would: as many of the root's pivot requests at once as --parallel allows.
    wide = invoke("plan", *DEMO, "--model", "fake:", "--parallel", "3")
    assert wide.exit_code == 0, wide.output
    assert "measured by 3 pivot requests at once to fake:" in wide.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["notes", "--depth", "99"], "error: plan: depth: Input should be less than or equal to 8"),
        (["notes", "--pivots", "1", "--no-probe"], "error: plan: pivots:"),
        ([], "error: give a description or --spec TASK.toml"),
        (["notes", "--model", "/no/such/model.gguf"], "error: model file not found"),
        (["notes", "--preset", "nope"], "error: unknown preset 'nope'"),
    ],
)
def test_plan_bad_input_is_one_line(args, needle):
    result = invoke("plan", *args)
    assert result.exit_code == 2
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(needle), result.stderr
    assert result.stdout == ""


def test_plan_builds_the_config_run_builds(monkeypatch, tmp_path):
    """The same flags make the same TaskConfig in `plan` and in `run`."""
    flags = ["poems about rain", "--depth", "1", "--pivots", "3", "--max-values", "3", "--samples", "4",
             "--samples-per-request", "2", "--seed", "5", "--temperature-leaf", "0.7", "--max-tokens", "300"]  # fmt: skip
    seen = []
    real_plan = plans.plan
    monkeypatch.setattr(cli_plan.plans, "plan", lambda c: seen.append(c) or real_plan(c))
    assert invoke("plan", *flags, "--no-probe").exit_code == 0
    store = tmp_path / "run.db"
    ran = invoke("run", *flags, "--store", str(store), "--model", "fake:", "--no-progress")
    assert ran.exit_code == 0, ran.output
    # `run` says its plan on stderr before the engine starts.
    assert "plan: " in ran.stderr and "model calls and 4 samples expected" in ran.stderr
    from treesynth.store import Store

    db = Store.open_existing(store)
    assert db.run().config == seen[0].model_dump(mode="json")
    assert "eta:         none: the run is finished" in status_lines(db)


def test_status_eta_of_an_unfinished_run(tmp_path):
    c = config(depth=2, pivots=3, max_values=3, samples=8)
    model = FakeModel(delay=0.002)
    store = make_store(tmp_path / "run.db", c, model)
    from engine_helpers import embedder

    events = TreeSynth(c, model, store, embedder()).run()
    for _ in itertools.islice(events, 6):  # the start, then the root's first pivot calls
        pass
    events.close()
    eta = [line for line in status_lines(store) if line.startswith("eta:")]
    assert len(eta) == 1
    match = re.search(r"over the (\d+) calls so far, x ~(\d+) calls left", eta[0])
    assert match, eta[0]
    made, left = int(match.group(1)), int(match.group(2))
    assert made > 0 and left > 0
    assert left <= plans.plan(c).expected.calls


def test_plan_probe_on_the_embedded_model():
    """End to end on the real 135M model: the root's pivot requests, decoded at
    once as the run decodes them, time the estimate (seconds). Seed 3: the
    probe took 11 s; the other seeds of 0-7 took 12-20 s (four pivot answers
    decoded at once last as long as the longest)."""
    result = invoke("plan", *DEMO, "--seed", "3")
    assert result.exit_code == 0, result.output
    table = rows(result.stdout)
    assert table["model calls"] == ["70", "444"]
    assert re.fullmatch(r"~[\d,]+", table["tokens"][0]) and table["tokens"][1] == "909,312"
    assert table["time"][0].startswith(("~", "under")) and table["time"][1] != "unknown"
    assert re.search(r"at [\d,]+ tok/s and [\d.]+ s a call beyond decoding, \d+ tokens a sample", result.stdout)
    assert "measured by 4 pivot requests at once to the embedded SmolLM2-135M" in result.stdout
