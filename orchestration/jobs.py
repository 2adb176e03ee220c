"""Jobs built from asset selections, with the schedule and the sensor that launch them."""

import os
from pathlib import Path

import dagster as dg
import yaml

from assets.clip import clip_scores
from assets.download import downloaded_images
from assets.filtering import filtered_documents
from assets.partitions import source_shards
from assets.resources import Storage
from assets.sources import raw_documents, raw_shard_metadata, raw_shards

PRESETS_DIR = Path(__file__).parent / "presets"

PARTITION_RANGE_START, PARTITION_RANGE_END = "dagster/asset_partition_range_start", "dagster/asset_partition_range_end"
"""Dagster's documented run tags that make one run cover a range of partitions (``dagster job execute --tags``)."""

# Models and reports are not data: re-filtering never retrains, and the data job stops at the shards. Fine-tuning
# (its instruction shards included) comes after the checkpoint, from data of its own.
MODEL_GROUPS = dg.AssetSelection.groups("training", "finetuning", "evaluation", "ablation")
DATA = dg.AssetSelection.assets(raw_documents).downstream() - MODEL_GROUPS | dg.AssetSelection.groups("packing", "models")

sample_world_data = dg.define_asset_job(
    "sample_world_data",
    selection=DATA,
    description=("Every data asset from raw documents to packed WebDataset shards (with the CLIP scorer, the captioner "
                 "and the tokenizer they use), over a range of raw shards."),
)

sample_world_main = dg.define_asset_job(
    "sample_world_main",
    selection=DATA | dg.AssetSelection.groups("training", "finetuning", "evaluation"),
    description=("The main job: the data graph, then the checkpoint trained on its shards, its fine-tuning on the "
                 "instruction data and the evaluation report (trained vs finetuned vs untrained, with lineage), over a "
                 "range of raw shards."),
)

sample_world_quality = dg.define_asset_job(
    "sample_world_quality",
    selection=sample_world_main.selection,
    description=("The quality recipe (preset sample_world_quality, make quality): the main job's graph on a world of "
                 "thousands of pairs and stories, training on 8 rows a step (~60 min on 2 CPU cores)."),
)

mmfs_ablation = dg.define_asset_job(
    "mmfs_ablation",
    selection=dg.AssetSelection.groups("ablation"),
    description=("Paper Tab. 6(a) on the sample world: per variant (MMFS vs no MMFS vs more visual tokens without) packed "
                 "sequences, a checkpoint and its fine-tuning on the instruction data, then one report (slow: make "
                 "ablation took 35-60 min on 2 CPU cores before fine-tuning was added; make quality-ablation's three "
                 "arms took ~1 h each on one thread)."),
)

refilter = dg.define_asset_job(
    "refilter",
    selection=dg.AssetSelection.assets(filtered_documents).downstream() - MODEL_GROUPS,
    description=("Re-filter the already-downloaded images with the current thresholds (on the scores already made; "
                 "recaptioned pairs are judged by their recaption), deduplicate, decontaminate and re-pack."),
)

ingest = dg.define_asset_job(
    "ingest",
    selection=dg.AssetSelection.assets(raw_documents, downloaded_images),
    description="Read and download one raw shard (launched by the raw-shard sensor).",
)


def partition_range_tags(keys: list[str]) -> dict[str, str]:
    """Tags that make one run cover ``keys[0]...keys[-1]`` (single-run backfill policy)."""
    return {PARTITION_RANGE_START: keys[0], PARTITION_RANGE_END: keys[-1]}


def preset_name() -> str:
    """The preset in use: ``WEFT_PRESET`` (``sample_world`` by default), read when a run is planned."""
    return os.environ.get("WEFT_PRESET", "sample_world")


def preset_run_config(name: str, assets: tuple[str, ...]) -> dict:
    """The op config of run-config preset ``presets/<name>.yaml`` for the given assets."""
    with open(PRESETS_DIR / f"{name}.yaml") as f:
        ops = (yaml.safe_load(f) or {}).get("ops", {})
    return {"ops": {k: v for k, v in ops.items() if k in assets}}


def refilter_schedule(name: str, cron_schedule: str) -> dg.ScheduleDefinition:
    """A schedule of the ``refilter`` job at ``cron_schedule``: one run over every raw shard, once all are
    downloaded (the project's is :data:`weekly_refilter`; a test drives a daemon with an every-minute one)."""

    @dg.schedule(name=name, job=refilter, cron_schedule=cron_schedule, default_status=dg.DefaultScheduleStatus.STOPPED,
                 description=("Re-filter every downloaded shard with the thresholds of the preset in WEFT_PRESET. Off by "
                              "default: it replaces the packed shards training reads, so a lab turns it on (UI toggle "
                              "or `dagster schedule start`) where thresholds change."))
    def _refilter(context: dg.ScheduleEvaluationContext):
        keys = context.instance.get_dynamic_partitions(source_shards.name)
        if not keys:
            return dg.SkipReason("no raw shards registered yet")
        scored = context.instance.get_materialized_partitions(clip_scores.key)  # what re-filtering reads
        missing = [k for k in keys if k not in scored]
        if missing:
            return dg.SkipReason(f"{len(missing)} shards are not downloaded and scored yet (first: {missing[0]})")
        ops = ("filtered_documents", "deduplicated_documents", "decontaminated_documents", "packed_sequences")
        return dg.RunRequest(run_config=preset_run_config(preset_name(), ops), tags=partition_range_tags(keys))

    return _refilter


weekly_refilter = refilter_schedule("weekly_refilter", "0 3 * * 1")


@dg.sensor(job=ingest, minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.STOPPED,
           description=("Adds a partition for each new raw shard in the watched folder, observes it (raw_shards) and "
                        "ingests exactly it. Off by default: the sample world registers its own shards; turn it on to "
                        "watch a real raw folder (a running daemon: `dagster dev` or `dagster-daemon run`)."))
def raw_shard_sensor(context: dg.SensorEvaluationContext, storage: Storage):
    known = set(context.instance.get_dynamic_partitions(source_shards.name))
    layout = storage.layout
    new = [k for k in layout.raw_partition_keys() if k not in known]
    ignored = layout.unrecognised_raw_files()
    if ignored:
        context.log.warning(f"{len(ignored)} files in {layout.raw} are not shards of a known format, ignored: "
                            f"{', '.join(ignored[:5])}")
    if not new:
        return dg.SkipReason(f"no new raw shards in {layout.raw}" + (f" ({len(ignored)} files ignored: "
                                                                    f"{', '.join(ignored[:5])})" if ignored else ""))
    run_config = preset_run_config(preset_name(), ("downloaded_images",))
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=k, run_key=k, run_config=run_config) for k in new],
        dynamic_partitions_requests=[source_shards.build_add_request(new)],
        asset_events=[dg.AssetObservation(raw_shards.key, partition=k, metadata=raw_shard_metadata(layout.raw_file(k)))
                      for k in new],
    )
