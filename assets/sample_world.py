"""The sample world's metadata: the three source formats, ground truth and eval splits.

Written into the watched raw folder, so the world's shards become partitions of ``source_shards``
like any raw shard (this asset registers them, so a run right after it can address them).
"""

from dataclasses import asdict

import dagster as dg

from assets.metadata import data_version, image_preview, table
from assets.partitions import source_shards
from orchestration.resources import SAMPLE_WORLD_BASE_URL, SampleWorld, Storage
from pipelines.sample_world import write_metadata


@dg.asset(group_name="sample_world", kinds={"python"})
def sample_world(context: dg.AssetExecutionContext, storage: Storage, world: SampleWorld) -> dg.Output[dict]:
    """Generate the seeded world and write its metadata as MMC4 jsonl.zip, LAION parquet and CC-12M tsv."""
    generated = world.generate()
    written = write_metadata(generated, storage.raw_path, SAMPLE_WORLD_BASE_URL,
                             docs_per_shard=world.docs_per_shard, rows_per_shard=world.rows_per_shard)
    keys = [f"{source}/{path.name}" for source in ("mmc4", "laion", "cc12m") for path in written[source]]
    new = [k for k in keys if not context.instance.has_dynamic_partition(source_shards.name, k)]
    context.instance.add_dynamic_partitions(source_shards.name, new)
    config = world.config()
    manifest = {
        "raw_dir": str(storage.raw_path),
        "partition_keys": keys,
        "ground_truth": str(written["ground_truth"][0]),
        "eval": {p.stem: str(p) for p in written["eval"]},
        "config": {**asdict(config), "docs_per_shard": world.docs_per_shard,
                   "rows_per_shard": world.rows_per_shard},
        "images": len(generated.scenes()),
    }
    metadata = {
        "pairs": len(generated.pairs),
        "stories": len(generated.stories),
        "images": manifest["images"],
        "shards": table({k: "new partition" if k in new else "existing partition" for k in keys}, ("shard", "")),
        "eval_items": {name: len(items) for name, items in generated.eval_splits.items()},
        "config": manifest["config"],
        "raw_dir": dg.MetadataValue.path(str(storage.raw_path)),
        "preview": image_preview([(generated.image_bytes(p.image_id), f"{p.text_kind}: {p.text}")
                                  for p in generated.pairs[:3]]),
    }
    return dg.Output(manifest, metadata=metadata, data_version=data_version(manifest["config"]))
