"""Error policies for stages: a stage reports each bad record to an injected ``handler``.

Like webdataset's handlers, a handler decides what happens: raise to stop the stage, or return to
skip the record and go on. ``BadRecordLog`` counts and keeps what it saw so a caller (or a Dagster
asset) can report exact numbers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

logger = logging.getLogger("weft.pipelines")


@dataclass(frozen=True)
class BadRecord:
    """A record a stage skipped. ``line`` is 1-based for text files, the 0-based row for parquet."""

    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


class BadRecordError(ValueError):
    def __init__(self, record: BadRecord):
        super().__init__(str(record))
        self.record = record


class ShardError(ValueError):
    """A whole input shard that cannot be read (not a zip, a truncated parquet, no document in it): the file and
    the cause. Bad records are the handler's; a bad shard is isolated by the stage that reads it."""

    def __init__(self, file: str, cause: str):
        super().__init__(f"{file}: {cause}")
        self.file = file
        self.cause = cause


@dataclass(frozen=True)
class ShardFailure:
    """A partition a stage could not produce: the file that failed and why. The stage's other partitions go on; this
    one is quarantined (it has no output, and the stages after it leave it out) until it is read again."""

    file: str
    cause: str
    stage: str
    """The stage that failed it (the stages after it pass the same failure on)."""

    def __str__(self) -> str:
        return f"{self.file}: {self.cause}"


Handler = Callable[[BadRecord], None]


def reraise(record: BadRecord) -> None:
    """Stop at the first bad record."""
    raise BadRecordError(record)


def warn_and_continue(record: BadRecord) -> None:
    """Log the bad record and skip it (the default)."""
    logger.warning("skipped %s", record)


@dataclass
class BadRecordLog:
    """Counts every bad record and keeps the first ``keep`` of them (bounded memory)."""

    keep: int = 10_000
    count: int = 0
    records: list[BadRecord] = field(default_factory=list)
    also: Handler | None = None

    def __call__(self, record: BadRecord) -> None:
        self.count += 1
        if len(self.records) < self.keep:
            self.records.append(record)
        if self.also is not None:
            self.also(record)

    def reasons(self) -> list[str]:
        return [str(r) for r in self.records]
