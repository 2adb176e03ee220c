"""The captioner (BLIP-2) and the recaptions of the downloaded pair images, per raw shard.

``recaptions`` captions every downloaded pair of a recaptioned source (CC-12M in the paper, which
recaptioned all of it) *before* filtering: the recaption replaces the pair's alt-text, so the CLIP filter
must judge the pair by the recaption (``clip_scores`` scores both, ``filtered_documents`` picks). Filtering
on the alt-text would drop exactly the good images with bad text that recaptioning is there to rescue.
The output file is named by the captioner's version and the download it reads and holds every caption
made so far: a re-run captions only pairs it has not seen, and a new captioner starts a new file.
Re-filtering does not touch it.
"""

import time

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import Field

from assets.download import downloaded_image_bytes
from assets.metadata import data_version
from assets.partitions import single_run, source_shards
from orchestration.resources import PretrainedCaptioner, SampleWorldCaptioner, Storage
from pipelines.documents import read_documents
from pipelines.errors import BadRecordLog
from pipelines.recaption import CAPTION_FIELD, recaption_documents

RECAPTIONS_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False), pa.field("element_index", pa.int32(), nullable=False),
    pa.field("key", pa.string()), pa.field("caption", pa.string()), pa.field(CAPTION_FIELD, pa.string()),
])


class RecaptionSettings(dg.Config):
    """Which sources' pairs get BLIP-2 captions (the paper recaptions CC-12M; LAION keeps its text)."""

    sources: list[str] = Field(default_factory=lambda: ["cc12m"], description=(
        "Sources whose downloaded pairs are recaptioned; filtering and packing use their recaptions."))


@dg.asset(group_name="models", kinds={"pytorch", "safetensors"})
def captioner(
    storage: Storage, captioner_source: dg.ResourceParam[SampleWorldCaptioner | PretrainedCaptioner],
) -> dg.Output[dict]:
    """The BLIP-2 captioner (the sample world's tiny one, trained here, or a local BLIP-2 directory)."""
    manifest = captioner_source.build(storage.path("captioner"))
    metadata = {"kind": manifest["kind"], "version": manifest["version"][:16],
                "directory": dg.MetadataValue.path(manifest["directory"])}
    if "training" in manifest:
        report = manifest["training"]
        metadata.update({"training_seconds": report["seconds"], "initial_loss": report["initial_loss"],
                         "final_loss": report["final_loss"], "parameters": report["parameters"],
                         "training_pairs": report["pairs"], "training": report["training"]})
    if "evaluation" in manifest:
        evaluation = manifest["evaluation"]
        before, after = evaluation["before"], evaluation["after"]
        metadata.update({
            "evaluated_pairs": evaluation["pairs"],
            "accuracy_before": before["accuracy"], "accuracy_after": after["accuracy"],
            "fact_f1_before": before["fact_f1"], "fact_f1_after": after["fact_f1"],
            "examples": _examples_table([(e["before"], e["after"], e["truth"]) for e in evaluation["examples"]],
                                        ("alt-text", "recaption", "truth")),
        })
    return dg.Output(manifest, metadata=metadata, data_version=dg.DataVersion(manifest["version"][:16]))


@dg.asset(group_name="recaptioning", partitions_def=source_shards, backfill_policy=single_run, kinds={"parquet"})
def recaptions(
    context: dg.AssetExecutionContext,
    config: RecaptionSettings,
    storage: Storage,
    captioner_source: dg.ResourceParam[SampleWorldCaptioner | PretrainedCaptioner],
    captioner: dict,
    downloaded_images: dict,
) -> dg.Output[dict]:
    """BLIP-2 captions of the downloaded pair images of each shard of a recaptioned source (parquet: doc_id,
    element_index, key, caption = source text, caption_blip2). Resumable: captions already made by the
    same captioner for the same download are kept, only new pairs are captioned."""
    model = None
    manifests = {}
    captioned, seconds = 0, 0.0
    skipped = BadRecordLog(keep=20)
    preview: list[tuple[str, str, str]] = []
    for key, download in downloaded_images.items():
        source = key.partition("/")[0]
        if source not in config.sources:
            manifests[key] = {"source": source, "recaptioned": False, "path": None, "documents": 0}
            continue
        version = data_version(captioner["version"], download["output_dir"]).value
        out = storage.partition_path("recaptions", key, f".{version}.parquet")
        done = pq.read_table(out).to_pylist() if out.exists() else []
        seen = {r["doc_id"] for r in done}
        pairs = [d for d in read_documents(download["documents"]) if d["kind"] == "pair"]
        todo = [d for d in pairs if d["doc_id"] not in seen]
        new: list[dict] = []
        if todo:
            model = model or captioner_source.load(captioner)
            start = time.perf_counter()
            new = list(recaption_documents(todo, model, downloaded_image_bytes(download), handler=skipped))
            seconds += time.perf_counter() - start
            tmp = out.with_name(out.name + ".tmp")
            pq.write_table(pa.Table.from_pylist(done + new, schema=RECAPTIONS_SCHEMA), tmp)
            tmp.replace(out)
        captioned += len(new)
        rows = done + new
        preview += [(r["caption"], r[CAPTION_FIELD], r["doc_id"]) for r in rows[: 5 - len(preview)]]
        manifests[key] = {"source": source, "recaptioned": True, "path": str(out),
                          "captioner_version": captioner["version"], "documents": len(rows), "captioned": len(new),
                          "reused": len(rows) - len(new)}
        context.log.info(f"{key}: {len(rows)} pairs recaptioned ({len(new)} new, {len(rows) - len(new)} reused)")
    documents = sum(m["documents"] for m in manifests.values())
    metadata = {
        "documents": documents,
        "captioned": captioned,
        "reused": documents - captioned,
        "skipped_images": skipped.count,
        "images_per_second": captioned / seconds if seconds else 0.0,
        "sources": config.sources,
        "captioner_version": captioner["version"][:16],
        "preview": _examples_table(preview, ("source text", "recaption", "document")),
    }
    version = data_version(captioner["version"], {k: (m["path"], m["documents"]) for k, m in manifests.items()})
    return dg.Output(manifests, metadata=metadata, data_version=version)


def _examples_table(rows: list[tuple[str, str, str]], header: tuple[str, str, str]) -> dg.MetadataValue:
    """A three-column markdown table (``|`` escaped in cells)."""
    lines = [f"| {' | '.join(header)} |", "|---|---|---|"]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines) if rows else "_no pairs recaptioned_")
