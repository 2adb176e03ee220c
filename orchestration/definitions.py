"""The Dagster code location of weft (loaded by ``workspace.yaml``): wiring only.

Two resource sets, chosen by ``WEFT_PRESET`` when Dagster loads the code location (``@dg.definitions``: nothing is
read from the environment at import); everything else comes from run config:

- ``sample_world`` (default): the embedded sample world under ``$WEFT_DATA_ROOT`` (default ``data``), served over
  loopback HTTP, with the tiny BPE tokenizer, CLIP scorer and captioner trained on worlds of other seeds;
- ``sample_world_quality``: the same on a world of 12,000 pairs and 600 stories (default root ``data/quality``), for the quality recipe
  (job ``sample_world_quality``, ``make quality``);
- ``real_data``: raw metadata shards in ``$WEFT_RAW_DIR`` (the sensor's watched folder, laid out as ``mmc4/``,
  ``laion/``, ``cc12m/``), outputs under ``$WEFT_DATA_ROOT``, images fetched from the web, the LLM's tokenizer from
  ``$WEFT_TOKENIZER_DIR``, CLIP ViT-L/14 weights from ``$WEFT_CLIP_CHECKPOINT``, a BLIP-2 directory from
  ``$WEFT_BLIP2_DIR`` (all resolved by Dagster's ``EnvVar`` when a run starts); the benchmarks training data is
  decontaminated against are the ``evaluation_splits`` resource's ``benchmarks`` (none by default: a warning says
  nothing is checked). Op settings: ``orchestration/presets/*.yaml``.

Instance storage is ``$DAGSTER_HOME`` (the project's ``dagster_home/`` in the Makefile); for a cluster
see ``orchestration/presets/dagster_cluster.yaml``.
"""

import os

import dagster as dg

from assets.ablation import (ablation_checkpoints, ablation_finetuned_checkpoints, ablation_instruction_sequences,
                             ablation_sequences, mmfs_ablation_report)
from assets.clip import clip_scorer, clip_scores
from assets.decontamination import decontaminated_documents
from assets.dedup import deduplicated_documents, deduplicated_documents_rate
from assets.download import downloaded_images, downloaded_images_shard_integrity, downloaded_images_success_rate
from assets.evaluation import (
    evaluation_report,
    evaluation_report_beats_untrained,
    evaluation_report_finetuned_beats_baselines,
)
from assets.filtering import filtered_documents, filtered_documents_pass_rate
from assets.finetuning import finetuned_checkpoint, instruction_sequences, instruction_sequences_shard_integrity
from assets.io_manager import ManifestIOManager
from assets.packing import packed_sequences, packed_sequences_max_tokens, packed_sequences_shard_integrity, tokenizer
from assets.recaption import captioner, recaptions
from assets.resources import (
    BenchmarkEvaluationSplits,
    Compute,
    PretrainedCaptioner,
    PretrainedClipScorer,
    PretrainedTokenizer,
    QualityBounds,
    SampleWorld,
    SampleWorldCaptioner,
    SampleWorldClipScorer,
    SampleWorldEvaluationSplits,
    SampleWorldImages,
    SampleWorldTokenizer,
    Storage,
    WebImages,
)
from assets.sample_world import sample_world
from assets.sources import raw_documents, raw_documents_parse_rate, raw_documents_shards_readable, raw_shards
from assets.training import checkpoint
from orchestration.jobs import (
    ingest,
    mmfs_ablation,
    raw_shard_sensor,
    refilter,
    sample_world_data,
    sample_world_main,
    sample_world_quality,
    weekly_refilter,
)

PRESETS = ("sample_world", "sample_world_quality", "real_data")
DATA_ASSETS = [raw_documents, downloaded_images, clip_scorer, clip_scores, filtered_documents, captioner, recaptions,
               deduplicated_documents, decontaminated_documents, tokenizer, packed_sequences, checkpoint,
               instruction_sequences, finetuned_checkpoint]
DATA_CHECKS = [raw_documents_shards_readable, raw_documents_parse_rate, downloaded_images_shard_integrity, downloaded_images_success_rate,
               filtered_documents_pass_rate, deduplicated_documents_rate, packed_sequences_shard_integrity,
               packed_sequences_max_tokens, instruction_sequences_shard_integrity]
# The sample world ships its own benchmarks (and its scenes for the ablation); real benchmarks come with
# their own data, so these assets exist in the sample-world preset only.
SAMPLE_WORLD_EVALUATION = [sample_world, evaluation_report, ablation_sequences, ablation_checkpoints,
                           ablation_instruction_sequences, ablation_finetuned_checkpoints, mmfs_ablation_report]

SAMPLE_WORLD = SampleWorld(n_pairs=240, n_stories=48, docs_per_shard=24, rows_per_shard=200,
                           instruction_kinds=("vqa", "captioning", "grounding", "seg_to_image"))
"""The embedded default's world: small enough that the main job runs in minutes on a laptop CPU. Its fine-tuning (150
steps of one row) writes the first four instruction kinds only: with the text-to-image and story items too (fresh
clone at 0c39a77, 40 items) the fine-tuned model scored CIDEr 0.484 [0.334, 0.673] against 0.881 [0.622, 1.195] and
text-to-image attribute 0.115 [0.073, 0.160] against 0.357 [0.284, 0.429]: its few steps spread over more kinds."""

QUALITY_WORLD = SampleWorld(n_pairs=12000, n_stories=600, n_eval=200, docs_per_shard=150, rows_per_shard=500)
"""The quality recipe's world: thousands of pairs and stories through the same graph, 200 held-out items a task. 12,000
pairs (70% with web alt-texts) leave ~1,460 after filtering and decontamination, half packed caption-first: the
decoder needs thousands of those to learn drawing (orchestration/presets/sample_world_quality.yaml)."""


def sample_world_resources(data_root: str | dg.EnvVar = "data", world: SampleWorld = SAMPLE_WORLD) -> dict:
    storage = Storage(root=data_root)
    return {
        "storage": storage,
        "world": world,
        "images": SampleWorldImages(world=world),
        "tokenizer_source": SampleWorldTokenizer(world=world),
        "clip_scorer_source": SampleWorldClipScorer(world=world),
        "captioner_source": SampleWorldCaptioner(world=world),
        "evaluation_splits": SampleWorldEvaluationSplits(world=world),
        "compute": Compute(),
        "bounds": QualityBounds(),
        "io_manager": ManifestIOManager(storage=storage),
    }


def real_data_resources() -> dict:
    storage = Storage(root=dg.EnvVar("WEFT_DATA_ROOT"), raw_dir=dg.EnvVar("WEFT_RAW_DIR"))
    return {
        "storage": storage,
        "images": WebImages(),
        "tokenizer_source": PretrainedTokenizer(path=dg.EnvVar("WEFT_TOKENIZER_DIR")),
        "clip_scorer_source": PretrainedClipScorer(checkpoint=dg.EnvVar("WEFT_CLIP_CHECKPOINT")),
        "captioner_source": PretrainedCaptioner(path=dg.EnvVar("WEFT_BLIP2_DIR")),
        "evaluation_splits": BenchmarkEvaluationSplits(),
        "compute": Compute(),
        "bounds": QualityBounds(),
        "io_manager": ManifestIOManager(storage=storage),
    }


def build_definitions(preset: str, resources: dict,
                      schedule: dg.ScheduleDefinition = weekly_refilter) -> dg.Definitions:
    """The code location of ``preset`` over ``resources``, re-filtering on ``schedule``."""
    if preset not in PRESETS:
        raise ValueError(f"WEFT_PRESET must be one of {PRESETS}, got {preset!r}")
    if preset != "real_data":
        assets = [raw_shards.merge_attributes(deps=[sample_world]), *DATA_ASSETS, *SAMPLE_WORLD_EVALUATION]
        checks = [*DATA_CHECKS, evaluation_report_beats_untrained, evaluation_report_finetuned_beats_baselines]
        main = sample_world_main if preset == "sample_world" else sample_world_quality
        jobs = [sample_world_data, main, mmfs_ablation, refilter, ingest]
    else:
        assets, checks, jobs = [raw_shards, *DATA_ASSETS], DATA_CHECKS, [refilter, ingest]
    return dg.Definitions(assets=assets, asset_checks=checks, jobs=jobs, schedules=[schedule],
                          sensors=[raw_shard_sensor], resources=resources)


@dg.definitions
def defs() -> dg.Definitions:
    """The code location in the preset ``WEFT_PRESET`` names (read when Dagster loads it)."""
    preset = os.environ.get("WEFT_PRESET", "sample_world")
    if preset == "real_data":
        return build_definitions(preset, real_data_resources())
    quality = preset == "sample_world_quality"
    data_root = dg.EnvVar("WEFT_DATA_ROOT") if "WEFT_DATA_ROOT" in os.environ else "data/quality" if quality else "data"
    return build_definitions(preset, sample_world_resources(data_root, QUALITY_WORLD if quality else SAMPLE_WORLD))
