"""Tokenizer and packed sequences: filtered documents as WebDataset shards of <= 2048-token sequences."""

import io
import tarfile
from collections.abc import Iterator
from dataclasses import asdict

import dagster as dg
import numpy as np
import pyarrow.parquet as pq
from pydantic import Field

from assets.download import downloaded_image_bytes
from assets.metadata import data_version, table
from orchestration.resources import PretrainedTokenizer, QualityBounds, SampleWorldTokenizer, Storage
from pipelines.documents import read_documents
from pipelines.errors import BadRecordLog
from pipelines.packing import PackedSequence, PackingConfig, PackingStats, pack_documents
from pipelines.recaption import recaptions_mapping
from pipelines.shards import read_index, verify_shards, write_shards
from pipelines.tokenizer import load_tokenizer, save_tokenizer, token_ids


@dg.asset(group_name="packing", kinds={"huggingface"})
def tokenizer(storage: Storage, tokenizer_source: dg.ResourceParam[SampleWorldTokenizer | PretrainedTokenizer]) -> dg.Output[dict]:
    """The text tokenizer with the model's image tokens (``<BoI>`` and the image placeholder)."""
    built = tokenizer_source.build()
    out = save_tokenizer(built, storage.path("tokenizer"))
    source = tokenizer_source.describe()
    ids = asdict(token_ids(built, boi_token=source["boi_token"], image_token=source["image_token"]))
    manifest = {"path": str(out), "vocab_size": len(built), "token_ids": ids, "source": source}
    metadata = {"vocab_size": len(built), "token_ids": ids, "source": manifest["source"],
                "path": dg.MetadataValue.path(str(out))}
    return dg.Output(manifest, metadata=metadata, data_version=data_version(manifest))


class PackingSettings(dg.Config):
    """``pipelines.packing.PackingConfig`` plus the shard size; all written into the shard index."""

    max_length: int = 2048
    num_image_tokens: int = 64
    image_after_probability: float = 0.5
    pair_image_first_probability: float = 0.5
    pair_caption: str = Field(default="blip2", description=(
        "original | blip2: a pair's text is its BLIP-2 recaption for the shards the recaptions asset "
        "recaptioned (its `sources`, CC-12M as in the paper), the source text elsewhere."))
    max_images_per_sequence: int | None = Field(default=None, description=(
        "at most this many images in one packed sequence (a document with more continues in the next one); "
        "null: no cap"))
    seed: int = 0
    samples_per_shard: int = 64

    def to_config(self) -> PackingConfig:
        return PackingConfig(max_length=self.max_length, num_image_tokens=self.num_image_tokens,
                             image_after_probability=self.image_after_probability,
                             pair_image_first_probability=self.pair_image_first_probability,
                             pair_caption=self.pair_caption,
                             max_images_per_sequence=self.max_images_per_sequence, seed=self.seed)


@dg.asset(group_name="packing", kinds={"webdataset"})
def packed_sequences(
    context: dg.AssetExecutionContext,
    config: PackingSettings,
    storage: Storage,
    tokenizer: dict,
    filtered_documents: dict,
    downloaded_images: dict,
    recaptions: dict,
) -> dg.Output[dict]:
    """Tokenize and pack every filtered shard's documents and write them as WebDataset tars with an index
    (sample count, bytes, sha256 per shard). With ``pair_caption: blip2`` a pair's text is its recaption
    where its shard was recaptioned. The output folder is named by the inputs' fingerprint, so an
    interrupted run resumes and changed inputs never mix with old shards."""
    settings = config.to_config()
    image_token_names = {k: tokenizer["source"][k] for k in ("boi_token", "image_token")}
    text_tokenizer = load_tokenizer(tokenizer["path"], **image_token_names)
    thresholds = {k: m["thresholds"] for k, m in filtered_documents.items()}
    judged = sorted(k for k, t in thresholds.items() if recaptions[k]["recaptioned"]
                    and t.get("pair_caption", "original") != settings.pair_caption)
    if judged:
        raise ValueError(f"packed_sequences.pair_caption is {settings.pair_caption!r} but filtered_documents judged the "
                         f"recaptioned pairs of {judged} by pair_caption {thresholds[judged[0]].get('pair_caption')!r}: "
                         "set both to the same value (the filter must judge the text the pair is trained on)")
    recaptioned = {k: m for k, m in recaptions.items() if settings.pair_caption == "blip2" and m["recaptioned"]}
    meta = {"packing": settings.to_dict(), "tokenizer": tokenizer["source"], "filter_thresholds": thresholds,
            "documents": {k: m["path"] for k, m in filtered_documents.items()},
            "recaptions": {k: {"path": m["path"], "captioner_version": m["captioner_version"]}
                           for k, m in recaptioned.items()}}
    fingerprint = data_version(meta, config.samples_per_shard).value
    out = storage.path("packed_sequences", fingerprint)
    totals = PackingStats()
    skipped = BadRecordLog(keep=20)

    def sequences() -> Iterator[dict]:
        n = 0
        for key, filtered in sorted(filtered_documents.items()):
            stats = PackingStats()
            images = downloaded_image_bytes(downloaded_images[key])
            captions = (recaptions_mapping(pq.read_table(recaptioned[key]["path"]).to_pylist())
                        if key in recaptioned else None)
            packed: Iterator[PackedSequence] = pack_documents(
                read_documents(filtered["path"]), text_tokenizer, settings, images=images, recaptions=captions,
                stats=stats, handler=skipped, **image_token_names)
            for sequence in packed:
                yield sequence.to_sample(f"{n:09d}")
                n += 1
            for name in ("documents", "documents_skipped", "sequences", "text_tokens", "image_tokens", "images",
                         "images_missing", "split_documents", "forced_splits", "padding_tokens", "seconds"):
                setattr(totals, name, getattr(totals, name) + getattr(stats, name))
            context.log.info(f"{key}: {stats.documents} documents -> {stats.sequences} sequences")

    index = write_shards(sequences(), out, maxcount=config.samples_per_shard, prefix="seq", meta=meta)
    manifest = {"path": str(out), "urls": index.urls(out), "samples": index.samples, "bytes": index.bytes,
                "max_length": settings.max_length, "token_ids": tokenizer["token_ids"], "meta": meta}
    capacity = max(1, totals.sequences * settings.max_length)
    metadata = {
        "sequences": index.samples,
        "documents": totals.documents,
        "tokens": totals.tokens,
        "text_tokens": totals.text_tokens,
        "image_tokens": totals.image_tokens,
        "images": totals.images,
        "images_missing": totals.images_missing,
        "split_documents": totals.split_documents,
        "fill_rate": totals.tokens / capacity,
        "tokens_per_second": totals.tokens / max(totals.seconds, 1e-9),
        "shards": table({s.name: f"{s.samples} samples, {s.bytes} bytes, sha256 {s.sha256[:12]}"
                         for s in index.shards}, ("shard", "")),
        "bytes": index.bytes,
        "filter_thresholds": thresholds,
        "recaptioned_shards": sorted(recaptioned),
        "packing": settings.to_dict(),
        "path": dg.MetadataValue.path(str(out)),
    }
    return dg.Output(manifest, metadata=metadata, data_version=dg.DataVersion(fingerprint))


@dg.asset_check(asset=packed_sequences, blocking=True,
                description="Shards match their index: files, sizes, sha256 and sample counts.")
def packed_sequences_shard_integrity(packed_sequences: dict) -> dg.AssetCheckResult:
    problems = verify_shards(packed_sequences["path"])
    index = read_index(packed_sequences["path"])
    return dg.AssetCheckResult(passed=not problems, metadata={
        "shards": len(index.shards), "samples": index.samples,
        "problems": dg.MetadataValue.md("\n".join(f"- {p}" for p in problems) or "_none_")})


@dg.asset_check(asset=packed_sequences, description="No packed sequence exceeds the token limit (2048).")
def packed_sequences_max_tokens(bounds: QualityBounds, packed_sequences: dict) -> dg.AssetCheckResult:
    longest, sequences = 0, 0
    for url in packed_sequences["urls"]:
        with tarfile.open(url) as tar:
            for member in tar:
                if member.name.endswith(".input_ids.npy"):
                    longest = max(longest, int(np.load(io.BytesIO(tar.extractfile(member).read())).shape[0]))
                    sequences += 1
    return dg.AssetCheckResult(passed=sequences > 0 and longest <= bounds.max_sequence_tokens, metadata={
        "longest_sequence": longest, "limit": bounds.max_sequence_tokens, "sequences": sequences})
