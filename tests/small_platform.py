"""The small sample world the Dagster platform tests run on (3 raw shards, one per source, ~40 images), with the tiny
scorer and captioner trained for a few steps: small enough that the whole data graph runs in a test, in process
(``test_assets_graph.py``) or in Dagster's own processes (``small_location.py``, the scale-out tests)."""

import dagster as dg

from assets.resources import SampleWorld, SampleWorldCaptioner, SampleWorldClipScorer, SampleWorldImages
from orchestration.definitions import sample_world_resources

WORLD = SampleWorld(n_pairs=16, n_stories=6, n_eval=2, docs_per_shard=8)
FAULTS = {"not_found": 0.08, "server_error": 0.0, "truncated": 0.0, "not_image": 0.04, "transient": 0.0}
"""Permanent faults only, so no retry pass is needed."""


def small_resources(root: str | dg.EnvVar, server_url: str | dg.EnvVar) -> dict:
    """The sample-world resources over :data:`WORLD`, its images served by the server at ``server_url``."""
    return {
        **sample_world_resources(root, WORLD),
        "images": SampleWorldImages(world=WORLD, server_url=server_url, faults=FAULTS),
        "clip_scorer_source": SampleWorldClipScorer(world=WORLD, training={"steps": 10, "batch_size": 32},
                                                    training_pairs=60, training_stories=8),
        # a few steps on a small world: captions are wrong but real model output (not empty)
        "captioner_source": SampleWorldCaptioner(world=WORLD, training={"steps": 40, "batch_size": 16},
                                                 training_pairs=200, captioning={"max_new_tokens": 24}),
    }
