"""The filtered_documents stage: MMC4's rules (:mod:`pipelines.data.filtering`) over each shard's downloaded
documents, judged on the CLIP scores (a recaptioned pair on its recaption), with a reason for every drop."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow.parquet as pq

from pipelines.data.clip_score import scores_mapping
from pipelines.data.clip_scores import ScoredShard
from pipelines.data.documents import read_documents, write_documents
from pipelines.data.downloaded_images import DownloadedShard
from pipelines.data.filtering import FilterConfig, FilterReport, filter_documents
from pipelines.data.layout import DataLayout
from pipelines.data.recaptions import RecaptionedShard
from pipelines.data.stats import add_counts
from pipelines.files import atomic_path, fingerprint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FilteredShard:
    """One shard filtered: the kept documents' parquet, every drop with its rule and reason, and the counts."""

    path: str
    drops: str
    thresholds: dict[str, Any]
    """The resolved :class:`FilterConfig` and ``pair_caption`` (``blip2`` where pairs were judged by their
    recaption, else ``original``): written into the packed shards' lineage."""
    documents_in: int
    documents_kept: int
    images_in: int
    images_kept: int
    version: str = ""
    """The data version: the thresholds and the versions of the scores, download and recaptions it filtered."""


@dataclass
class FilteredDocuments:
    """A run of the stage: per partition key its :class:`FilteredShard`, and the run's totals."""

    shards: dict[str, FilteredShard]
    config: FilterConfig
    """The thresholds applied (the scorer's threshold filled in)."""
    totals: FilterReport
    seconds: float = 0.0

    @property
    def version(self) -> str:
        return fingerprint(self.config.to_dict(), {k: m.version for k, m in self.shards.items()})


def pass_rate(shards: Mapping[str, FilteredShard]) -> float:
    """Share of the shards' documents the filter kept."""
    return sum(m.documents_kept for m in shards.values()) / max(1, sum(m.documents_in for m in shards.values()))


def scorer_threshold(scores: Mapping[str, ScoredShard]) -> float | None:
    """The one scorer threshold the shards were scored with; shards scored by different scorers are refused."""
    thresholds = {m.threshold for m in scores.values()}
    if len(thresholds) > 1:
        raise ValueError(f"clip scores of these shards come from different scorers (thresholds {thresholds}); "
                         "re-score them")
    return thresholds.pop() if thresholds else None


def filter_shards(downloads: Mapping[str, DownloadedShard], scores: Mapping[str, ScoredShard],
                  recaptions: Mapping[str, RecaptionedShard], config: FilterConfig, layout: DataLayout,
                  log: Callable[[str], None] = logger.info) -> FilteredDocuments:
    """Filter every shard's downloaded documents with ``config`` (null similarity thresholds: the scorer's) into
    ``filtered_documents/<source>/<shard>.<thresholds>.parquet`` (+ ``.drops.parquet``). A shard whose pairs were
    recaptioned (``recaptions``) has them judged by their similarity to the recaption."""
    settings = config.with_scorer_threshold(scorer_threshold(scores))
    result = FilteredDocuments({}, settings, FilterReport(settings))
    start = time.perf_counter()
    for key, download in downloads.items():
        by_recaption = recaptions[key].recaptioned
        thresholds = {**settings.to_dict(), "pair_caption": "blip2" if by_recaption else "original"}
        report = FilterReport(settings)
        out = layout.partition_path("filtered_documents", key, f".{fingerprint(thresholds)}.parquet")
        rows = pq.read_table(scores[key].path).to_pylist()
        kept = filter_documents(read_documents(download.documents), settings, report=report,
                                scores=scores_mapping(rows, prefer_recaption=by_recaption))
        write_documents(kept, out)
        drops = out.with_name(out.name.replace(".parquet", ".drops.parquet"))
        with atomic_path(drops) as tmp:
            pq.write_table(report.drops_table(), tmp)
        version = fingerprint(thresholds, scores[key].version, download.content, recaptions[key].version)
        result.shards[key] = FilteredShard(str(out), str(drops), thresholds, report.documents_in,
                                           report.documents_kept, report.images_in, report.images_kept, version)
        add_counts(result.totals, report)
        log(f"{key}: kept {report.documents_kept} of {report.documents_in} documents")
    result.seconds = time.perf_counter() - start
    return result
