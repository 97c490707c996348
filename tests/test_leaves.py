"""Leaf targets, request limits and top-ups: pure functions, exact by construction."""

from treesynth.engine.leaves import equal_targets, plan_leaves, request_limit, topup_extras


def test_samples_are_spread_equally_remainder_to_the_first_leaves():
    assert equal_targets(4, 10) == [3, 3, 2, 2]
    assert equal_targets(3, 2) == [1, 1, 0]
    assert sum(equal_targets(7, 30)) == 30
    assert equal_targets(0, 5) == []


def test_request_limit_allows_top_ups_and_one_spare():
    assert request_limit(3, 1, 2.0) == 7
    assert request_limit(10, 4, 2.0) == 6
    assert request_limit(0, 1, 2.0) == 0


def test_top_up_goes_to_the_leaves_with_the_fewest_samples_first():
    assert topup_extras(kept=[3, 1, 2], shortfall=2) == [0, 1, 1]
    assert topup_extras(kept=[0, 0], shortfall=3) == [2, 1]
    assert sum(topup_extras(kept=[5, 0, 2, 9], shortfall=11)) == 11


def test_plan_still_scales_to_max_samples():
    plans = plan_leaves([0, 1], leaf_samples=3, infinite_samples=2, max_samples=6)
    assert [sum(p) for p in plans] == [2, 4]
