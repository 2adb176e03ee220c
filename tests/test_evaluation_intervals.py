"""The bootstrap interval every reported score carries."""

import math

import numpy as np
import pytest

from pipelines.evaluation.intervals import Estimate, bootstrap_mean


def test_interval_of_a_known_proportion_matches_the_normal_approximation():
    """400 items, half right: the 95% interval is p ± 1.96 sqrt(p(1-p)/n) = 0.5 ± 0.049."""
    scores = np.array([1.0, 0.0] * 200)
    estimate = bootstrap_mean(scores, seed=1)
    half_width = 1.96 * math.sqrt(0.25 / 400)
    assert estimate.value == 0.5 and estimate.n == 400
    assert estimate.low == pytest.approx(0.5 - half_width, abs=0.01)
    assert estimate.high == pytest.approx(0.5 + half_width, abs=0.01)


def test_interval_narrows_with_more_items_and_is_reproducible():
    rng = np.random.default_rng(0)
    small, large = rng.random(50), rng.random(2000)
    width = lambda e: e.high - e.low  # noqa: E731
    assert width(bootstrap_mean(large)) < width(bootstrap_mean(small)) / 4
    assert bootstrap_mean(small, seed=3) == bootstrap_mean(small, seed=3)


def test_constant_scores_and_bad_input():
    assert bootstrap_mean([0.7] * 10) == Estimate(0.7, 0.7, 0.7, 10)
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_mean([])
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_mean([1.0], confidence=1.5)


def test_above_means_outside_both_intervals():
    high, low = Estimate(0.6, 0.5, 0.7, 100), Estimate(0.4, 0.3, 0.45, 100)
    assert high.above(low) and not low.above(high)
    assert not Estimate(0.6, 0.44, 0.7, 100).above(low)
