"""The raw metadata shards as they lie in the watched folder, and each one read into the normalized document schema
(one parquet per shard)."""

from pathlib import Path

import dagster as dg

from assets.io_manager import with_failures
from assets.metadata import bullets, per_second, table
from assets.partitions import single_run, source_shards
from assets.resources import QualityBounds, Storage
from pipelines.data.errors import ShardFailure
from pipelines.data.raw_documents import RawDocuments, RawShard, parse_rate, read_raw_shards

RAW_SHARDS = with_failures(RawShard)
"""Per partition its RawShard, or the ShardFailure of a shard that could not be read."""

raw_shards = dg.AssetSpec(
    "raw_shards", group_name="sources", partitions_def=source_shards, kinds={"files"},
    description=("The raw metadata shards in the watched folder, one partition each (MMC4 jsonl.zip, LAION parquet, "
                 "CC-12M tsv, ...). Dagster does not make them: the sample world writes its own (reported as "
                 "materializations), and raw_shard_sensor observes the files a user drops in."))
"""External: its events come from the writers (``sample_world``) and the watcher (``raw_shard_sensor``)."""


def raw_shard_metadata(path: Path) -> dict:
    """What the UI shows of one raw shard file: where it lies and its size."""
    return {"path": dg.MetadataValue.path(str(path)), "bytes": path.stat().st_size}


@dg.asset(group_name="sources", partitions_def=source_shards, backfill_policy=single_run, kinds={"parquet"},
          dagster_type=RAW_SHARDS, deps=[raw_shards])
def raw_documents(context: dg.AssetExecutionContext, storage: Storage) -> dg.Output:
    """Read each raw shard (MMC4, LAION, CC-12M, OBELICS, OmniCorpus, MINT-1T, by its folder); every bad record is
    counted with its reason. A shard that cannot be read fails alone: its partition is quarantined with the file and
    the cause (its metadata, the run's log, the shards-readable check), the others materialize; a run in which no
    shard can be read fails."""
    result = read_raw_shards(context.partition_keys, storage.layout, log=context.log.info)
    for key, failure in result.failures.items():
        context.log.error(f"{key}: quarantined, {failure}")
        context.add_asset_metadata({"failed": str(failure)}, partition_key=key)
    if not result.shards:
        raise dg.Failure(description="no raw shard of the run could be read: "
                         + "; ".join(f"{k}: {f}" for k, f in result.failures.items()))
    return dg.Output({**result.shards, **result.failures}, metadata=_metadata(result),
                     data_version=dg.DataVersion(result.version))


def _metadata(result: RawDocuments) -> dict:
    shards = result.shards.values()
    return {
        "documents": result.documents,
        "bad_records": sum(m.bad_records for m in shards),
        "parse_rate": parse_rate(result.shards),
        "images": sum(m.images for m in shards),
        "documents_per_second": per_second(result.documents, result.seconds),
        "shards": table({k: f"{m.documents} docs, {m.bad_records} bad" for k, m in result.shards.items()}, ("shard", "")),
        "bad_record_examples": bullets(f"`{r}`" for r in result.bad_examples[:20]),
        "skipped_images": sum(m.skipped_images for m in shards),
        "failed_shards": table({k: str(f) for k, f in result.failures.items()}, ("shard", "file: cause")),
    }


@dg.asset_check(asset=raw_documents, partitions_def=source_shards, description=(
    "Every raw shard of the run could be read; a shard that could not is named with its file and cause (its partition "
    "is quarantined: later stages leave it out)."))
def raw_documents_shards_readable(raw_documents: RAW_SHARDS) -> dg.AssetCheckResult:
    failed = {k: str(m) for k, m in raw_documents.items() if isinstance(m, ShardFailure)}
    return dg.AssetCheckResult(passed=not failed, metadata={
        "shards_read": len(raw_documents) - len(failed), "failed_shards": table(failed, ("shard", "file: cause"))})


@dg.asset_check(asset=raw_documents, partitions_def=source_shards,
                description="Share of raw records that parse is above the configured floor.")
def raw_documents_parse_rate(bounds: QualityBounds, raw_documents: dict[str, RawShard]) -> dg.AssetCheckResult:
    rate = parse_rate(raw_documents)
    return dg.AssetCheckResult(passed=rate >= bounds.min_parse_rate, metadata={
        "parse_rate": rate, "floor": bounds.min_parse_rate, "bad_records": sum(m.bad_records for m in raw_documents.values())})
