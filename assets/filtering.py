"""Filtered documents: MMC4's rules over the downloaded documents, with a reason for every drop."""

import dagster as dg

from assets.metadata import per_second, table
from assets.partitions import single_run, source_shards
from assets.resources import QualityBounds, Storage
from assets.settings import stage_fields
from pipelines.data.clip_scores import ScoredShard
from pipelines.data.downloaded_images import DownloadedShard
from pipelines.data.filtered_documents import FilteredDocuments, FilteredShard, filter_shards, pass_rate
from pipelines.data.filtering import FilterConfig
from pipelines.data.recaptions import RecaptionedShard


class FilterSettings(stage_fields(FilterConfig)):
    """MMC4's thresholds (:class:`pipelines.data.filtering.FilterConfig`); a null similarity threshold is the CLIP
    scorer's calibrated one. Written into every output's metadata and the packed shards' lineage."""


@dg.asset(group_name="filtering", partitions_def=source_shards, backfill_policy=single_run, kinds={"parquet"})
def filtered_documents(
    context: dg.AssetExecutionContext,
    config: FilterSettings,
    storage: Storage,
    downloaded_images: dict[str, DownloadedShard],
    clip_scores: dict[str, ScoredShard],
    recaptions: dict[str, RecaptionedShard],
) -> dg.Output[dict[str, FilteredShard]]:
    """Keep images similar enough (CLIP score) to their sentence (a recaptioned pair's: to its recaption), at most N
    per document, drop imageless documents and half of the one-image ones. Every drop is written with its rule and
    reason."""
    result = filter_shards(downloaded_images, clip_scores, recaptions, config.to(FilterConfig), storage.layout,
                           log=context.log.info)
    return dg.Output(result.shards, metadata=_metadata(result), data_version=dg.DataVersion(result.version))


def _metadata(result: FilteredDocuments) -> dict:
    summary = result.totals.metadata()
    return {
        **{k: summary[k] for k in ("documents_in", "documents_kept", "document_pass_rate", "images_in", "images_kept",
                                   "image_pass_rate")},
        "image_drops_by_rule": table(summary["image_drops_by_rule"], ("rule", "images")),
        "document_drops_by_rule": table(summary["document_drops_by_rule"], ("rule", "documents")),
        "drop_reasons": dg.MetadataValue.md(
            "\n".join(f"- `{d.doc_id}` {d.rule}: {d.reason}" for d in result.totals.drops[:15]) or "_none_"),
        "thresholds": result.config.to_dict(),
        "judged_by_recaption": sorted(k for k, m in result.shards.items() if m.thresholds["pair_caption"] == "blip2"),
        "min_similarity": result.config.min_similarity,
        "documents_per_second": per_second(summary["documents_in"], result.seconds),
    }


@dg.asset_check(asset=filtered_documents, partitions_def=source_shards,
                description="Document pass rate of the filter is within the configured bounds.")
def filtered_documents_pass_rate(bounds: QualityBounds, filtered_documents: dict[str, FilteredShard]) -> dg.AssetCheckResult:
    rate = pass_rate(filtered_documents)
    passed = bounds.min_filter_pass_rate <= rate <= bounds.max_filter_pass_rate
    return dg.AssetCheckResult(passed=passed, metadata={
        "document_pass_rate": rate, "bounds": [bounds.min_filter_pass_rate, bounds.max_filter_pass_rate]})
