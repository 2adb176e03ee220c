"""Raw documents: each raw metadata shard read into the normalized document schema (one parquet per shard)."""

import dagster as dg

from assets.metadata import bullets, per_second, table
from assets.partitions import single_run, source_shards
from assets.resources import QualityBounds, Storage
from pipelines.data.raw_documents import RawDocuments, RawShard, parse_rate, read_raw_shards


@dg.asset(group_name="sources", partitions_def=source_shards, backfill_policy=single_run, kinds={"parquet"})
def raw_documents(context: dg.AssetExecutionContext, storage: Storage) -> dg.Output[dict[str, RawShard]]:
    """Read each raw shard (MMC4 jsonl/jsonl.zip, LAION parquet, CC-12M tsv); every bad record is counted with its reason."""
    result = read_raw_shards(context.partition_keys, storage.layout, log=context.log.info)
    return dg.Output(result.shards, metadata=_metadata(result), data_version=dg.DataVersion(result.version))


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
    }


@dg.asset_check(asset=raw_documents, description="Share of raw records that parse is above the configured floor.")
def raw_documents_parse_rate(bounds: QualityBounds, raw_documents: dict[str, RawShard]) -> dg.AssetCheckResult:
    rate = parse_rate(raw_documents)
    return dg.AssetCheckResult(passed=rate >= bounds.min_parse_rate, metadata={
        "parse_rate": rate, "floor": bounds.min_parse_rate, "bad_records": sum(m.bad_records for m in raw_documents.values())})
