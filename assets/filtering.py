"""Filtered documents: MMC4's rules over the downloaded documents, with a reason for every drop."""

import time
from typing import Optional

import dagster as dg
import pyarrow.parquet as pq
from pydantic import Field

from assets.metadata import data_version, table
from assets.partitions import single_run, source_shards
from orchestration.resources import QualityBounds, Storage
from pipelines.clip_score import scores_mapping
from pipelines.documents import read_documents, write_documents
from pipelines.filtering import FilterConfig, FilterReport, filter_documents
from pipelines.packing import PAIR_CAPTIONS


class FilterSettings(dg.Config):
    """MMC4's thresholds (``pipelines.filtering.FilterConfig``); written into every output's metadata.

    A similarity threshold set to null means "the CLIP scorer's calibrated threshold" (the sample
    world's tiny scorer has its own scale; 0.24 / 0.28 are for CLIP ViT-L/14 and B/32)."""

    min_similarity: Optional[float] = 0.24
    max_images_per_document: int = 6
    one_image_drop_fraction: float = 0.5
    pair_min_similarity: Optional[float] = 0.28
    pair_caption: str = Field(default="blip2", description=(
        "original | blip2: judge a recaptioned pair by its BLIP-2 recaption or by its source text; "
        "must match packed_sequences' pair_caption, the text the pair is trained on."))

    def judged_by_recaption(self) -> bool:
        if self.pair_caption not in PAIR_CAPTIONS:
            raise ValueError(f"filtered_documents.pair_caption must be one of {PAIR_CAPTIONS}, got {self.pair_caption!r}")
        return self.pair_caption == "blip2"

    def to_config(self, scorer_threshold: Optional[float]) -> FilterConfig:
        return FilterConfig(min_similarity=self._resolve("min_similarity", scorer_threshold),
                            max_images_per_document=self.max_images_per_document,
                            one_image_drop_fraction=self.one_image_drop_fraction,
                            pair_min_similarity=self._resolve("pair_min_similarity", scorer_threshold))

    def _resolve(self, name: str, scorer_threshold: Optional[float]) -> float:
        value = getattr(self, name)
        if value is not None:
            return value
        if scorer_threshold is None:
            raise ValueError(f"{name} is null (use the scorer's threshold) but the CLIP scorer has no calibrated threshold")
        return scorer_threshold


@dg.asset(group_name="filtering", partitions_def=source_shards, backfill_policy=single_run, kinds={"parquet"})
def filtered_documents(
    context: dg.AssetExecutionContext, config: FilterSettings, storage: Storage, downloaded_images: dict,
    clip_scores: dict,
) -> dg.Output[dict]:
    """Keep images similar enough (CLIP score) to their sentence (a recaptioned pair's: to its recaption, with
    ``pair_caption: blip2``), at most N per document, drop imageless documents and half of the one-image ones.
    Every drop is written with its rule and reason."""
    thresholds = {m["threshold"] for m in clip_scores.values()}
    if len(thresholds) > 1:
        raise ValueError(f"clip scores of these shards come from different scorers (thresholds {thresholds}); re-score them")
    settings = config.to_config(thresholds.pop() if thresholds else None)
    by_recaption = config.judged_by_recaption()
    recorded = {**settings.to_dict(), "pair_caption": config.pair_caption}
    version = data_version(recorded)
    manifests = {}
    start = time.perf_counter()
    totals = FilterReport(settings)
    for key, download in downloaded_images.items():
        report = FilterReport(settings)
        out = storage.partition_path("filtered_documents", key, f".{version.value}.parquet")
        scores = scores_mapping(pq.read_table(clip_scores[key]["path"]).to_pylist(), prefer_recaption=by_recaption)
        documents = filter_documents(read_documents(download["documents"]), settings, scores=scores, report=report)
        kept = write_documents(documents, out)
        drops = out.with_name(out.name.replace(".parquet", ".drops.parquet"))
        pq.write_table(report.drops_table(), drops)
        manifests[key] = {"path": str(out), "drops": str(drops), "documents": kept, "thresholds": recorded,
                          "report": report.metadata()}
        totals.documents_in += report.documents_in
        totals.documents_kept += report.documents_kept
        totals.images_in += report.images_in
        totals.images_kept += report.images_kept
        totals.drops += report.drops
        context.log.info(f"{key}: kept {kept} of {report.documents_in} documents")
    summary = totals.metadata()
    seconds = time.perf_counter() - start
    metadata = {
        "documents_in": summary["documents_in"],
        "documents_kept": summary["documents_kept"],
        "document_pass_rate": summary["document_pass_rate"],
        "images_in": summary["images_in"],
        "images_kept": summary["images_kept"],
        "image_pass_rate": summary["image_pass_rate"],
        "image_drops_by_rule": table(summary["image_drops_by_rule"], ("rule", "images")),
        "document_drops_by_rule": table(summary["document_drops_by_rule"], ("rule", "documents")),
        "drop_reasons": dg.MetadataValue.md(
            "\n".join(f"- `{d.doc_id}` {d.rule}: {d.reason}" for d in totals.drops[:15]) or "_none_"),
        "thresholds": recorded,
        "min_similarity": settings.min_similarity,
        "documents_per_second": summary["documents_in"] / max(seconds, 1e-9),
    }
    upstream = {k: (m["documents"], clip_scores[k]["path"]) for k, m in downloaded_images.items()}
    return dg.Output(manifests, metadata=metadata, data_version=data_version(recorded, upstream))


@dg.asset_check(asset=filtered_documents, description="Document pass rate of the filter is within the configured bounds.")
def filtered_documents_pass_rate(bounds: QualityBounds, filtered_documents: dict) -> dg.AssetCheckResult:
    kept = sum(m["report"]["documents_kept"] for m in filtered_documents.values())
    seen = sum(m["report"]["documents_in"] for m in filtered_documents.values())
    rate = kept / max(1, seen)
    passed = bounds.min_filter_pass_rate <= rate <= bounds.max_filter_pass_rate
    return dg.AssetCheckResult(passed=passed, metadata={
        "document_pass_rate": rate, "bounds": [bounds.min_filter_pass_rate, bounds.max_filter_pass_rate]})
