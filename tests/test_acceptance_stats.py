"""Per-position acceptance, the speedup model fed with it, and speedup spreads: exact small cases."""
import random

import pytest

from specdec_lib.costmodel import (accepted_over_proposed, acceptance_from_tau, expected_tokens_from_positions,
                                   expected_tokens_per_step, predicted_speedup)
from specdec_lib.metrics import (StepRecord, format_spread, position_acceptance, request_record, speedup_spread,
                                 summarize)


def test_the_issue_example():
    # independent acceptance 0.83, chains of 8: accepted / proposed is 0.47, E is 4.78
    assert expected_tokens_per_step(0.83, 8) == pytest.approx(4.78, abs=0.005)
    assert accepted_over_proposed(0.83, 8) == pytest.approx(0.47, abs=0.005)
    # the old mistake: feeding 0.47 into the formula gives 1.88
    assert expected_tokens_per_step(0.47, 8) == pytest.approx(1.88, abs=0.005)
    assert acceptance_from_tau(4.78, 8) == pytest.approx(0.83, abs=0.001)
    assert acceptance_from_tau(3.3616, 4) == pytest.approx(0.8, abs=1e-6)
    with pytest.raises(ValueError, match="tau must lie"):
        acceptance_from_tau(6.0, 4)


def test_position_acceptance_exact():
    steps = [StepRecord(4, 4, 5, 0, 0, 0), StepRecord(4, 1, 2, 0, 0, 0), StepRecord(4, 0, 1, 0, 0, 0)]
    assert [s.tried for s in steps] == [4, 2, 1]
    st = position_acceptance(steps)
    assert st["a"] == pytest.approx(5 / 7) and st["accepted_over_proposed"] == pytest.approx(5 / 12)
    assert st["per_position"] == pytest.approx([2 / 3, 1 / 2, 1, 1])
    assert st["tried"] == [3, 2, 1, 1] and st["accepted"] == [2, 1, 1, 1]
    # pairs and dicts work too; a baseline step (nothing proposed) tries nothing
    assert position_acceptance([(4, 4), (4, 1), (4, 0), (0, 0)])["a"] == pytest.approx(5 / 7)
    assert position_acceptance([{"proposed": 4, "accepted": 1}])["per_position"] == [1.0, 0.0, None, None]
    # a tree of 6 nodes, 3 deep, fully accepted: 3 positions tried, not 4
    assert StepRecord(6, 3, 4, 0, 0, 0, draft_depth=3).tried == 3
    # request records and summaries carry it
    r = request_record("x", 0, 10, steps, prefill_s=0.0, wall_s=1.0)
    assert r.tried == 7 and r.position_acceptance == pytest.approx(5 / 7)
    assert r.to_dict()["position_acceptance"] == pytest.approx(5 / 7)
    assert summarize([r, r])["position_acceptance"] == pytest.approx(5 / 7)


def test_estimator_recovers_a_by_simulation():
    rng = random.Random(0)
    a, g = 0.83, 8
    steps = []
    for _ in range(20000):
        k = 0
        while k < g and rng.random() < a:
            k += 1
        steps.append((g, k))
    st = position_acceptance(steps)
    assert st["a"] == pytest.approx(a, abs=0.01)
    assert st["accepted_over_proposed"] == pytest.approx(0.47, abs=0.01)
    assert expected_tokens_per_step(st["a"], g) == pytest.approx(1 + sum(k for _, k in steps) / len(steps), abs=0.05)
    assert expected_tokens_from_positions(st["per_position"]) == pytest.approx(
        1 + sum(k for _, k in steps) / len(steps), abs=1e-9)   # exact identity on the same steps


def test_expected_tokens_from_positions():
    assert expected_tokens_from_positions([0.8] * 4) == pytest.approx(expected_tokens_per_step(0.8, 4))
    assert expected_tokens_from_positions([0.5, 1.0, None]) == pytest.approx(1 + 0.5 + 0.5)
    assert expected_tokens_from_positions([]) == 1.0


def test_predicted_speedup_checks_a():
    flat = {"k": [1, 16], "relative_time": [1.0, 1.0]}
    assert predicted_speedup(0.8, 4, flat) == pytest.approx(3.3616)
    with pytest.raises(ValueError, match="probability"):
        predicted_speedup(1.5, 4, flat)


def test_speedup_spread():
    base = [2.0, 2.0, 2.0, 2.0]
    meth = [1.0, 1.0, 1.0, 1.0]
    s = speedup_spread(base, meth)
    assert (s["speedup"], s["ci_low"], s["ci_high"], s["min"], s["median"], s["max"]) == (2, 2, 2, 2, 2, 2)
    assert not s["inside_noise"] and format_spread(s) == "2.00x (95% CI 2.00-2.00, 4 prompts)"
    # noisy: ratios 0.8 and 1.25 straddle 1
    s = speedup_spread([{"wall_s": 1.0, "new_tokens": 10}, {"wall_s": 1.0, "new_tokens": 10}],
                       [{"wall_s": 1.25, "new_tokens": 10}, {"wall_s": 0.8, "new_tokens": 10}])
    assert s["min"] == pytest.approx(0.8) and s["max"] == pytest.approx(1.25) and s["inside_noise"]
    assert s["speedup"] == pytest.approx(2 / 2.05)
    with pytest.raises(ValueError, match="paired"):
        speedup_spread([1.0], [1.0, 2.0])


def test_drafts_of_different_depths():
    from specdec_lib.costmodel import expected_tokens_over_depths
    assert expected_tokens_over_depths(0.5, {0: 1, 2: 1}) == pytest.approx((1 + 1.75) / 2)
    assert expected_tokens_over_depths([0.5, 0.5], {"0": 1, "2": 1}) == pytest.approx(1.375)
    assert expected_tokens_over_depths(0.8, {4: 3}) == pytest.approx(expected_tokens_per_step(0.8, 4))
    assert expected_tokens_over_depths(0.8, {}) == 1.0
    # n-gram-like steps: no draft half the time; a from the steps themselves predicts tau exactly
    # when acceptance is the same at every position
    st = position_acceptance([(4, 4), (0, 0), (4, 1), (0, 0)])
    assert st["depth_counts"] == {0: 2, 4: 2}
    tau = 1 + (4 + 0 + 1 + 0) / 4
    assert expected_tokens_over_depths(st["per_position"], st["depth_counts"]) == pytest.approx(tau)
