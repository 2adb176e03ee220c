"""Raw documents: each raw metadata shard read into the normalized document schema (one parquet per shard)."""

import time
from collections import Counter

import dagster as dg

from assets.metadata import data_version, file_digest, table
from assets.partitions import single_run, source_shards
from orchestration.resources import QualityBounds, Storage
from pipelines.documents import image_elements, write_documents
from pipelines.errors import BadRecordLog
from pipelines.readers import read_source


@dg.asset(group_name="sources", partitions_def=source_shards, backfill_policy=single_run, kinds={"parquet"})
def raw_documents(context: dg.AssetExecutionContext, storage: Storage) -> dg.Output[dict]:
    """Read each raw shard (MMC4 jsonl/jsonl.zip, LAION parquet, CC-12M tsv); every bad record is counted with its reason."""
    manifests = {}
    bad_examples: list[str] = []
    start = time.perf_counter()
    for key in context.partition_keys:
        source_file = storage.raw_file(key)
        bad = BadRecordLog(keep=20)
        out = storage.partition_path("raw_documents", key, ".parquet")
        kinds: Counter[str] = Counter()
        images = 0

        def counted(documents):
            nonlocal images
            for document in documents:
                kinds[document["kind"]] += 1
                images += len(image_elements(document))
                yield document

        count = write_documents(counted(read_source(source_file, bad)), out)
        manifests[key] = {
            "path": str(out), "source_file": str(source_file), "source_sha256": file_digest(source_file),
            "documents": count, "bad_records": bad.count, "images": images, "kinds": dict(kinds),
        }
        bad_examples += bad.reasons()
        context.log.info(f"{key}: {count} documents, {bad.count} bad records")
    seconds = time.perf_counter() - start
    documents = sum(m["documents"] for m in manifests.values())
    bad_total = sum(m["bad_records"] for m in manifests.values())
    metadata = {
        "documents": documents,
        "bad_records": bad_total,
        "parse_rate": documents / max(1, documents + bad_total),
        "images": sum(m["images"] for m in manifests.values()),
        "documents_per_second": documents / max(seconds, 1e-9),
        "shards": table({k: f"{m['documents']} docs, {m['bad_records']} bad" for k, m in manifests.items()}, ("shard", "")),
        "bad_record_examples": dg.MetadataValue.md("\n".join(f"- `{r}`" for r in bad_examples[:20]) or "_none_"),
    }
    version = data_version({k: m["source_sha256"] for k, m in manifests.items()})
    return dg.Output(manifests, metadata=metadata, data_version=version)


@dg.asset_check(asset=raw_documents, description="Share of raw records that parse is above the configured floor.")
def raw_documents_parse_rate(bounds: QualityBounds, raw_documents: dict) -> dg.AssetCheckResult:
    documents = sum(m["documents"] for m in raw_documents.values())
    bad = sum(m["bad_records"] for m in raw_documents.values())
    rate = documents / max(1, documents + bad)
    return dg.AssetCheckResult(passed=rate >= bounds.min_parse_rate,
                               metadata={"parse_rate": rate, "floor": bounds.min_parse_rate, "bad_records": bad})
