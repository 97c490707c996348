from treesynth.engine.checks import criterion_problem, normalise, usable_values


def test_normalise_ignores_case_spaces_and_punctuation():
    assert normalise("  Problem-Type! ") == normalise("problem type")


def test_repeated_dimension_is_refused_even_in_another_spelling():
    problem = criterion_problem("Topic.", ["a", "b"], used_dimensions=["topic", "setting"])
    assert problem and "already used" in problem


def test_one_distinct_value_is_refused():
    problem = criterion_problem("setting", ["Farm", "farm ", "FARM"], used_dimensions=[])
    assert problem == "fewer than two distinct values"


def test_catch_all_values_are_refused():
    for label in ("Other", "misc.", "General", "N/A", "n/a"):
        problem = criterion_problem("setting", ["farm", label], used_dimensions=[])
        assert problem and "catch-all" in problem, label


def test_combined_values_are_refused():
    for label in ("farm/city", "farm and city", "farm & city"):
        problem = criterion_problem("setting", ["school", label], used_dimensions=[])
        assert problem and "combined" in problem, label


def test_a_good_criterion_passes():
    assert criterion_problem("operation", ["addition", "division", "addition"], used_dimensions=["setting"]) is None


def test_usable_values_keep_first_spelling_and_order():
    assert usable_values(["Addition"], ["addition", " Long  division", "long division", "fractions"], "operation", frozenset(), "") == [
        "Long division",
        "fractions",
    ]


# -- the rules added for data a person would keep -----------------------------------

from treesynth.engine.checks import sample_problem, value_problem, values_problem  # noqa: E402

REVIEWS = frozenset("short product reviews of kitchen appliances".split())


def test_catch_all_and_vague_dimension_names_are_refused():
    for name in ("other", "Type", "category", "misc"):
        problem = criterion_problem(name, ["blender", "toaster"], [], REVIEWS)
        assert problem and "catch-all dimension" in problem, name


def test_format_words_are_refused_unless_the_task_uses_them():
    assert "format" in criterion_problem("JSON", ["compact", "pretty"], [], REVIEWS)
    assert "format" in criterion_problem("tone", ["json", "formal"], [], REVIEWS)
    json_task = frozenset("json documents describing users".split())
    assert criterion_problem("json style", ["compact", "pretty"], [], json_task) is None


def test_values_that_extend_one_another_are_refused():
    assert values_problem(["json", "json json", "other thing"]) == "values 'json' and 'json json' name one group"
    assert values_problem(["calm", "sad", "sadness"]) == "values 'sad' and 'sadness' name one group"
    assert values_problem(["challenge", "challenging", "easy"]) == "values 'challenge' and 'challenging' name one group"
    assert values_problem(["relaxing", "relaxation"]) == "values 'relaxing' and 'relaxation' name one group"
    assert values_problem(["serves one", "serves two"]) is None
    assert values_problem(["blender", "toaster", "kettle"]) is None


def test_a_value_repeating_its_dimension_is_refused():
    assert "repeats the dimension" in value_problem("tone 2", "tone", REVIEWS, "")
    assert value_problem("warm", "tone", REVIEWS, "") is None


def test_a_value_copied_from_the_prompt_is_refused():
    echo = "name one property in one to three words that sorts them into clear groups"
    assert "echoes" in value_problem("clear groups", "kind of review", REVIEWS, echo)
    assert value_problem("blender", "appliance", REVIEWS, echo) is None


def test_usable_values_filter_and_deduplicate_coverage_answers():
    kept = usable_values(["blender"], ["Blender", "blender pro", "toaster", "other", "rice cooker", "toaster"], "appliance", REVIEWS, "")
    assert kept == ["toaster", "rice cooker"]


def test_sample_debris_is_caught_and_plain_text_passes():
    assert sample_problem("Hello, this is {json_string} - {value_type}", REVIEWS) == "template placeholder"
    assert sample_problem('Review: "rating": 5, "text": great', REVIEWS) == "speaks in JSON keys"
    assert sample_problem("This JSON blender review is great and the blender works", REVIEWS) == "speaks of the format (json)"
    assert sample_problem("11.2.2.332339385275089128933989511111111111", REVIEWS) == "mostly digits or symbols"
    assert sample_problem("good good good good blender", REVIEWS) == "repeats 'good'"
    assert sample_problem("My new blender crushes ice in seconds, but it is loud.", REVIEWS) is None


def test_code_and_latex_tasks_keep_their_braces():
    code = frozenset("python functions with tests".split())
    assert sample_problem('def greet(name):\n    return f"Hello {name}"', code) is None
    latex = frozenset("competition problems with latex notation".split())
    assert sample_problem(r"Find $x$ if $\frac{x}{2} = 3$.", latex) is None


def test_bracket_placeholders_and_copied_properties_are_debris():
    assert sample_problem("This [product] has a top-notch [feature].", REVIEWS) == "template placeholder"
    assert sample_problem("Product: 'Food', Mood: sad and tired of it all", REVIEWS, ["product", "mood"]) == "repeats the prompt's properties"


def test_a_value_already_on_the_path_is_refused():
    from treesynth.engine.checks import path_value_problem

    path = [["product", "Food"], ["mood", ["calm", "tense"]]]
    assert path_value_problem(["drinks", "food"], path) == "value 'food' is already on the path"
    assert path_value_problem(["Tense"], path) == "value 'Tense' is already on the path"
    assert path_value_problem(["drinks"], path) is None
    # A value that names a dimension (on the path, or a facet name) is no group.
    assert path_value_problem(["sales", "Mood"], path) == "value 'Mood' names a dimension, not a group"
    assert path_value_problem(["moods"], [["level", "easy"]]) == "value 'moods' names a dimension, not a group"
    assert path_value_problem(["products"], path) == "value 'products' names a dimension, not a group"
    assert path_value_problem(["bad mood", "topical"], path) is None


def test_values_and_dimensions_made_only_of_the_task_words_split_nothing():
    math = frozenset("gsm8k style grade school math word problems".split())
    assert "only repeats the task" in value_problem("Math word problem", "setting", math, "")
    assert "only repeats the task" in criterion_problem("math problems", ["farm", "shop"], [], math)
    assert value_problem("bakery", "setting", math, "") is None


def test_a_word_has_at_most_two_hyphens_and_never_mixes_letters_and_digits():
    import re

    from treesynth.engine.schemas import DIMENSION_PATTERN, VALUE_PATTERN

    for good in ("x-ray", "well-to-do", "rice cooker", "2 steps", "don't"):
        assert re.match(VALUE_PATTERN, good), good
    for bad in ("Math-B-Tech-A-B-C-E-", "forecast5", "1.5", "json.JSON", "{value}", "a/b", "[1],"):
        assert not re.match(VALUE_PATTERN, bad), bad
    assert not re.match(DIMENSION_PATTERN, "3 days")


def test_a_sample_in_another_script_than_the_task_is_dropped():
    from treesynth.engine.checks import sample_problem

    math = frozenset({"grade", "school", "math", "word", "problems"})
    russian = "Турисиамная работа на магазине весла в последних работ, которые будет уметь с наследием."
    assert sample_problem(russian, math) == "written in another script than the task"
    # Latin letters with accents are Latin; a few foreign words in an English text pass.
    assert sample_problem("Café owners in São Paulo sell 12 pastries an hour. How many in 3 hours?", math) is None
    assert sample_problem("Mia learns that 'спасибо' means thank you; she says it to 3 friends each day.", math) is None
    # A task written in Cyrillic may have Cyrillic samples.
    assert sample_problem(russian, frozenset({"задачи", "по", "математике"})) is None


def test_a_sample_that_repeats_itself_is_dropped():
    from treesynth.engine.checks import sample_problem

    math = frozenset({"grade", "school", "math", "word", "problems"})
    assert sample_problem("GEMEMMEMEMBERE-YAHUSHEBEMMEMEMEMBERE-YAHUSHEBEMBEMEMBERE-" + "YAHUSHEBEMBEMBEMBEMBEM" * 12, math) == "repeats itself"
    plain = "Avery buys 3 boxes of crayons with 24 crayons in each box. She gives 17 crayons to her brother. How many are left?"
    assert sample_problem(plain, math) is None
    assert sample_problem("Short, and repeats: ab ab ab.", math) is None  # under 100 bytes: too short to judge


def test_the_sample_schema_validator_imports_jsonschema_only_at_the_first_sample():
    """A run process that only replays stored calls or builds nodes never pays
    for importing jsonschema (0.1-0.2 s); the first sample checked still is."""
    import subprocess
    import sys

    script = """
import sys
from treesynth.engine.checks import SampleSchemaValidator, schema_problem
from treesynth.engine.config import DEFAULT_SAMPLE_SCHEMA
validator = SampleSchemaValidator(DEFAULT_SAMPLE_SCHEMA)
print("jsonschema" in sys.modules)
print(schema_problem(validator, {"text": "Ann has three apples and eats one. How many are left?"}))
print(schema_problem(validator, {"text": "Ann has three apples.", "extra": 1}))
print("jsonschema" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "False",
        "None",
        "does not match the sample schema (the sample: additionalProperties)",
        "True",
    ]
