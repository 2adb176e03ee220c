"""Summing a stage's per-partition counts into the run's totals."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

T = TypeVar("T")


def add_counts(total: T, part: T) -> T:
    """Add ``part``'s number fields to ``total``'s and extend ``total``'s list fields with ``part``'s (other fields
    keep ``total``'s value); returns ``total``. Both are instances of the same dataclass."""
    for field in dataclasses.fields(total):
        value = getattr(part, field.name)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            setattr(total, field.name, getattr(total, field.name) + value)
        elif isinstance(value, list):
            getattr(total, field.name).extend(value)
    return total
