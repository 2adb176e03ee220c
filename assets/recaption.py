"""The captioner (BLIP-2) and the recaptions of the downloaded pair images, per raw shard.

``recaptions`` captions every downloaded pair of a recaptioned source before filtering: a recaptioned pair is
judged by the CLIP filter and trained on its recaption (see :mod:`pipelines.data.recaptions`).
"""

import dagster as dg

from assets.metadata import per_second, wide_table
from assets.partitions import single_run, source_shards
from assets.resources import Compute, PretrainedCaptioner, SampleWorldCaptioner, Storage
from assets.settings import stage_fields
from pipelines.data.downloaded_images import DownloadedShard
from pipelines.data.recaption import CaptionerManifest
from pipelines.data.recaptions import RecaptionedShard, Recaptions, RecaptionSources, recaption_shards
from pipelines.training.captioner import provide_captioner


class RecaptionSettings(stage_fields(RecaptionSources)):
    """Which sources' pairs get BLIP-2 captions (:class:`pipelines.data.recaptions.RecaptionSources`)."""


@dg.asset(group_name="models", kinds={"pytorch", "safetensors"})
def captioner(storage: Storage, compute: Compute,
              captioner_source: dg.ResourceParam[SampleWorldCaptioner | PretrainedCaptioner],
              ) -> dg.Output[CaptionerManifest]:
    """The BLIP-2 captioner (the sample world's tiny one, trained here, or a local BLIP-2 directory)."""
    manifest = provide_captioner(captioner_source.get(), storage.layout.path("captioner"), compute.get())
    return dg.Output(manifest, metadata=_captioner_metadata(manifest), data_version=dg.DataVersion(manifest.version[:16]))


def _captioner_metadata(manifest: CaptionerManifest) -> dict:
    metadata = {"kind": manifest.kind, "version": manifest.version[:16], "directory": dg.MetadataValue.path(manifest.directory)}
    if manifest.training is not None:
        report = manifest.training
        metadata.update({"training_seconds": report["seconds"], "initial_loss": report["initial_loss"],
                         "final_loss": report["final_loss"], "parameters": report["parameters"],
                         "training_pairs": report["pairs"], "training": report["training"]})
    if manifest.evaluation is not None:
        evaluation = manifest.evaluation
        before, after = evaluation["before"], evaluation["after"]
        metadata.update({
            "evaluated_pairs": evaluation["pairs"],
            "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
            "fact_f1_before": before["fact_f1"], "fact_f1_after": after["fact_f1"],
            "examples": wide_table([(e["before"], e["after"], e["truth"]) for e in evaluation["examples"]],
                                   ("alt-text", "recaption", "truth"), "_no pairs recaptioned_"),
        })
    return metadata


@dg.asset(group_name="recaptioning", partitions_def=source_shards, backfill_policy=single_run, kinds={"parquet"})
def recaptions(
    context: dg.AssetExecutionContext,
    config: RecaptionSettings,
    storage: Storage,
    compute: Compute,
    captioner: CaptionerManifest,
    downloaded_images: dict[str, DownloadedShard],
) -> dg.Output[dict[str, RecaptionedShard]]:
    """BLIP-2 captions of the downloaded pair images of each shard of a recaptioned source (parquet: doc_id,
    element_index, key, caption = source text, caption_blip2). Resumable: captions already made by the
    same captioner for the same download are kept, only new pairs are captioned."""
    result = recaption_shards(downloaded_images, captioner, config.to(RecaptionSources), storage.layout, compute.get(),
                              log=context.log.info)
    return dg.Output(result.shards, metadata=_recaptions_metadata(result), data_version=dg.DataVersion(result.version))


def _recaptions_metadata(result: Recaptions) -> dict:
    return {
        "documents": result.documents,
        "captioned": result.captioned,
        "reused": result.documents - result.captioned,
        "skipped_images": result.skipped_images,
        "images_per_second": per_second(result.captioned, result.seconds) if result.seconds else 0.0,
        "sources": list(result.sources),
        "captioner_version": result.captioner_version[:16],
        "preview": wide_table(result.examples, ("source text", "recaption", "document"), "_no pairs recaptioned_"),
    }
