"""The clip_scores stage: the CLIP similarity of every downloaded image to its matched sentence (and of a recaptioned
pair's image to its recaption too, so that filtering judges the pair by the text it is trained on), per raw shard."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.compute import Compute
from pipelines.data.clip_score import ClipScorerManifest, score_documents
from pipelines.data.documents import read_documents
from pipelines.data.downloaded_images import DownloadedShard
from pipelines.data.layout import DataLayout
from pipelines.data.recaptions import RecaptionedShard
from pipelines.files import atomic_path, fingerprint

logger = logging.getLogger(__name__)

SCORES_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False), pa.field("element_index", pa.int32(), nullable=False),
    pa.field("key", pa.string()), pa.field("matched_text_index", pa.int32()), pa.field("similarity", pa.float32()),
    pa.field("similarities", pa.list_(pa.float32())), pa.field("similarity_recaption", pa.float32()),
])
QUANTILES = (5, 25, 50, 75, 95)


@dataclass(frozen=True)
class ScoredShard:
    """One shard's scores: a parquet of :data:`SCORES_SCHEMA` rows, one per downloaded image."""

    path: str
    images: int
    threshold: float | None
    """The calibrated threshold of the scorer that made them (None: a pretrained scorer)."""
    mean_similarity: float | None
    recaptions: str | None
    """The recaptions the pairs were also scored against (None: the shard is not recaptioned)."""
    on_recaption: int = 0
    """Images also scored against their recaption."""
    version: str = ""
    """The data version: the scorer's, the download's and the recaptions' (never a path)."""


@dataclass
class ClipScores:
    """A run of the stage: per partition key its :class:`ScoredShard`, and the run's similarities."""

    shards: dict[str, ScoredShard]
    threshold: float | None
    similarities: list[float] = field(default_factory=list)
    """Every image's similarity to its matched text."""
    seconds: float = 0.0

    @property
    def version(self) -> str:
        return fingerprint(self.threshold, {k: m.version for k, m in self.shards.items()})

    def quantiles(self) -> dict[str, float]:
        """``p5`` ... ``p95`` of the similarities (empty without images)."""
        values = np.asarray(self.similarities, dtype=np.float64)
        return {f"p{q}": float(np.quantile(values, q / 100)) for q in QUANTILES} if len(values) else {}

    def below_threshold(self) -> int | None:
        """Images under the scorer's threshold (None for a scorer without one)."""
        return None if self.threshold is None else int(sum(s < self.threshold for s in self.similarities))


def score_shards(downloads: Mapping[str, DownloadedShard], recaptions: Mapping[str, RecaptionedShard],
                 scorer: ClipScorerManifest, layout: DataLayout, compute: Compute = Compute(),
                 log: Callable[[str], None] = logger.info) -> ClipScores:
    """Score every downloaded image of the shards with ``scorer`` into ``clip_scores/<source>/<shard>.parquet``:
    against its matched sentence or caption, every sentence of its document, and for the pairs of recaptioned
    shards (``recaptions``, same keys) against the recaption."""
    model = scorer.load(compute)
    result = ClipScores({}, scorer.threshold)
    start = time.perf_counter()
    for key, download in downloads.items():
        recaptioned = recaptions[key]
        with compute.threads():
            rows = list(score_documents(read_documents(download.documents), model, download.image_bytes(),
                                        recaptions=recaptioned.captions()))
        out = layout.partition_path("clip_scores", key, ".parquet")
        with atomic_path(out) as tmp:
            pq.write_table(pa.Table.from_pylist(rows, schema=SCORES_SCHEMA), tmp)
        matched = [r["similarity"] for r in rows if r["similarity"] is not None]
        result.similarities += matched
        result.shards[key] = ScoredShard(
            str(out), len(rows), scorer.threshold, float(np.mean(matched)) if matched else None, recaptioned.path,
            sum(r["similarity_recaption"] is not None for r in rows),
            fingerprint(scorer.version, download.content, recaptioned.version, len(rows)))
        log(f"{key}: scored {len(rows)} images")
    result.seconds = time.perf_counter() - start
    return result
