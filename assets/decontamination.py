"""Decontaminated documents: the deduplicated training documents without the evaluation splits' images and texts,
checked before packing; what was removed, and why, goes into the packed shards' lineage and the evaluation report."""

import dagster as dg

from assets.metadata import bullets, per_second, table
from assets.resources import BenchmarkEvaluationSplits, SampleWorldEvaluationSplits, Storage
from assets.settings import stage_fields
from pipelines.data.decontaminated_documents import DecontaminatedDocuments, decontaminate_shards
from pipelines.data.decontamination import DecontaminationConfig
from pipelines.data.deduplicated_documents import DeduplicatedDocuments
from pipelines.data.recaptions import RecaptionedShard


class DecontaminationSettings(stage_fields(DecontaminationConfig)):
    """How close training data may come to the evaluation splits: n-gram overlap of texts, perceptual-hash distance
    of images (:class:`pipelines.data.decontamination.DecontaminationConfig`)."""


@dg.asset(group_name="filtering", kinds={"parquet"})
def decontaminated_documents(
    context: dg.AssetExecutionContext,
    config: DecontaminationSettings,
    storage: Storage,
    evaluation_splits: dg.ResourceParam[SampleWorldEvaluationSplits | BenchmarkEvaluationSplits],
    deduplicated_documents: DeduplicatedDocuments,
    recaptions: dict[str, RecaptionedShard],
) -> dg.Output[DecontaminatedDocuments]:
    """Remove from the training documents every image of the evaluation splits (same bytes, or a perceptual hash
    within the configured distance) and every text holding most of an evaluation text's n-grams (a recaptioned
    pair: its recaption); a pair that loses either goes whole. Every removal is written with its reason."""
    result = decontaminate_shards(deduplicated_documents, recaptions, evaluation_splits.get(),
                                  config.to(DecontaminationConfig), storage.layout, log=context.log.info)
    return dg.Output(result, metadata=_metadata(result), data_version=dg.DataVersion(result.version))


def _metadata(result: DecontaminatedDocuments) -> dict:
    counts = result.counts
    return {
        "documents_in": counts.documents_in, "documents_kept": counts.documents_kept,
        "images_in": counts.images_in, "images_kept": counts.images_kept,
        "removed": table(result.drops_by_rule, ("rule", "removals")),
        "removal_examples": bullets(f"`{e}`" for e in result.examples),
        "checked_against": result.splits,
        "eval_texts_checked": result.texts_checked,
        "config": {"ngram": result.config.ngram, "min_overlap": result.config.min_overlap,
                   "min_words": result.config.min_words,
                   "image_max_distance": result.config.image_max_distance if result.config.image_max_distance
                   is not None else "off (sha256 only)"},
        "documents_per_second": per_second(counts.documents_in, result.seconds),
    }
