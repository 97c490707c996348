"""Diversity: known numbers on known sets, the exact near-duplicate search
against brute force, seeded subsets, the CLI side by side on the default
independent embedder (MiniLM) and on the generator's own embeddings, and
--reference against the hand-written reference files of the benchmark."""

from __future__ import annotations

import itertools
import json
import math
import random

from pathlib import Path

import numpy as np
import pytest
from helpers_proc import treesynth_in_process
from typer.testing import CliRunner

from treesynth.engine import diversity as div
from treesynth.engine.cli import app
from treesynth.models.embed import LlamaCppEmbedder, describe_embedder, load_embedder, normalise_rows

REFERENCE = Path(__file__).resolve().parent.parent / "benchmarks" / "reference"


class FixedEmbedder:
    """Known vectors for known texts; records what it was asked to embed."""

    fingerprint = {"backend": "fixed", "file": "-", "pooling": "-"}

    def __init__(self, vectors: dict[str, list[float]] | None = None):
        self.vectors = vectors or {}
        self.asked: list[list[str]] = []

    def embed(self, texts):
        self.asked.append(list(texts))
        return normalise_rows(np.array([self.vectors.get(t, [1.0, float(len(t))]) for t in texts]))


@pytest.fixture(scope="module")
def minilm_embedder():
    return load_embedder(None)


@pytest.fixture(scope="module")
def smollm_embedder():
    from treesynth.models.embedded import default_model_path

    return LlamaCppEmbedder(default_model_path(), threads=1)


# -- known numbers ---------------------------------------------------------------------


def test_identical_samples_give_similarity_one_and_no_distinct_gain(smollm_embedder):
    text = "Tom has five red apples and eats two of them."
    one = div.measure("one", [text], None)
    same = div.measure("same", [text] * 4, smollm_embedder)
    assert same.cosine == pytest.approx(1.0, abs=1e-6)
    assert smollm_embedder.fingerprint["pooling"] == "mean"  # a generation model's GGUF names no pooling
    assert (same.unique_1, same.unique_2) == (one.unique_1, one.unique_2) == (10, 9)  # zero distinct gain
    assert same.distinct_1 == pytest.approx(one.distinct_1 / 4)
    assert same.exact_duplicates == same.near_duplicates == 0.75
    different = div.measure("different", [text, "A train leaves the station at noon at 60 km per hour."], smollm_embedder)
    assert different.cosine < 0.95  # the embedder does tell different texts apart


def test_a_known_small_set_gives_the_expected_numbers():
    vectors = {"a b c": [1, 0], "a b d": [0, 1], "x y z": [1, 1]}
    texts = ["a b c", "a b d", "x y z", "a b c"]
    result = div.measure("known", texts, FixedEmbedder(vectors))
    assert result.samples == 4 and result.pairs == 6
    # Pairs: (abc, abd) 0, (abc, xyz) 1/sqrt2, (abc, abc) 1, (abd, xyz) 1/sqrt2, (abd, abc) 0, (xyz, abc) 1/sqrt2.
    assert result.cosine == pytest.approx((1 + 3 / math.sqrt(2)) / 6)
    assert (result.unique_1, result.distinct_1) == (7, 7 / 12)  # a b c d x y z of 12 words
    assert (result.unique_2, result.distinct_2) == (5, 5 / 8)  # ab bc bd xy yz of 8 word pairs
    assert result.exact_duplicates == 0.25
    assert result.near_duplicates == 0.25  # {abc} and {abd} share no 3-gram


def test_mean_pairwise_cosine_is_the_mean_over_all_pairs():
    rng = np.random.default_rng(5)
    e = normalise_rows(rng.normal(size=(17, 6)))
    brute = np.mean([e[i] @ e[j] for i, j in itertools.combinations(range(17), 2)])
    assert div.mean_pairwise_cosine(e) == pytest.approx(brute, abs=1e-12)
    assert div.mean_pairwise_cosine(e[:1]) is None


def test_near_duplicates_follow_the_threshold_and_count_only_later_samples():
    texts = ["the cat sat on the mat today", "the cat sat on the mat yesterday", "a dog ran"]
    # 3-gram sets of 5 each, 4 shared: Jaccard 4/6.
    assert div.duplicate_flags(texts, 0.7) == ([False] * 3, [False] * 3)
    assert div.duplicate_flags(texts, 0.6) == ([False] * 3, [False, True, False])
    assert div.duplicate_flags(texts, 4 / 6) == ([False] * 3, [False, True, False])


def test_prefix_filtered_near_duplicates_equal_brute_force():
    rng = random.Random(7)
    vocabulary = "alpha beta gamma delta pie coin train apple half sum".split()
    base = [[rng.choice(vocabulary) for _ in range(rng.randint(1, 9))] for _ in range(25)]
    texts = []
    for _ in range(160):
        words = list(rng.choice(base))
        for _ in range(rng.randint(0, 2)):  # small edits make near duplicates
            words[rng.randrange(len(words))] = rng.choice(vocabulary)
        texts.append(" ".join(words))
    for near in (0.3, 0.5, 0.7, 0.9, 1.0):
        sets = [div.shingles(div.words(t)) for t in texts]

        def jaccard(a, b):
            return len(a & b) / len(a | b) if a | b else 0.0

        expected = [
            texts[i] in texts[:i] or any(sets[i] and jaccard(sets[i], sets[j]) >= near for j in range(i))
            for i in range(len(texts))
        ]
        assert div.duplicate_flags(texts, near)[1] == expected, near
        assert any(expected)


def test_beyond_max_embed_a_seeded_subset_is_embedded_and_the_output_says_so():
    texts = [f"sample number {i}" for i in range(50)]
    embedder = FixedEmbedder()
    result = div.measure("big.jsonl", texts, embedder, max_embed=10, seed=3)
    subset = sorted(random.Random(3).sample(range(50), 10))
    assert embedder.asked == [[texts[i] for i in subset]]
    assert (result.samples, result.embedded, result.pairs, result.subset_seed) == (50, 10, 45, 3)
    again = FixedEmbedder()
    assert div.measure("big.jsonl", texts, again, max_embed=10, seed=3).cosine == result.cosine
    note = div.table_lines([result])[-1]
    assert note == "* big.jsonl: cosine similarity over a seeded random 10 of 50 samples (all 45 pairs among them; seed 3)"
    assert div.table_lines([result])[3].split() == ["pairs", "averaged", "45", "*"]
    small = div.measure("small", texts[:10], FixedEmbedder(), max_embed=10)
    assert small.subset_seed is None and small.embedded == 10


def test_text_of_a_record_default_and_named_fields():
    record = {"question": "How many?", "answer": 4, "leaf": "xxh3:1", "attributes": {"topic": "sums"}, "note": "n"}
    assert div.sample_text(record, None) == "How many?\nn"
    assert div.sample_text(record, ["answer", "question"]) == "4\nHow many?"
    assert div.sample_text(record, ["missing"]) is None
    assert div.sample_text({"n": 1}, None) is None


# -- the CLI --------------------------------------------------------------------------------


def _cli(*args, cwd):
    return treesynth_in_process(*args, cwd=cwd)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_cli_side_by_side_table_and_json_without_a_model(tmp_path):
    _write(tmp_path / "a.jsonl", [{"text": "a b c"}, {"text": "a b d"}, {"text": "x y z"}, {"text": "a b c"}])
    _write(tmp_path / "b.jsonl", [{"text": "same words here"}] * 3)
    table = _cli("diversity", "a.jsonl", "b.jsonl", "--no-embeddings", cwd=tmp_path)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == ["a.jsonl", "b.jsonl"]
    assert lines[1].split() == ["samples", "4", "3"]
    assert lines[3].split() == ["pairs", "averaged", "-", "-"]  # --no-embeddings
    assert lines[4].split() == ["distinct-1", "0.583", "0.333"]
    assert lines[5].split() == ["distinct-2", "0.625", "0.333"]
    assert lines[8].split()[-4:] == ["25.0", "%", "66.7", "%"]
    assert lines[10].split() == ["near", "duplicates", "(cosine", ">=", "0.95)", "-", "-"]  # --no-embeddings
    assert len(lines) == 11  # no reference row without --reference
    as_json = _cli("diversity", "a.jsonl", "b.jsonl", "--no-embeddings", "--json", cwd=tmp_path)
    first = json.loads(as_json.stdout.splitlines()[0])
    assert first == div.measure("a.jsonl", ["a b c", "a b d", "x y z", "a b c"]).as_dict()


@pytest.mark.parametrize("choice", [None, "generator"])
def test_cli_cosine_is_what_a_recomputation_gives(tmp_path, choice, request):
    embedder = request.getfixturevalue("smollm_embedder" if choice else "minilm_embedder")
    gsm = ["Sara has 3 apples and buys 4 more. How many now?", "A train goes 60 km in 1 hour. How far in 3 hours?", "What is half of 18?"]
    flat = ["Sara has 3 apples and buys 4 more. How many now?", "Sara has 5 apples and buys 2 more. How many now?", "Sara has 3 pears and buys 4 more. How many now?"]
    _write(tmp_path / "gsm.jsonl", [{"question": q, "answer": "1"} for q in gsm])
    _write(tmp_path / "flat.jsonl", [{"question": q, "answer": "1"} for q in flat])
    extra = ["--embedder", choice] if choice else []
    result = _cli("diversity", "gsm.jsonl", "flat.jsonl", "--field", "question", "--threads", "1", "--json", *extra, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    for row, texts in zip(rows, (gsm, flat)):
        e = embedder.embed(texts)
        expected = np.mean([e[i] @ e[j] for i, j in itertools.combinations(range(3), 2)])
        assert row["cosine"] == pytest.approx(expected, abs=1e-6)
    assert rows[0]["cosine"] < rows[1]["cosine"]  # templated questions are less diverse
    assert rows[1]["near_duplicates"] == 0.0 and rows[1]["distinct_2"] < rows[0]["distinct_2"]


def test_cli_reads_a_store_like_its_export(tmp_path):
    run = _cli("run", "short notes", "--store", "t.db", "--model", "fake:", "--depth", "1", "--pivots", "3", "--max-values", "3", "--leaf-samples", "2", "--infinite-samples", "1", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert _cli("export", "t.db", "-o", "t.jsonl", cwd=tmp_path).returncode == 0
    from_store = _cli("diversity", "t.db", "--no-embeddings", "--json", cwd=tmp_path)
    from_file = _cli("diversity", "t.jsonl", "--no-embeddings", "--json", cwd=tmp_path)
    a, b = json.loads(from_store.stdout), json.loads(from_file.stdout)
    assert a.pop("name") == "t.db" and b.pop("name") == "t.jsonl"
    assert a == b and a["samples"] > 0


@pytest.mark.parametrize(
    "content, extra, message",
    [
        ('{"text": "a"}\n{"text": \n', [], "x.jsonl line 2: not JSON"),
        ('{"text": "a"}\n{"body": "b"}\n', ["--field", "text"], "x.jsonl line 2: no field 'text'"),
        ("\n\n", [], "x.jsonl is empty"),
        ('{"text": "a b"}\n', ["--near", "0"], "--near must be in (0, 1]"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, content, extra, message):
    (tmp_path / "x.jsonl").write_text(content, encoding="utf-8")
    result = _cli("diversity", "x.jsonl", "--no-embeddings", *extra, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {message}" or result.stderr.strip().startswith(f"error: {message}")
    assert len(result.stderr.strip().splitlines()) == 1 and result.stdout == ""
    assert _cli("diversity", "nothere.jsonl", "--no-embeddings", cwd=tmp_path).stderr.strip() == "error: no such file: nothere.jsonl"


def test_cli_embedder_must_be_a_local_gguf(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "a b"}\n{"text": "c d"}\n', encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not a model", encoding="utf-8")
    missing = _cli("diversity", "x.jsonl", "--embedder", "nothere.gguf", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.strip() == "error: model file not found: nothere.gguf"
    wrong = _cli("diversity", "x.jsonl", "--embedder", "notes.txt", cwd=tmp_path)
    assert wrong.returncode == 2 and wrong.stderr.strip() == "error: notes.txt is not a GGUF model file"


def test_cli_skip_bad_counts_what_it_skipped(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "a b"}\nnot json\n{"text": "c d"}\n', encoding="utf-8")
    result = _cli("diversity", "x.jsonl", "--no-embeddings", "--skip-bad", "--json", cwd=tmp_path)
    assert result.returncode == 0
    assert "x.jsonl: skipped 1 bad lines" in result.stderr
    assert json.loads(result.stdout)["samples"] == 2


# -- the independent embedder, near duplicates by embedding, --reference ------------------

runner = CliRunner()


def _invoke(*args):
    """The CLI in-process; stdout and stderr apart."""
    result = runner.invoke(app, ["diversity", *map(str, args)])
    return result.exit_code, result.stdout, result.stderr


def test_the_table_names_the_embedder_of_either_kind(tmp_path, minilm_embedder):
    _write(tmp_path / "x.jsonl", [{"text": "Is breakfast included?"}, {"text": "Where is the pool?"}])
    code, out, err = _invoke(tmp_path / "x.jsonl")
    assert code == 0, err
    fingerprint = minilm_embedder.fingerprint
    assert out.splitlines()[-1] == f"embedder: {describe_embedder(fingerprint)}"
    assert fingerprint["model"] in out.splitlines()[-1] and fingerprint["backend"] in out.splitlines()[-1]
    code, out, err = _invoke(tmp_path / "x.jsonl", "--embedder", "generator", "--threads", "1")
    assert code == 0, err
    assert out.splitlines()[-1] == "embedder: SmolLM2-135M-Instruct.Q4_1.gguf (llama.cpp embeddings, mean pooling)"


def test_cosine_near_duplicates_count_records_close_to_an_earlier_one():
    e = normalise_rows(np.array([[1, 0, 0], [0, 1, 0], [1, 0.1, 0], [0, 0, 1], [0.2, 1, 0]], dtype=float))
    # row 2 is cos 0.995 with row 0; row 4 is cos 0.98 with row 1; the first of each pair is not counted.
    assert div.cosine_near_duplicate_flags(e, 0.95) == [False, False, True, False, True]
    assert div.cosine_near_duplicate_flags(e, 0.99) == [False, False, True, False, False]


def test_near_duplicate_share_by_embedding_on_a_constructed_file(tmp_path, minilm_embedder):
    distinct = [
        "What time is check-out tomorrow?",
        "Could you recommend a good Italian restaurant nearby?",
        "The air conditioning in room 212 is making a loud noise.",
        "Heavy snow is expected in Denver overnight.",
        "This blender crushes ice in seconds but it is very loud.",
        "Senior backend engineer wanted, fully remote, Python and SQL.",
    ]
    copies = [
        "What time is check-out tomorrow??",  # punctuation only
        "WHAT TIME IS CHECK-OUT TOMORROW?",  # case only (the embedder is uncased)
        "Heavy snow is expected in Denver overnight.",  # exact
    ]
    records = distinct[:3] + copies[:2] + distinct[3:] + copies[2:]
    _write(tmp_path / "d.jsonl", [{"text": t} for t in records])
    code, out, err = _invoke(tmp_path / "d.jsonl", "--json")
    assert code == 0, err
    row = json.loads(out)
    assert row["cosine_near_duplicates"] == pytest.approx(3 / 9)
    assert row["cosine_near"] == 0.95
    flags = div.cosine_near_duplicate_flags(minilm_embedder.embed(records))
    assert flags == [False, False, False, True, True, False, False, False, True]
    table_row = [line for line in _invoke(tmp_path / "d.jsonl")[1].splitlines() if "cosine >= 0.95" in line]
    assert len(table_row) == 1 and table_row[0].split()[-2:] == ["33.3", "%"]


def _reference_rows(*files, reference):
    code, out, err = _invoke(*files, "--reference", reference, "--json")
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()]


def test_reference_similarity_of_a_file_to_itself_is_one_and_beats_another_domain():
    hotel, weather, jobs = REFERENCE / "hotel.jsonl", REFERENCE / "weather.jsonl", REFERENCE / "jobs.jsonl"
    to_hotel = _reference_rows(hotel, weather, jobs, reference=hotel)
    assert to_hotel[0]["reference_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert to_hotel[0]["reference"] == str(hotel)
    assert to_hotel[1]["reference_similarity"] < 0.5 and to_hotel[2]["reference_similarity"] < 0.5
    to_weather = _reference_rows(weather, reference=weather)
    assert to_weather[0]["reference_similarity"] == pytest.approx(1.0, abs=1e-6)
    assert to_hotel[1]["reference_similarity"] < to_weather[0]["reference_similarity"] - 0.4


def test_noise_scores_low_reference_similarity(tmp_path):
    rng = random.Random(3)
    noise = [" ".join("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(12)) for _ in range(25)]
    _write(tmp_path / "noise.jsonl", [{"text": t} for t in noise])
    held_out = [  # on task, not in the reference
        "Excuse me, is there a laundry service, and how long does it take?",
        "Could we get an extra blanket and two more towels sent to room 318?",
        "Is it safe to walk to the old town from here at night?",
        "What time does the restaurant stop serving dinner?",
        "Can I extend my stay by two nights at the same rate?",
        "Is there a safe in the room for our passports?",
    ]
    _write(tmp_path / "guests.jsonl", [{"text": t} for t in held_out])
    noise_row, guests_row = _reference_rows(tmp_path / "noise.jsonl", tmp_path / "guests.jsonl", reference=REFERENCE / "hotel.jsonl")
    # Measured: noise about 0.16, held-out guest questions about 0.35 (MiniLM
    # puts unrelated sentences near 0.1-0.2 and same-topic ones near 0.3-0.6).
    assert noise_row["reference_similarity"] < 0.25
    assert guests_row["reference_similarity"] > noise_row["reference_similarity"] + 0.1
    code, out, _ = _invoke(tmp_path / "noise.jsonl", "--reference", REFERENCE / "hotel.jsonl")
    assert code == 0
    lines = out.splitlines()
    assert lines[-3].startswith("reference similarity (higher = closer to the reference)")
    assert lines[-2] == f"reference: {REFERENCE / 'hotel.jsonl'} (25 records)"


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "reference: no such file: {ref}"),
        ("empty", "reference: {ref} is empty"),
        ("directory", "reference: {ref} is a directory, not a JSONL file"),
        ("binary", "reference: {ref} line 1: not UTF-8 text (--skip-bad skips such lines)"),
        ("not jsonl", "reference: {ref} line 1: not JSON (Expecting value) (--skip-bad skips such lines)"),
        ("not objects", "reference: {ref} line 1: not a JSON object (a list) (--skip-bad skips such lines)"),
        ("no text", "reference: {ref} has no record with text to compare against"),
        ("no string field", "reference: {ref} line 1: no string field to use as text (name one with --field) (--skip-bad skips such lines)"),
        ("no embeddings", "--reference needs embeddings; drop --no-embeddings"),
    ],
)
def test_a_bad_reference_is_one_line_and_exit_2(tmp_path, case, message):
    data = tmp_path / "data.jsonl"
    _write(data, [{"text": "Is breakfast included?"}, {"text": "Where is the gym?"}])
    ref = tmp_path / "ref.jsonl"
    content = {
        "empty": b"\n \n",
        "binary": b"\x1f\x8b\x08\x00\xff\xfe binary",
        "not jsonl": b"question,answer\nhow many?,4\n",
        "not objects": b'["a", "b"]\n',
        "no text": b'{"text": ""}\n{"text": "   "}\n',
        "no string field": b'{"n": 1}\n',
        "no embeddings": b'{"text": "ok"}\n',
    }
    if case == "directory":
        ref.mkdir()
    elif case in content:
        ref.write_bytes(content[case])
    extra = ["--no-embeddings"] if case == "no embeddings" else []
    code, out, err = _invoke(data, "--reference", ref, *extra)
    assert code == 2
    assert err.strip() == f"error: {message.format(ref=ref)}"
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err and out == ""
