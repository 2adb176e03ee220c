"""The raw_documents stage: each raw metadata shard read into the normalized document schema (one parquet a shard).

Shards are read one by one and isolated from each other: a shard that cannot be read as a whole (not a zip, a
truncated parquet, an unreadable file) becomes a :class:`pipelines.data.errors.ShardFailure` naming the file and the
cause, nothing of it is written (the output lands whole or not at all), and the other shards go on."""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.data.documents import image_elements, write_documents
from pipelines.data.errors import BadRecordLog, ShardError, ShardFailure
from pipelines.data.layout import DataLayout
from pipelines.data.readers import read_source
from pipelines.files import fingerprint, sha256

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RawShard:
    """One raw shard read: its documents' parquet and what reading it found."""

    path: str
    source_file: str
    source_sha256: str
    documents: int
    bad_records: int
    """Records the reader skipped (each with its file:line and reason)."""
    images: int
    kinds: dict[str, int]
    """Documents per kind (``interleaved``, ``pair``)."""
    skipped_images: int = 0
    """Images the reader left out of their documents (an unusable URL; the reason is in the document's meta)."""


@dataclass
class RawDocuments:
    """A run of the stage: per partition key its :class:`RawShard`, and the run's totals."""

    shards: dict[str, RawShard]
    failures: dict[str, ShardFailure] = field(default_factory=dict)
    """The shards that could not be read, by partition key."""
    bad_examples: list[str] = field(default_factory=list)
    """The first bad records, as ``file:line: reason``."""
    seconds: float = 0.0

    @property
    def version(self) -> str:
        return fingerprint({k: m.source_sha256 for k, m in self.shards.items()})

    @property
    def documents(self) -> int:
        return sum(m.documents for m in self.shards.values())


def parse_rate(shards: Mapping[str, RawShard]) -> float:
    """Share of the shards' records that parsed into documents."""
    documents = sum(m.documents for m in shards.values())
    return documents / max(1, documents + sum(m.bad_records for m in shards.values()))


def read_raw_shards(keys: Sequence[str], layout: DataLayout, log: Callable[[str], None] = logger.info) -> RawDocuments:
    """Read the raw shards of partition ``keys`` (each by the reader of its source folder,
    :func:`pipelines.data.readers.read_source`) into ``raw_documents/<source>/<shard>.parquet``; every bad record is
    counted with its reason, and a shard that cannot be read goes to :attr:`RawDocuments.failures` instead."""
    result = RawDocuments({})
    start = time.perf_counter()
    for key in keys:
        bad = BadRecordLog(keep=20)
        try:
            result.shards[key] = read_raw_shard(key, layout, bad)
        except (ShardError, OSError) as error:
            failure = _failure(error, layout.raw_file(key).name)
            result.failures[key] = failure
            log(f"{key}: not read, {failure}")
            continue
        result.bad_examples += bad.reasons()
        log(f"{key}: {result.shards[key].documents} documents, {bad.count} bad records")
    result.seconds = time.perf_counter() - start
    return result


def _failure(error: ShardError | OSError, name: str) -> ShardFailure:
    if isinstance(error, ShardError):
        return ShardFailure(error.file, error.cause, "raw_documents")
    return ShardFailure(name, f"{type(error).__name__}: {error.strerror or error}", "raw_documents")


def read_raw_shard(key: str, layout: DataLayout, bad: BadRecordLog) -> RawShard:
    """One raw shard's documents into its parquet (written whole or not at all). Raises
    :class:`pipelines.data.errors.ShardError` (or ``OSError``) when the shard cannot be read."""
    source_file = layout.raw_file(key)
    kinds: Counter[str] = Counter()
    images = skipped = 0

    def counted(documents: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        nonlocal images, skipped
        for document in documents:
            kinds[document["kind"]] += 1
            images += len(image_elements(document))
            if '"skipped_images"' in document["meta"]:
                skipped += len(json.loads(document["meta"]).get("skipped_images", ()))
            yield document

    out = layout.partition_path("raw_documents", key, ".parquet")
    count = write_documents(counted(read_source(source_file, bad, source=key.partition("/")[0])), out)
    return RawShard(str(out), str(source_file), sha256(source_file), count, bad.count, images, dict(kinds), skipped)
