from treesynth.engine.checks import criterion_problem, dedupe_values, normalise


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


def test_dedupe_values_keeps_first_spelling_and_order():
    assert dedupe_values(["Addition"], ["addition", " Long  division", "long division", "fractions"]) == [
        "Long division",
        "fractions",
    ]
