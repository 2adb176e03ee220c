"""The recaptions stage: BLIP-2 captions of the downloaded pair images of each recaptioned source, per raw shard.

Every downloaded pair of a recaptioned source (CC-12M in the paper, which recaptioned all of it) is captioned
*before* filtering: a recaptioned pair is judged by the CLIP filter and trained on its recaption (the clip_scores,
filtered_documents and packed_sequences stages all read :attr:`RecaptionedShard.path`), so one setting,
:attr:`RecaptionSources.sources`, decides a pair's text everywhere. The output file is named by the captioner's
version and the download it reads and holds every caption made so far: a re-run captions only pairs it has not
seen, and a new captioner starts a new file. Re-filtering does not touch it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.compute import Compute
from pipelines.data.documents import read_documents
from pipelines.data.downloaded_images import DownloadedShard
from pipelines.data.errors import BadRecordLog
from pipelines.data.layout import DataLayout
from pipelines.data.recaption import CAPTION_FIELD, CaptionerManifest, recaption_documents, recaptions_mapping
from pipelines.files import atomic_path, fingerprint

logger = logging.getLogger(__name__)

RECAPTIONS_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False), pa.field("element_index", pa.int32(), nullable=False),
    pa.field("key", pa.string()), pa.field("caption", pa.string()), pa.field(CAPTION_FIELD, pa.string()),
])


@dataclass(frozen=True)
class RecaptionSources:
    """Which sources' pairs get BLIP-2 captions (the paper recaptions CC-12M; LAION keeps its text)."""

    sources: tuple[str, ...] = ("cc12m",)
    """Sources whose downloaded pairs are recaptioned; those pairs are filtered and trained on their recaption."""


@dataclass(frozen=True)
class RecaptionedShard:
    """One shard's recaptions: a parquet of ``doc_id, element_index, key, caption (the source text),
    caption_blip2``, or none (``path`` None) for a source that is not recaptioned."""

    source: str
    path: str | None
    documents: int = 0
    captioned: int = 0
    """Pairs captioned by this run (the rest were reused from an earlier one)."""
    captioner_version: str | None = None
    version: str = ""
    """The data version: the captioner's and the download's (empty for a source that is not recaptioned)."""

    @property
    def recaptioned(self) -> bool:
        return self.path is not None

    def captions(self) -> dict[str, str] | None:
        """``doc_id -> recaption`` (None for a shard that is not recaptioned)."""
        return recaptions_mapping(pq.read_table(self.path).to_pylist()) if self.path is not None else None


@dataclass
class Recaptions:
    """A run of the stage: per partition key its :class:`RecaptionedShard`, and the run's totals."""

    shards: dict[str, RecaptionedShard]
    sources: tuple[str, ...]
    captioner_version: str
    skipped_images: int = 0
    seconds: float = 0.0
    """Time spent captioning."""
    examples: list[tuple[str, str, str]] = field(default_factory=list)
    """The first few (source text, recaption, doc_id)."""

    @property
    def version(self) -> str:
        return fingerprint(self.captioner_version, {k: (m.version, m.documents) for k, m in self.shards.items()})

    @property
    def documents(self) -> int:
        return sum(m.documents for m in self.shards.values())

    @property
    def captioned(self) -> int:
        return sum(m.captioned for m in self.shards.values())


def recaption_shards(downloads: Mapping[str, DownloadedShard], captioner: CaptionerManifest, config: RecaptionSources,
                     layout: DataLayout, compute: Compute = Compute(),
                     log: Callable[[str], None] = logger.info) -> Recaptions:
    """Caption the downloaded pairs of every shard of a recaptioned source into
    ``recaptions/<source>/<shard>.<captioner and download>.parquet``, keeping the captions an earlier run made
    there; an image that is missing or does not decode is counted and skipped. The captioner is loaded only
    when some pair has no caption yet."""
    result = Recaptions({}, tuple(config.sources), captioner.version)
    skipped = BadRecordLog(keep=20)
    model = None
    for key, download in downloads.items():
        source = key.partition("/")[0]
        if source not in config.sources:
            result.shards[key] = RecaptionedShard(source, None)
            continue
        # named by the captioner and the download's settings (with the key, that download's folder): not by where
        # the storage root lies, so a moved root or a second clone keeps its captions
        out = layout.partition_path("recaptions", key, f".{fingerprint(captioner.version, download.image_settings)}.parquet")
        done = pq.read_table(out).to_pylist() if out.exists() else []
        seen = {r["doc_id"] for r in done}
        todo = [d for d in read_documents(download.documents) if d["kind"] == "pair" and d["doc_id"] not in seen]
        new: list[dict] = []
        if todo:
            model = model or captioner.load(compute)
            start = time.perf_counter()
            with compute.threads():
                new = list(recaption_documents(todo, model, download.image_bytes(), handler=skipped))
            result.seconds += time.perf_counter() - start
            with atomic_path(out) as tmp:
                pq.write_table(pa.Table.from_pylist(done + new, schema=RECAPTIONS_SCHEMA), tmp)
        rows = done + new
        result.examples += [(r["caption"], r[CAPTION_FIELD], r["doc_id"]) for r in rows[: 5 - len(result.examples)]]
        result.shards[key] = RecaptionedShard(source, str(out), len(rows), len(new), captioner.version,
                                              fingerprint(captioner.version, download.content))
        log(f"{key}: {len(rows)} pairs recaptioned ({len(new)} new, {len(done)} reused)")
    result.skipped_images = skipped.count
    return result
