"""Downloaded images: img2dataset webdataset shards and a status for every image URL, per raw shard."""

import dagster as dg

from assets.metadata import bullets, image_preview, per_second, table
from assets.partitions import single_run, source_shards
from assets.resources import QualityBounds, SampleWorldImages, Storage, WebImages
from assets.settings import stage_fields
from pipelines.data.download import DownloadConfig
from pipelines.data.downloaded_images import (
    DownloadedImages,
    DownloadedShard,
    download_shards,
    preview,
    shard_problems,
    status_counts,
    success_rate,
)
from pipelines.data.raw_documents import RawShard


class DownloadSettings(stage_fields(DownloadConfig, exclude=("max_aspect_ratio", "retryable"))):
    """img2dataset's knobs and weft's retry pass (:class:`pipelines.data.download.DownloadConfig`)."""


@dg.asset(group_name="images", partitions_def=source_shards, backfill_policy=single_run, kinds={"webdataset"})
def downloaded_images(
    context: dg.AssetExecutionContext,
    config: DownloadSettings,
    storage: Storage,
    images: dg.ResourceParam[WebImages | SampleWorldImages],
    raw_documents: dict[str, RawShard],
) -> dg.Output[dict[str, DownloadedShard]]:
    """Fetch each shard's image URLs with img2dataset (dedup, host policy, retry pass) and attach every
    image's outcome to its document. Re-running a finished shard fetches nothing (incremental mode)."""
    result = download_shards(raw_documents, images.get(), config.to(DownloadConfig), storage.layout,
                             log=context.log.info)
    return dg.Output(result.shards, metadata=_metadata(result), data_version=dg.DataVersion(result.version))


def _metadata(result: DownloadedImages) -> dict:
    counts = result.counts
    total = sum(counts.values())
    files = [s for m in result.shards.values() for s in m.shards]
    return {
        "urls": total,
        "ok": counts.get("ok", 0),
        "success_rate": success_rate(result.shards),
        "status_counts": counts,
        "top_errors": table(dict(sorted(result.error_counts.items(), key=lambda kv: -kv[1])[:10]), ("error", "urls")),
        "recovered_by_retry": sum(m.recovered_by_retry for m in result.shards.values()),
        "urls_per_second": per_second(total, result.seconds),
        "shards": table({s.path: f"{s.bytes} bytes" for s in files}, ("shard", "size")),
        "bytes": sum(s.bytes for s in files),
        "image_settings": next(iter(result.shards.values())).image_settings if result.shards else {},
        "preview": image_preview(preview(result.shards)),
    }


@dg.asset_check(asset=downloaded_images, partitions_def=source_shards, blocking=True, description=(
    "Every shard's tar holds exactly the keys its status rows mark ok, and every tar reads to the end."))
def downloaded_images_shard_integrity(downloaded_images: dict[str, DownloadedShard]) -> dg.AssetCheckResult:
    checked, problems = shard_problems(downloaded_images)
    return dg.AssetCheckResult(passed=not problems, metadata={"shards_checked": checked, "problems": bullets(problems)})


@dg.asset_check(asset=downloaded_images, partitions_def=source_shards,
                description="Share of image URLs downloaded is above the configured floor.")
def downloaded_images_success_rate(bounds: QualityBounds,
                                   downloaded_images: dict[str, DownloadedShard]) -> dg.AssetCheckResult:
    rate = success_rate(downloaded_images)
    return dg.AssetCheckResult(passed=rate >= bounds.min_download_success_rate, metadata={
        "success_rate": rate, "floor": bounds.min_download_success_rate, "status_counts": status_counts(downloaded_images)})
