"""The deduplicated_documents stage: every filtered shard's documents deduplicated against all the others
(:mod:`pipelines.data.dedup`: image URLs, then the downloaded images' sha256 and perceptual hash), in a stable order
of shards and sources so that every run keeps the same first occurrence.

Dedup is whole-corpus: a shard's result depends on every shard before it, so the stage takes all partitions and
writes into a folder named by the fingerprint of its settings and inputs::

    deduplicated_documents/<fingerprint>/<source>/<shard>.parquet          the kept documents
    deduplicated_documents/<fingerprint>/<source>/<shard>.drops.parquet    every drop: rule and reason
    deduplicated_documents/<fingerprint>/<source>/<shard>.hashes.parquet   every kept image: key, url, sha256, pHash
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.dedup import DedupConfig, DedupIndex, ImageHash, dedup_documents, shard_order
from pipelines.data.documents import image_elements, read_documents, write_documents
from pipelines.data.downloaded_images import DownloadedShard
from pipelines.data.filtered_documents import FilteredShard
from pipelines.data.filtering import DROPS_SCHEMA, Drop
from pipelines.data.layout import DataLayout
from pipelines.files import atomic_path, fingerprint

logger = logging.getLogger(__name__)

HASHES_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False), pa.field("key", pa.string()),
    pa.field("url", pa.string(), nullable=False), pa.field("sha256", pa.string()), pa.field("phash", pa.string()),
])


@dataclass
class DocumentCounts:
    """Documents and image elements into and out of a stage that drops them."""

    documents_in: int = 0
    documents_kept: int = 0
    images_in: int = 0
    images_kept: int = 0

    def counted(self, documents: Iterable[dict[str, Any]], side: str) -> Iterator[dict[str, Any]]:
        """``documents`` unchanged, counted as the stage's input (``side="in"``) or output (``"kept"``)."""
        for document in documents:
            setattr(self, f"documents_{side}", getattr(self, f"documents_{side}") + 1)
            setattr(self, f"images_{side}", getattr(self, f"images_{side}") + len(image_elements(document)))
            yield document

    def add(self, other: DocumentCounts) -> None:
        for name in ("documents_in", "documents_kept", "images_in", "images_kept"):
            setattr(self, name, getattr(self, name) + getattr(other, name))


def write_drops(drops: list[Drop], path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist([asdict(d) for d in drops], schema=DROPS_SCHEMA), tmp)


@dataclass(frozen=True)
class DeduplicatedDocuments:
    """The corpus deduplicated: per partition its kept documents, drops and image hashes, and the run's counts."""

    version: str
    """The fingerprint of the settings and the inputs, which names the output folder."""
    shards: dict[str, FilteredShard]
    """Per partition: the kept documents (``path``), every drop with its rule and reason (``drops``), the filter's
    thresholds (carried on for the packed shards' lineage) and the counts in and out."""
    hashes: dict[str, str]
    """Per partition: a parquet (:data:`HASHES_SCHEMA`) of every kept image's sha256 and perceptual hash."""
    config: DedupConfig
    order: list[str]
    """The partitions in the order they were deduplicated (the first occurrence of a duplicate wins)."""
    drops_by_rule: dict[str, int] = field(default_factory=dict)
    counts: DocumentCounts = field(default_factory=DocumentCounts)
    seconds: float = 0.0

    @property
    def dedup_rate(self) -> float:
        """Share of the images dropped as duplicates."""
        return 1 - self.counts.images_kept / self.counts.images_in if self.counts.images_in else 0.0

    def lineage(self) -> dict[str, Any]:
        """What the packed shards' index records of this stage."""
        return {"config": asdict(self.config), "order": self.order, "drops_by_rule": self.drops_by_rule,
                **asdict(self.counts), "drops": {k: m.drops for k, m in self.shards.items()}}


def dedup_shards(filtered: Mapping[str, FilteredShard], downloads: Mapping[str, DownloadedShard], config: DedupConfig,
                 layout: DataLayout, log: Callable[[str], None] = logger.info) -> DeduplicatedDocuments:
    """Deduplicate the filtered documents of every shard against each other (in :func:`shard_order`), reading the
    images' bytes from the shards' downloads, into ``deduplicated_documents/<fingerprint>/``."""
    order = shard_order(filtered, config.source_priority)
    version = fingerprint(asdict(config), [(k, asdict(filtered[k]), downloads[k].shards) for k in order])
    index = DedupIndex(config)
    shards: dict[str, FilteredShard] = {}
    hashes_paths: dict[str, str] = {}
    total = DocumentCounts()
    rules: Counter[str] = Counter()
    start = time.perf_counter()
    for key in order:
        drops: list[Drop] = []
        hashes: list[ImageHash] = []
        counts = DocumentCounts()
        out = layout.partition_path(f"deduplicated_documents/{version}", key, ".parquet")
        kept = dedup_documents(counts.counted(read_documents(filtered[key].path), "in"), index, drops.append,
                               images=downloads[key].image_bytes(), on_hash=hashes.append)
        write_documents(counts.counted(kept, "kept"), out)
        drops_path, hashes_path = (out.with_name(out.name.replace(".parquet", suffix))
                                   for suffix in (".drops.parquet", ".hashes.parquet"))
        write_drops(drops, drops_path)
        with atomic_path(hashes_path) as tmp:
            pq.write_table(pa.Table.from_pylist([asdict(h) for h in hashes], schema=HASHES_SCHEMA), tmp)
        shards[key] = FilteredShard(str(out), str(drops_path), filtered[key].thresholds, counts.documents_in,
                                    counts.documents_kept, counts.images_in, counts.images_kept)
        hashes_paths[key] = str(hashes_path)
        total.add(counts)
        shard_rules = Counter(d.rule for d in drops)
        rules.update(shard_rules)
        log(f"{key}: kept {counts.images_kept} of {counts.images_in} images, {counts.documents_kept} of "
            f"{counts.documents_in} documents {dict(shard_rules)}")
    return DeduplicatedDocuments(version, shards, hashes_paths, config, order, dict(rules), total,
                                 time.perf_counter() - start)
