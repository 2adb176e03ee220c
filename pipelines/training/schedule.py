"""The learning-rate schedule: a pure function of the step (multiplies each group's base lr)."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "constant")


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, schedule: str = "cosine", min_ratio: float = 0.0) -> float:
    """Factor applied to the base learning rates for optimizer step ``step`` (0-based).

    Linear warmup from ``1 / warmup_steps`` to 1 over the first ``warmup_steps`` steps, then
    ``constant`` (1) or ``cosine`` decay from 1 to ``min_ratio`` at ``max_steps``; steps past
    ``max_steps`` stay at the final value.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
