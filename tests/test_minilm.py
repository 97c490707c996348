"""The numpy all-MiniLM-L6-v2 against numbers from the reference.

The expected token ids and embedding values below were recorded from
sentence-transformers 6.2.0 (torch 2.13.0 CPU, transformers 5.24, tokenizers
0.23.3) loading the same package directory with HF_HUB_OFFLINE=1:
``model.tokenizer(text, truncation=True, max_length=256)["input_ids"]`` and
``model.encode(texts)[:, :5]``."""

from __future__ import annotations

import hashlib
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from treesynth.models.base import ModelError
from treesynth.models.minilm import (
    CHECKSUMS,
    CONFIG_FILES,
    DIGESTS,
    PACKAGE,
    MiniLMEmbedder,
    gelu,
    load_minilm,
    package_directory,
    single_threaded_blas,
)

REFERENCE_IDS = [
    ("", [101, 102]),
    (
        "Hello, world! It's 3.14159 o'clock.",
        [101, 7592, 1010, 2088, 999, 2009, 1005, 1055, 1017, 1012, 15471, 28154, 1051, 1005, 5119, 1012, 102],
    ),
    (  # accents stripped; İ decomposed; a final capital sigma lowercased to σ, not ς
        "Café naïve résumé ÅNGSTRÖM straße İstanbul ΟΔΟΣ",
        [101, 7668, 15743, 13746, 17076, 15687, 2358, 27807, 9960, 1169, 29722, 29730, 29733, 102],
    ),
    (  # ideographs one by one; Hangul decomposed into jamo by NFD
        "中文测试：我爱北京。한국어 日本語",
        [101, 1746, 1861, 100, 100, 1993, 1855, 100, 1781, 1755, 1636, 1469, 30006, 30021, 29991, 30014, 30020, 29999]
        + [30008, 1864, 1876, 1950, 102],
    ),
    (  # special tokens matched verbatim before normalisation; odd whitespace; zero-width and control characters dropped
        "x[SEP]y [cls] [MASK]\u00a0tab\tnew\nline\u200bzero\x07bell",
        [101, 1060, 102, 1061, 1031, 18856, 2015, 1033, 103, 21628, 2047, 2240, 6290, 20891, 3363, 102],
    ),
    (  # unassigned U+0378 and post-Unicode-8.0 U+07FD are [UNK], not dropped; U+2B820 is not spaced out as CJK
        "emoji 😀👍🏽 \u0378 \u07fd x\U0002b820 x\U0002b920 ﬁ ½",
        [101, 7861, 29147, 2072, 100, 100, 100, 100, 1060, 100, 1984, 1092, 102],
    ),
    ("a" * 101 + " " + "b" * 100, [101, 100, 22861] + [10322] * 49 + [102]),  # over 100 characters: [UNK]
    (
        '{"key": [1, 2.5e-3, null], "$x": "<tag/>"}',
        [101, 1063, 1000, 3145, 1000, 1024, 1031, 1015, 1010, 1016, 1012, 1019, 2063, 1011, 1017, 1010, 19701, 1033]
        + [1010, 1000, 1002, 1060, 1000, 1024, 1000, 1026, 6415, 1013, 1028, 1000, 1065, 102],
    ),
]

REFERENCE_EMBEDDINGS = [
    ("A man is eating food.", [0.03324156, 0.00440608, -0.00627702, 0.04837874, -0.13870224]),
    ("The quick brown fox jumps over the lazy dog.", [0.04393357, 0.05893442, 0.04817836, 0.07754813, 0.02674444]),
]


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    return load_minilm()


@pytest.mark.parametrize("text, expected", REFERENCE_IDS)
def test_token_ids_match_the_reference_tokenizer(embedder: MiniLMEmbedder, text: str, expected: list[int]) -> None:
    assert embedder.token_ids(text) == expected


def test_embeddings_match_the_reference(embedder: MiniLMEmbedder) -> None:
    vectors = embedder.embed([text for text, _ in REFERENCE_EMBEDDINGS])
    expected = np.array([values for _, values in REFERENCE_EMBEDDINGS])
    np.testing.assert_allclose(vectors[:, :5], expected, atol=1e-4)


def test_rows_are_unit_float64_and_an_empty_text_embeds(embedder: MiniLMEmbedder) -> None:
    vectors = embedder.embed(["", "one text", "another text"])
    assert vectors.shape == (3, 384) and vectors.dtype == np.float64
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-12)
    assert embedder.embed([]).shape == (0, 384)
    with pytest.raises(TypeError):
        embedder.embed("a str is not a list of texts")


def test_paraphrases_score_higher_than_unrelated_sentences(embedder: MiniLMEmbedder) -> None:
    a, paraphrase, unrelated = embedder.embed(
        [
            "A man is eating a piece of bread.",
            "Someone is having some bread to eat.",
            "The stock market fell sharply on Monday.",
        ]
    )
    assert a @ paraphrase > 0.6
    assert a @ paraphrase > a @ unrelated + 0.3


def test_a_vector_does_not_depend_on_the_other_texts(embedder: MiniLMEmbedder) -> None:
    texts = ["short", "a somewhat longer sentence about trees and rivers", "", "¿Qué tal? 中文", "word " * 40]
    together = embedder.embed(texts)
    reversed_order = embedder.embed(texts[::-1])[::-1]
    for i, text in enumerate(texts):
        alone = embedder.embed([text])[0]
        assert np.array_equal(alone, together[i])  # bit-identical, not merely close
        assert np.array_equal(alone, reversed_order[i])


def test_long_texts_are_cut_at_256_tokens(embedder: MiniLMEmbedder) -> None:
    ids = embedder.token_ids("word " * 300)
    assert len(ids) == 256
    assert ids[0] == 101 and ids[-1] == 102 and ids[-2] == 2773
    assert len(embedder.token_ids("word " * 254)) == 256 and len(embedder.token_ids("word " * 253)) == 255
    # Words past the cut change nothing.
    cut, longer = embedder.embed(["word " * 254, "word " * 254 + "entirely different ending " * 50])
    assert np.array_equal(cut, longer)


def test_fingerprint(embedder: MiniLMEmbedder) -> None:
    assert embedder.fingerprint == {
        "backend": "numpy",
        "model": "all-MiniLM-L6-v2",
        "file_hash": "sha256:53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        "max_tokens": 256,
        "dims": 384,
    }


def test_the_installed_files_have_the_published_sha256_and_the_checked_digests() -> None:
    """A load checks the files' xxh3-128 (fast); the fingerprint names the
    weights by their sha256: both must be digests of the same installed bytes."""
    from treesynth.models.base import file_hash

    assert DIGESTS.keys() == CHECKSUMS.keys()
    for name, sha256 in CHECKSUMS.items():
        path = package_directory() / name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == sha256, name
        assert file_hash(path) == DIGESTS[name], name


def test_load_is_cached_and_the_package_is_never_imported(embedder: MiniLMEmbedder) -> None:
    assert load_minilm() is embedder
    assert PACKAGE not in sys.modules


def test_gelu_is_exact_to_float64_rounding() -> None:
    x = np.linspace(-12, 12, 20001)
    exact = np.array([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in x])
    assert np.abs(gelu(x) - exact).max() < 1e-14
    x32 = x.astype(np.float32)
    assert np.array_equal(gelu(x32), np.array([v * 0.5 * math.erfc(-v / math.sqrt(2)) for v in x32.tolist()], dtype=np.float32))


def _copy_model(target: Path, *, real: tuple[str, ...] = ()) -> Path:
    """The model's files under target: symlinks, except the names in real, which are copied."""
    source = package_directory()
    for name in (*DIGESTS, *CONFIG_FILES):
        (target / name).parent.mkdir(parents=True, exist_ok=True)
        if name in real:
            shutil.copyfile(source / name, target / name)
        else:
            (target / name).symlink_to(source / name)
    return target


def test_an_explicit_directory_gives_the_same_vectors(embedder: MiniLMEmbedder, tmp_path: Path) -> None:
    copy = MiniLMEmbedder(_copy_model(tmp_path))
    text = ["The quick brown fox jumps over the lazy dog."]
    assert np.array_equal(copy.embed(text), embedder.embed(text))


def test_a_corrupted_model_file_fails_its_checksum(tmp_path: Path) -> None:
    directory = _copy_model(tmp_path, real=("model.safetensors",))
    with open(directory / "model.safetensors", "r+b") as f:
        f.seek(20_000_000)
        byte = f.read(1)
        f.seek(20_000_000)
        f.write(bytes([byte[0] ^ 0x01]))
    with pytest.raises(ModelError) as error:
        MiniLMEmbedder(directory)
    message = str(error.value)
    assert "checksum" in message and "model.safetensors" in message and "\n" not in message


def test_a_missing_directory_or_file_is_a_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found") as error:
        MiniLMEmbedder(tmp_path / "nowhere")
    assert "\n" not in str(error.value)
    directory = _copy_model(tmp_path / "partial")
    (directory / "vocab.txt").unlink()
    with pytest.raises(ModelError, match="missing .*vocab.txt"):
        MiniLMEmbedder(directory)


def test_blas_is_pinned_to_one_thread_while_embedding() -> None:
    # Without it vectors depend on the core count (OpenBLAS rounds differently on 1 and 2 threads).
    with single_threaded_blas() as pinned:
        assert pinned, "numpy's BLAS offers no openblas_set_num_threads_local: vectors may depend on the core count"
