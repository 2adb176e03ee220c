"""Downloaded images: img2dataset webdataset shards and a status for every image URL, per raw shard."""

import tarfile
import time
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq
from pydantic import Field

from assets.metadata import data_version, image_preview, table
from assets.partitions import single_run, source_shards
from orchestration.resources import QualityBounds, SampleWorldImages, Storage, WebImages
from pipelines.documents import read_documents
from pipelines.download import DownloadConfig
from pipelines.shards import shard_keys


class DownloadSettings(dg.Config):
    """img2dataset's knobs (same names as ``pipelines.download.DownloadConfig``)."""

    image_size: int = 64
    resize_mode: str = Field(default="no", description="no | border | keep_ratio | keep_ratio_largest | center_crop")
    encode_quality: int = 95
    processes_count: int = 1
    thread_count: int = 16
    number_sample_per_shard: int = 10_000
    timeout: float = 5.0
    retry_passes: int = 1

    def to_config(self) -> DownloadConfig:
        return DownloadConfig(image_size=self.image_size, resize_mode=self.resize_mode,
                              encode_quality=self.encode_quality, processes_count=self.processes_count,
                              thread_count=self.thread_count, number_sample_per_shard=self.number_sample_per_shard,
                              timeout=self.timeout, retry_passes=self.retry_passes)


@dg.asset(group_name="images", partitions_def=source_shards, backfill_policy=single_run, kinds={"webdataset"})
def downloaded_images(
    context: dg.AssetExecutionContext,
    config: DownloadSettings,
    storage: Storage,
    images: dg.ResourceParam[WebImages | SampleWorldImages],
    raw_documents: dict,
) -> dg.Output[dict]:
    """Fetch each shard's image URLs with img2dataset (dedup, host policy, retry pass) and attach every
    image's outcome to its document. Re-running a finished shard fetches nothing (incremental mode)."""
    settings = config.to_config()
    # Settings that change the stored images name the folder: a re-run with them re-downloads, any
    # other re-run resumes (img2dataset's incremental mode skips finished shards).
    image_settings = {"image_size": settings.image_size, "resize_mode": settings.resize_mode,
                      "encode_quality": settings.encode_quality}
    variant = data_version(image_settings).value[:8]
    manifests = {}
    counts: dict[str, int] = {}
    errors: dict[str, int] = {}
    start = time.perf_counter()
    for key, raw in raw_documents.items():
        out = storage.partition_path("images", key, f".{variant}")
        result = images.download(read_documents(raw["path"]), out, settings)
        shards = [{"path": str(p), "bytes": p.stat().st_size} for p in result.shards]
        manifests[key] = {
            "output_dir": str(out), "documents": str(out / "documents.parquet"), "status": str(result.status_path),
            "shards": shards, "counts": result.counts, "retried": result.retried,
            "recovered_by_retry": result.recovered_by_retry, "image_settings": image_settings,
        }
        for status, n in result.counts.items():
            counts[status] = counts.get(status, 0) + n
        for error, n in result.error_counts.items():
            errors[error] = errors.get(error, 0) + n
        context.log.info(f"{key}: {result.counts}")
    seconds = time.perf_counter() - start
    total = sum(counts.values())
    all_shards = [s for m in manifests.values() for s in m["shards"]]
    metadata = {
        "urls": total,
        "ok": counts.get("ok", 0),
        "success_rate": counts.get("ok", 0) / max(1, total),
        "status_counts": counts,
        "top_errors": table(dict(sorted(errors.items(), key=lambda kv: -kv[1])[:10]), ("error", "urls")),
        "recovered_by_retry": sum(m["recovered_by_retry"] for m in manifests.values()),
        "urls_per_second": total / max(seconds, 1e-9),
        "shards": table({s["path"]: f"{s['bytes']} bytes" for s in all_shards}, ("shard", "size")),
        "bytes": sum(s["bytes"] for s in all_shards),
        "image_settings": image_settings,
        "preview": image_preview(_preview(manifests)),
    }
    version = data_version({k: (m["counts"], m["shards"]) for k, m in manifests.items()}, image_settings)
    return dg.Output(manifests, metadata=metadata, data_version=version)


def downloaded_image_bytes(manifest: dict) -> dict[str, bytes]:
    """Image bytes of one shard's download, by img2dataset key (keys are unique within one download)."""
    images: dict[str, bytes] = {}
    for shard in manifest["shards"]:
        with tarfile.open(shard["path"]) as tar:
            for member in tar:
                key, _, extension = member.name.partition(".")
                if extension == "jpg":
                    images[key] = tar.extractfile(member).read()
    return images


def _preview(manifests: dict, limit: int = 4) -> list[tuple[bytes, str]]:
    """The first few downloaded images with their document's first text."""
    wanted: dict[str, str] = {}
    for manifest in manifests.values():
        for document in read_documents(manifest["documents"]):
            texts = [e["text"] for e in document["elements"] if e["type"] == "text"]
            for element in document["elements"]:
                if element["type"] == "image" and element["status"] == "ok" and len(wanted) < limit:
                    wanted[element["key"]] = f"{document['doc_id']}: {texts[0] if texts else ''}"
            if len(wanted) >= limit:
                break
        if len(wanted) >= limit:
            break
    found: dict[str, bytes] = {}
    for manifest in manifests.values():
        for shard in manifest["shards"]:
            try:
                with tarfile.open(shard["path"]) as tar:
                    for member in tar:
                        key, _, extension = member.name.partition(".")
                        if key in wanted and extension == "jpg":
                            found[key] = tar.extractfile(member).read()
            except (OSError, tarfile.TarError) as err:
                # The preview shows what it can; the integrity check reports (and blocks on) the bad shard.
                dg.get_dagster_logger().warning(f"preview skips unreadable shard {shard['path']}: {err}")
    return [(found[k], text) for k, text in wanted.items() if k in found]


@dg.asset_check(asset=downloaded_images, blocking=True, description=(
    "Every shard's tar holds exactly the keys its status rows mark ok, and every tar reads to the end."))
def downloaded_images_shard_integrity(storage: Storage, downloaded_images: dict) -> dg.AssetCheckResult:
    problems = []
    checked = 0
    for key, manifest in downloaded_images.items():
        status = pq.read_table(manifest["status"]).to_pylist()
        for shard in manifest["shards"]:
            path = Path(shard["path"])
            expected = {r["key"] for r in status if r["status"] == "ok" and r["shard"] == path.stem}
            try:
                found = shard_keys(path)
            except (OSError, tarfile.TarError) as err:
                problems.append(f"{key} {path.name}: unreadable ({err})")
                continue
            checked += 1
            if path.stat().st_size != shard["bytes"]:
                problems.append(f"{key} {path.name}: {path.stat().st_size} bytes, manifest says {shard['bytes']}")
            if set(found) != expected or len(found) != len(set(found)):
                problems.append(f"{key} {path.name}: {len(found)} samples in the tar, {len(expected)} ok in the status")
    return dg.AssetCheckResult(passed=not problems, metadata={
        "shards_checked": checked, "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems) or "_none_")})


@dg.asset_check(asset=downloaded_images, description="Share of image URLs downloaded is above the configured floor.")
def downloaded_images_success_rate(bounds: QualityBounds, downloaded_images: dict) -> dg.AssetCheckResult:
    counts: dict[str, int] = {}
    for manifest in downloaded_images.values():
        for status, n in manifest["counts"].items():
            counts[status] = counts.get(status, 0) + n
    rate = counts.get("ok", 0) / max(1, sum(counts.values()))
    return dg.AssetCheckResult(passed=rate >= bounds.min_download_success_rate, metadata={
        "success_rate": rate, "floor": bounds.min_download_success_rate, "status_counts": counts})
