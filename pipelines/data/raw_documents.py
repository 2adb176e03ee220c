"""The raw_documents stage: each raw metadata shard read into the normalized document schema (one parquet a shard)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.data.documents import image_elements, write_documents
from pipelines.data.errors import BadRecordLog
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


@dataclass
class RawDocuments:
    """A run of the stage: per partition key its :class:`RawShard`, and the run's totals."""

    shards: dict[str, RawShard]
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
    """Read the raw shards of partition ``keys`` (MMC4 jsonl/jsonl.zip, LAION parquet, CC-12M tsv) into
    ``raw_documents/<source>/<shard>.parquet``; every bad record is counted with its reason."""
    result = RawDocuments({})
    start = time.perf_counter()
    for key in keys:
        source_file = layout.raw_file(key)
        bad = BadRecordLog(keep=20)
        kinds: Counter[str] = Counter()
        images = 0

        def counted(documents: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
            nonlocal images
            for document in documents:
                kinds[document["kind"]] += 1
                images += len(image_elements(document))
                yield document

        out = layout.partition_path("raw_documents", key, ".parquet")
        count = write_documents(counted(read_source(source_file, bad)), out)
        result.shards[key] = RawShard(str(out), str(source_file), sha256(source_file), count, bad.count, images,
                                      dict(kinds))
        result.bad_examples += bad.reasons()
        log(f"{key}: {count} documents, {bad.count} bad records")
    result.seconds = time.perf_counter() - start
    return result
