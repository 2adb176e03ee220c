"""The sample world's metadata: the three source formats, ground truth, eval splits and instruction data.

Written into the watched raw folder, so the world's shards become partitions of ``source_shards``
like any raw shard (this asset registers them, so a run right after it can address them, and reports each as a
materialization of the external ``raw_shards`` asset).
"""

from dataclasses import asdict

import dagster as dg

from assets.metadata import image_preview, table
from assets.partitions import source_shards
from assets.resources import SampleWorld, Storage
from assets.sources import raw_shard_metadata, raw_shards
from pipelines.sample_world.publish import PublishedWorld, publish_world


@dg.asset(group_name="sample_world", kinds={"python"})
def sample_world(context: dg.AssetExecutionContext, storage: Storage, world: SampleWorld) -> dg.Output[PublishedWorld]:
    """Generate the seeded world and write its metadata as MMC4 jsonl.zip, LAION parquet and CC-12M tsv, and its
    instruction data as LLaVA-style JSON."""
    published = publish_world(world.config(), world.shard_sizes(), storage.layout.raw, world.instructions())
    new = [k for k in published.partition_keys if not context.instance.has_dynamic_partition(source_shards.name, k)]
    context.instance.add_dynamic_partitions(source_shards.name, new)
    for key in published.partition_keys:
        context.log_event(dg.AssetMaterialization(raw_shards.key, partition=key,
                                                  metadata=raw_shard_metadata(storage.layout.raw_file(key))))
    return dg.Output(published, metadata=_metadata(published, new), data_version=dg.DataVersion(published.version))


def _metadata(published: PublishedWorld, new: list[str]) -> dict:
    return {
        "pairs": published.pairs,
        "stories": published.stories,
        "images": published.images,
        "shards": table({k: "new partition" if k in new else "existing partition" for k in published.partition_keys},
                        ("shard", "")),
        "eval_items": published.eval_items,
        "instruction_items": published.instruction_items,
        "instruction_file": dg.MetadataValue.path(published.instruction_file),
        "config": {**asdict(published.world), **asdict(published.shards), **asdict(published.instructions)},
        "raw_dir": dg.MetadataValue.path(published.raw_dir),
        "preview": image_preview(published.preview()),
    }
