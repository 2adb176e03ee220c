"""The CLIP scorer and the CLIP scores of every downloaded image against its matched sentence (and a recaptioned
pair's image against its recaption too, so filtering can judge the pair by the text it will be trained on)."""

import time

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from assets.download import downloaded_image_bytes
from assets.metadata import data_version
from assets.partitions import single_run, source_shards
from orchestration.resources import PretrainedClipScorer, SampleWorldClipScorer, Storage
from pipelines.clip_score import score_documents
from pipelines.documents import read_documents
from pipelines.recaption import recaptions_mapping

SCORES_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False), pa.field("element_index", pa.int32(), nullable=False),
    pa.field("key", pa.string()), pa.field("matched_text_index", pa.int32()), pa.field("similarity", pa.float32()),
    pa.field("similarities", pa.list_(pa.float32())), pa.field("similarity_recaption", pa.float32()),
])


@dg.asset(group_name="models", kinds={"pytorch", "safetensors"})
def clip_scorer(
    storage: Storage, clip_scorer_source: dg.ResourceParam[SampleWorldClipScorer | PretrainedClipScorer],
) -> dg.Output[dict]:
    """The CLIP model that scores image-text similarity (trained on the sample world, or a local checkpoint)."""
    manifest = clip_scorer_source.build(storage.path("clip_scorer"))
    metadata = {"kind": manifest["kind"], "threshold": manifest["threshold"] if manifest["threshold"] is not None else "none"}
    if "training" in manifest:
        metadata.update({"final_loss": manifest["training"]["final_loss"], "training_seconds": manifest["training"]["seconds"],
                         "training": manifest["training"]["training"]})
    if "evaluation" in manifest:
        metadata.update({"roc_auc": manifest["evaluation"]["roc_auc"], "evaluation": manifest["evaluation"]})
    return dg.Output(manifest, metadata=metadata, data_version=data_version(manifest))


@dg.asset(group_name="filtering", partitions_def=source_shards, backfill_policy=single_run, kinds={"parquet"})
def clip_scores(
    context: dg.AssetExecutionContext,
    storage: Storage,
    clip_scorer_source: dg.ResourceParam[SampleWorldClipScorer | PretrainedClipScorer],
    clip_scorer: dict,
    downloaded_images: dict,
    recaptions: dict,
) -> dg.Output[dict]:
    """Per downloaded image: similarity to its matched sentence (or caption) and to every sentence of its document;
    for the pairs of recaptioned shards, also to their BLIP-2 recaption."""
    scorer = clip_scorer_source.load(clip_scorer)
    manifests = {}
    similarities: list[float] = []
    on_recaption = 0
    start = time.perf_counter()
    for key, download in downloaded_images.items():
        recaptioned = recaptions[key]["path"]  # None where the shard's source is not recaptioned
        captions = recaptions_mapping(pq.read_table(recaptioned).to_pylist()) if recaptioned else None
        rows = list(score_documents(read_documents(download["documents"]), scorer, downloaded_image_bytes(download),
                                    recaptions=captions))
        out = storage.partition_path("clip_scores", key, ".parquet")
        tmp = out.with_name(out.name + ".tmp")
        pq.write_table(pa.Table.from_pylist(rows, schema=SCORES_SCHEMA), tmp)
        tmp.replace(out)
        matched = [r["similarity"] for r in rows if r["similarity"] is not None]
        similarities += matched
        on_recaption += sum(r["similarity_recaption"] is not None for r in rows)
        manifests[key] = {"path": str(out), "images": len(rows), "threshold": clip_scorer["threshold"],
                          "mean_similarity": float(np.mean(matched)) if matched else None, "recaptions": recaptioned}
        context.log.info(f"{key}: scored {len(rows)} images")
    seconds = time.perf_counter() - start
    values = np.asarray(similarities, dtype=np.float64)
    quantiles = {f"p{q}": float(np.quantile(values, q / 100)) for q in (5, 25, 50, 75, 95)} if len(values) else {}
    metadata = {
        "images_scored": len(values),
        "pairs_scored_on_recaption": on_recaption,
        "similarity_quantiles": quantiles,
        "scorer_threshold": clip_scorer["threshold"] if clip_scorer["threshold"] is not None else "none",
        "below_threshold": int((values < clip_scorer["threshold"]).sum()) if clip_scorer["threshold"] is not None else "n/a",
        "images_per_second": len(values) / max(seconds, 1e-9),
    }
    version = data_version(clip_scorer, {k: (m["images"], m["recaptions"]) for k, m in manifests.items()})
    return dg.Output(manifests, metadata=metadata, data_version=version)
