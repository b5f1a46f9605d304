"""Closed-loop success: the Wilson interval equals scipy's, an expert's perfect record and a random
policy's record aggregate as they should, and bad input is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from megatron_cosmos3.evaluation.closed_loop import Episode, SuccessRate, wilson_interval


@pytest.mark.parametrize(("successes", "trials"), [(0, 10), (3, 10), (10, 10), (1, 1), (57, 200)])
@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_wilson_interval_equals_scipy(successes, trials, confidence):
    expected = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    np.testing.assert_allclose(
        wilson_interval(successes, trials, confidence), (expected.low, expected.high), atol=1e-12
    )


def test_oracle_is_perfect_and_random_is_near_its_rate():
    expert = SuccessRate.of([Episode(seed, True) for seed in range(20)])
    assert (expert.rate, expert.high) == (1.0, 1.0) and expert.low > 0.8
    rng = np.random.default_rng(0)
    coin = SuccessRate.of([Episode(seed, bool(rng.random() < 0.3)) for seed in range(400)])
    assert coin.low < 0.3 < coin.high and coin.high - coin.low < 0.1
    never = SuccessRate.of([Episode(seed, False) for seed in range(20)])
    assert never.rate == 0.0 and never.low == 0.0 and never.high > 0.1  # 0 of 20 does not prove 0


def test_bad_input_is_refused_by_name():
    with pytest.raises(ValueError, match="episodes is empty"):
        SuccessRate.of([])
    with pytest.raises(ValueError, match=r"episodes repeat seeds \[3\]"):
        SuccessRate.of([Episode(3, True), Episode(3, False)])
    with pytest.raises(ValueError, match="successes must be an integer in \\[0, trials=4\\], got 5"):
        wilson_interval(5, 4)
    with pytest.raises(ValueError, match="trials must be a positive integer, got 0"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="confidence must be in \\(0, 1\\), got 1.5"):
        wilson_interval(1, 2, 1.5)


def test_a_failed_episode_counts_as_no_success_and_is_counted_apart():
    """A failed episode (its policy gave NaN actions) is no success and is counted as failed; it
    cannot also have succeeded."""
    episodes = [Episode(0, True, 40), Episode(1, False, 40), Episode(2, False, 8, "round 1: NaN actions")]
    rate = SuccessRate.of(episodes)
    assert (rate.successes, rate.episodes, rate.failed, rate.rate) == (1, 3, 1, 1 / 3)
    assert SuccessRate.of(episodes[:2]).failed == 0  # control: an unsuccessful episode is no failed one
    with pytest.raises(ValueError, match=r"episode 4: failed \(round 0: NaN actions\) and succeeded"):
        Episode(4, True, 0, "round 0: NaN actions")
