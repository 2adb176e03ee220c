"""The CLIP scorer and the CLIP scores of every downloaded image against its matched sentence (and a recaptioned
pair's image against its recaption too, so filtering can judge the pair by the text it will be trained on)."""

import dagster as dg

from assets.metadata import per_second
from assets.partitions import single_run, source_shards
from assets.resources import Compute, PretrainedClipScorer, SampleWorldClipScorer, Storage
from pipelines.data.clip_score import ClipScorerManifest
from pipelines.data.clip_scores import ClipScores, ScoredShard, score_shards
from pipelines.data.downloaded_images import DownloadedShard
from pipelines.data.recaptions import RecaptionedShard
from pipelines.training.clip_scorer import provide_clip_scorer


@dg.asset(group_name="models", kinds={"pytorch", "safetensors"})
def clip_scorer(storage: Storage, compute: Compute,
                clip_scorer_source: dg.ResourceParam[SampleWorldClipScorer | PretrainedClipScorer],
                ) -> dg.Output[ClipScorerManifest]:
    """The CLIP model that scores image-text similarity (trained on the sample world, or a local checkpoint)."""
    manifest = provide_clip_scorer(clip_scorer_source.get(), storage.layout.path("clip_scorer"), compute.get())
    return dg.Output(manifest, metadata=_scorer_metadata(manifest), data_version=dg.DataVersion(manifest.version))


def _scorer_metadata(manifest: ClipScorerManifest) -> dict:
    metadata = {"kind": manifest.kind, "threshold": manifest.threshold if manifest.threshold is not None else "none"}
    if manifest.training is not None:
        metadata.update({"final_loss": manifest.training["final_loss"], "training_seconds": manifest.training["seconds"],
                         "training": manifest.training["training"]})
    if manifest.evaluation is not None:
        metadata.update({"roc_auc": manifest.evaluation["roc_auc"], "evaluation": manifest.evaluation})
    return metadata


@dg.asset(group_name="filtering", partitions_def=source_shards, backfill_policy=single_run, kinds={"parquet"})
def clip_scores(
    context: dg.AssetExecutionContext,
    storage: Storage,
    compute: Compute,
    clip_scorer: ClipScorerManifest,
    downloaded_images: dict[str, DownloadedShard],
    recaptions: dict[str, RecaptionedShard],
) -> dg.Output[dict[str, ScoredShard]]:
    """Per downloaded image: similarity to its matched sentence (or caption) and to every sentence of its document;
    for the pairs of recaptioned shards, also to their BLIP-2 recaption."""
    result = score_shards(downloaded_images, recaptions, clip_scorer, storage.layout, compute.get(), log=context.log.info)
    return dg.Output(result.shards, metadata=_scores_metadata(result), data_version=dg.DataVersion(result.version))


def _scores_metadata(result: ClipScores) -> dict:
    below = result.below_threshold()
    return {
        "images_scored": len(result.similarities),
        "pairs_scored_on_recaption": sum(m.on_recaption for m in result.shards.values()),
        "similarity_quantiles": result.quantiles(),
        "scorer_threshold": result.threshold if result.threshold is not None else "none",
        "below_threshold": below if below is not None else "n/a",
        "images_per_second": per_second(len(result.similarities), result.seconds),
    }
