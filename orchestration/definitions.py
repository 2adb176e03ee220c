"""The Dagster code location of weft (loaded by ``workspace.yaml``).

Two resource sets, chosen by ``WEFT_PRESET`` when the code location loads (the deployment pattern of
Dagster's example projects); everything else comes from run config:

- ``sample_world`` (default): the embedded sample world under ``$WEFT_DATA_ROOT`` (default ``data``),
  served over loopback HTTP, with the tiny BPE tokenizer;
- ``real_data``: raw metadata shards in ``$WEFT_RAW_DIR`` (the sensor's watched folder, laid out as
  ``mmc4/``, ``laion/``, ``cc12m/``), outputs under ``$WEFT_DATA_ROOT``, images fetched from the web,
  the LLM's tokenizer from ``$WEFT_TOKENIZER_DIR``, CLIP ViT-L/14 weights from ``$WEFT_CLIP_CHECKPOINT``. Op settings: ``orchestration/presets/*.yaml``.

Instance storage is ``$DAGSTER_HOME`` (the project's ``dagster_home/`` in the Makefile); for a cluster
see ``orchestration/presets/dagster_cluster.yaml``.
"""

import os

import dagster as dg

from assets.clip import clip_scorer, clip_scores
from assets.download import downloaded_images, downloaded_images_shard_integrity, downloaded_images_success_rate
from assets.filtering import filtered_documents, filtered_documents_pass_rate
from assets.packing import packed_sequences, packed_sequences_max_tokens, packed_sequences_shard_integrity, tokenizer
from assets.sample_world import sample_world
from assets.sources import raw_documents, raw_documents_parse_rate
from orchestration.io_managers import ManifestIOManager
from orchestration.jobs import ingest, raw_shard_sensor, refilter, sample_world_data, weekly_refilter
from orchestration.resources import (
    PretrainedClipScorer, PretrainedTokenizer, QualityBounds, SampleWorld, SampleWorldClipScorer, SampleWorldImages,
    SampleWorldTokenizer, Storage, WebImages,
)

DATA_ASSETS = [raw_documents, downloaded_images, clip_scorer, clip_scores, filtered_documents, tokenizer, packed_sequences]
CHECKS = [raw_documents_parse_rate, downloaded_images_shard_integrity, downloaded_images_success_rate,
          filtered_documents_pass_rate, packed_sequences_shard_integrity, packed_sequences_max_tokens]


def sample_world_resources(data_root: str = "data") -> dict:
    world = SampleWorld()
    storage = Storage(root=data_root)
    return {
        "storage": storage,
        "world": world,
        "images": SampleWorldImages(world=world),
        "tokenizer_source": SampleWorldTokenizer(world=world),
        "clip_scorer_source": SampleWorldClipScorer(world=world),
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
        "bounds": QualityBounds(),
        "io_manager": ManifestIOManager(storage=storage),
    }


def build_definitions(preset: str, resources: dict) -> dg.Definitions:
    assets = [sample_world, *DATA_ASSETS] if preset == "sample_world" else DATA_ASSETS
    return dg.Definitions(
        assets=assets,
        asset_checks=CHECKS,
        jobs=[sample_world_data, refilter, ingest],
        schedules=[weekly_refilter],
        sensors=[raw_shard_sensor],
        resources=resources,
    )


def _load() -> dg.Definitions:
    preset = os.environ.get("WEFT_PRESET", "sample_world")
    if preset == "sample_world":
        return build_definitions(preset, sample_world_resources(os.environ.get("WEFT_DATA_ROOT", "data")))
    if preset == "real_data":
        return build_definitions(preset, real_data_resources())
    raise ValueError(f"WEFT_PRESET must be sample_world or real_data, got {preset!r}")


defs = _load()
