"""Deduplicated documents: the filtered documents of every shard deduplicated against each other (image URLs, then
the images' sha256 and perceptual hash), the first occurrence in a stable order of shards and sources kept."""

import dagster as dg

from assets.metadata import per_second, table
from assets.resources import QualityBounds, Storage
from assets.settings import stage_fields
from pipelines.data.dedup import DedupConfig
from pipelines.data.deduplicated_documents import DeduplicatedDocuments, dedup_shards
from pipelines.data.downloaded_images import DownloadedShard
from pipelines.data.filtered_documents import FilteredShard


class DedupSettings(stage_fields(DedupConfig)):
    """Which copy of a duplicate is kept and how close two images' perceptual hashes may be
    (:class:`pipelines.data.dedup.DedupConfig`)."""


@dg.asset(group_name="filtering", kinds={"parquet"})
def deduplicated_documents(
    context: dg.AssetExecutionContext,
    config: DedupSettings,
    storage: Storage,
    filtered_documents: dict[str, FilteredShard],
    downloaded_images: dict[str, DownloadedShard],
) -> dg.Output[DeduplicatedDocuments]:
    """Drop every image seen before in the corpus (same URL, same bytes, or a perceptual hash within the configured
    Hamming distance), across shards and sources, the first occurrence kept; a pair that loses its image and a
    document that loses every image go too. Every drop is written with its rule and reason."""
    result = dedup_shards(filtered_documents, downloaded_images, config.to(DedupConfig), storage.layout,
                          log=context.log.info)
    return dg.Output(result, metadata=_metadata(result), data_version=dg.DataVersion(result.version))


def _metadata(result: DeduplicatedDocuments) -> dict:
    counts = result.counts
    return {
        "documents_in": counts.documents_in, "documents_kept": counts.documents_kept,
        "images_in": counts.images_in, "images_kept": counts.images_kept, "dedup_rate": result.dedup_rate,
        "drops_by_rule": table(result.drops_by_rule, ("rule", "drops")),
        "shards": table({k: f"kept {m.images_kept} of {m.images_in} images, {m.documents_kept} of {m.documents_in} "
                            "documents" for k, m in result.shards.items()}, ("shard (in dedup order)", "")),
        "config": {"source_priority": list(result.config.source_priority),
                   "phash_max_distance": result.config.phash_max_distance if result.config.phash_max_distance
                   is not None else "off"},
        "images_per_second": per_second(counts.images_in, result.seconds),
    }


@dg.asset_check(asset=deduplicated_documents, description=(
    "Share of images dropped as duplicates is at most the configured bound (a higher one means a broken source, "
    "or a perceptual-hash distance that merges different pictures)."))
def deduplicated_documents_rate(bounds: QualityBounds,
                                deduplicated_documents: DeduplicatedDocuments) -> dg.AssetCheckResult:
    rate = deduplicated_documents.dedup_rate
    return dg.AssetCheckResult(passed=rate <= bounds.max_dedup_rate, metadata={
        "dedup_rate": rate, "bound": bounds.max_dedup_rate, "drops_by_rule": deduplicated_documents.drops_by_rule})
