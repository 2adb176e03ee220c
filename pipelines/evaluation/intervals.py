"""Scores with their uncertainty: the mean of per-item scores and its 95% percentile-bootstrap interval.

Every metric the evaluation reports is a mean over evaluated items (CIDEr-D included: the mean of its
per-image scores), so one resampling scheme serves all of them: draw the items with replacement
``resamples`` times, take the mean of each draw, and read the interval off the draws' percentiles.
Seeded, so a report is reproducible.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    """A mean over ``n`` items with its bootstrap interval ``[low, high]`` at ``confidence``."""

    value: float
    low: float
    high: float
    n: int
    confidence: float = CONFIDENCE

    def __str__(self) -> str:
        return f"{self.value:.3f} [{self.low:.3f}, {self.high:.3f}]"

    def above(self, other: "Estimate") -> bool:
        """Whether this interval lies wholly above ``other``'s (a difference outside both intervals)."""
        return self.low > other.high


def bootstrap_mean(scores: Sequence[float], *, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                   seed: int = 0) -> Estimate:
    """The mean of ``scores`` and its percentile-bootstrap interval.

    Raises ``ValueError`` for no scores; one score gives a zero-width interval.
    """
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"bootstrap_mean needs a non-empty 1-D sequence of scores, got shape {values.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Estimate(float(values.mean()), float(low), float(high), int(values.size), confidence)
