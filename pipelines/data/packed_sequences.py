"""The packed_sequences stage: every filtered shard's documents tokenized and packed (:mod:`pipelines.data.packing`)
into WebDataset tars with an index (:mod:`pipelines.data.shards`).

The output folder is named by the fingerprint of everything the sequences depend on (packing settings, tokenizer,
filtered documents and their thresholds, recaptions), so an interrupted run resumes and changed inputs never mix
with old shards; the same record is the shard index's ``meta``, the lineage training and evaluation report.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.data.documents import read_documents
from pipelines.data.downloaded_images import DownloadedShard
from pipelines.data.errors import BadRecordLog
from pipelines.data.filtered_documents import FilteredShard
from pipelines.data.layout import DataLayout
from pipelines.data.packing import ROW_FORMAT, PackingConfig, PackingStats, pack_documents
from pipelines.data.recaptions import RecaptionedShard
from pipelines.data.shards import write_shards
from pipelines.data.stats import add_counts
from pipelines.data.tokenizer import TokenIds, TokenizerManifest
from pipelines.files import fingerprint, iter_tar

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceShards:
    """How the packed sequences are cut into tars."""

    samples_per_shard: int = 1000
    """Sequences per WebDataset tar."""


@dataclass(frozen=True)
class SequenceShardSet:
    """Packed sequences in WebDataset tars with an index: where they are, what they hold, how they were packed."""

    path: str
    urls: list[str]
    samples: int
    """Sequences in all tars."""
    bytes: int
    """Size of all tars in bytes."""
    packing: PackingConfig
    token_ids: TokenIds
    meta: dict[str, Any]
    """The shard index's lineage: what the sequences were made from (settings, tokenizer, source files)."""

    @property
    def version(self) -> str:
        """The fingerprint that names the folder."""
        return Path(self.path).name


@dataclass(frozen=True)
class PackedSequences(SequenceShardSet):
    """The pretraining shard set; ``meta`` holds the packing settings, tokenizer, filter thresholds, documents and
    recaptions."""

    stats: PackingStats
    skipped_documents: int = 0

    @property
    def filter_thresholds(self) -> dict[str, dict[str, Any]]:
        return self.meta["filter_thresholds"]


def pack_shards(filtered: Mapping[str, FilteredShard], downloads: Mapping[str, DownloadedShard],
                recaptions: Mapping[str, RecaptionedShard], tokenizer: TokenizerManifest, packing: PackingConfig,
                shards: SequenceShards, layout: DataLayout, log: Callable[[str], None] = logger.info, *,
                lineage: Mapping[str, Any] | None = None) -> PackedSequences:
    """Pack the documents of every shard (``filtered``: what filtering, dedup and decontamination kept, in key order;
    a recaptioned pair as its recaption, images from the shard's download) into
    ``packed_sequences/<fingerprint>/seq-NNNNNN.tar`` + ``index.json``; ``lineage`` (what the stages before removed,
    and why) joins the index's ``meta``."""
    recaptioned = {k: m for k, m in recaptions.items() if m.recaptioned}
    versions = {"tokenizer": tokenizer.version, "documents": {k: m.version for k, m in filtered.items()},
                "recaptions": {k: m.version for k, m in recaptioned.items()}}
    meta = {"packing": packing.to_dict(), "tokenizer": tokenizer.source,
            "filter_thresholds": {k: m.thresholds for k, m in filtered.items()},
            "documents": {k: m.path for k, m in filtered.items()},
            "recaptions": {k: {"path": m.path, "captioner_version": m.captioner_version} for k, m in recaptioned.items()},
            "data_versions": versions, **(lineage or {})}
    # named by what it is made of (data versions and settings), never by where those inputs lie: what earlier stages
    # removed is in the documents' data versions, so of the lineage (which names the drop files) only its stages count
    identity = {"packing": packing.to_dict(), "row_format": ROW_FORMAT, "filter_thresholds": meta["filter_thresholds"],
                **versions, "lineage": sorted(lineage or {})}
    out = layout.path("packed_sequences", fingerprint(identity, shards.samples_per_shard))
    text_tokenizer = tokenizer.load()
    totals = PackingStats()
    skipped = BadRecordLog(keep=20)

    def sequences() -> Iterator[dict[str, Any]]:
        n = 0
        for key, shard in sorted(filtered.items()):
            stats = PackingStats()
            captions = recaptioned[key].captions() if key in recaptioned else None
            packed = pack_documents(read_documents(shard.path), text_tokenizer, packing, images=downloads[key].image_bytes(),
                                    recaptions=captions, stats=stats, handler=skipped, boi_token=tokenizer.boi_token,
                                    image_token=tokenizer.image_token)
            for sequence in packed:
                yield sequence.to_sample(f"{n:09d}")
                n += 1
            add_counts(totals, stats)
            log(f"{key}: {stats.documents} documents -> {stats.sequences} sequences")

    index = write_shards(sequences(), out, maxcount=shards.samples_per_shard, prefix="seq", meta=meta)
    return PackedSequences(str(out), index.urls(out), index.samples, index.bytes, packing, tokenizer.token_ids,
                           index.meta, totals, skipped.count)


def sequence_lengths(urls: Sequence[str]) -> Iterator[int]:
    """The token count of every packed sequence in the tars, read from their ``input_ids.npy``."""
    for url in urls:
        for _, _, data in iter_tar(url, {"input_ids.npy"}):
            if data is not None:
                yield int(np.load(io.BytesIO(data)).shape[0])


def packing_summary(sequences: PackedSequences) -> dict[str, Any]:
    """The counts an operator looks at: sequences, tokens, fill rate of the ``max_length`` budget, throughput."""
    stats = sequences.stats
    capacity = max(1, stats.sequences * sequences.packing.max_length)
    return {**asdict(stats), "tokens": stats.tokens, "fill_rate": stats.tokens / capacity,
            "tokens_per_second": stats.tokens / max(stats.seconds, 1e-9)}
