"""Tokenizer and packed sequences: the filtered, deduplicated and decontaminated documents as WebDataset shards of
sequences of at most ``max_length`` tokens (2048 in the paper, 320 in the sample world's preset)."""

from dataclasses import asdict

import dagster as dg

from assets.metadata import bullets, table
from assets.resources import PretrainedTokenizer, SampleWorldTokenizer, Storage
from assets.settings import stage_fields
from pipelines.data.decontaminated_documents import DecontaminatedDocuments
from pipelines.data.deduplicated_documents import DeduplicatedDocuments
from pipelines.data.downloaded_images import DownloadedShard
from pipelines.data.packed_sequences import (
    PackedSequences,
    SequenceShards,
    pack_shards,
    packing_summary,
    sequence_lengths,
)
from pipelines.data.packing import PackingConfig
from pipelines.data.recaptions import RecaptionedShard
from pipelines.data.shards import read_index, verify_shards
from pipelines.data.tokenizer import TokenizerManifest, provide_tokenizer


@dg.asset(group_name="packing", kinds={"huggingface"})
def tokenizer(storage: Storage, tokenizer_source: dg.ResourceParam[SampleWorldTokenizer | PretrainedTokenizer],
              ) -> dg.Output[TokenizerManifest]:
    """The text tokenizer with the model's image tokens (``<BoI>`` and the image placeholder)."""
    manifest = provide_tokenizer(tokenizer_source.get(), storage.layout.path("tokenizer"))
    metadata = {"vocab_size": manifest.vocab_size, "token_ids": asdict(manifest.token_ids), "source": manifest.source,
                "path": dg.MetadataValue.path(manifest.path)}
    return dg.Output(manifest, metadata=metadata, data_version=dg.DataVersion(manifest.version))


class PackingSettings(stage_fields(PackingConfig, SequenceShards)):
    """How documents become sequences (:class:`pipelines.data.packing.PackingConfig`) and how many go in a tar; all
    written into the shard index."""


@dg.asset(group_name="packing", kinds={"webdataset"})
def packed_sequences(
    context: dg.AssetExecutionContext,
    config: PackingSettings,
    storage: Storage,
    tokenizer: TokenizerManifest,
    deduplicated_documents: DeduplicatedDocuments,
    decontaminated_documents: DecontaminatedDocuments,
    downloaded_images: dict[str, DownloadedShard],
    recaptions: dict[str, RecaptionedShard],
) -> dg.Output[PackedSequences]:
    """Tokenize and pack every shard's filtered, deduplicated and decontaminated documents (a recaptioned pair as its
    recaption) and write them as WebDataset tars with an index (sample count, bytes, sha256 per shard; the lineage:
    thresholds, what dedup and decontamination removed). The output folder is named by the inputs' fingerprint, so an
    interrupted run resumes and changed inputs never mix with old shards."""
    lineage = {"dedup": deduplicated_documents.lineage(), "decontamination": decontaminated_documents.lineage()}
    sequences = pack_shards(decontaminated_documents.shards, downloaded_images, recaptions, tokenizer,
                            config.to(PackingConfig), config.to(SequenceShards), storage.layout, log=context.log.info,
                            lineage=lineage)
    return dg.Output(sequences, metadata=_metadata(sequences), data_version=dg.DataVersion(sequences.version))


def _metadata(sequences: PackedSequences) -> dict:
    summary = packing_summary(sequences)
    index = read_index(sequences.path)
    return {
        "sequences": sequences.samples,
        **{k: summary[k] for k in ("documents", "tokens", "text_tokens", "image_tokens", "images", "images_missing",
                                   "images_after_text", "split_documents", "fill_rate", "tokens_per_second")},
        "shards": table({s.name: f"{s.samples} samples, {s.bytes} bytes, sha256 {s.sha256[:12]}" for s in index.shards},
                        ("shard", "")),
        "bytes": sequences.bytes,
        "filter_thresholds": sequences.filter_thresholds,
        "removed_by_dedup": sequences.meta["dedup"]["drops_by_rule"],
        "removed_by_decontamination": sequences.meta["decontamination"]["removed"],
        "recaptioned_shards": sorted(sequences.meta["recaptions"]),
        "packing": asdict(sequences.packing),
        "path": dg.MetadataValue.path(sequences.path),
    }


@dg.asset_check(asset=packed_sequences, blocking=True,
                description="Shards match their index: files, sizes, sha256 and sample counts.")
def packed_sequences_shard_integrity(packed_sequences: PackedSequences) -> dg.AssetCheckResult:
    return shard_integrity(packed_sequences.path, packed_sequences.samples)


def shard_integrity(path: str, samples: int) -> dg.AssetCheckResult:
    """The shard set at ``path`` against its index (files, sizes, sha256, sample counts): passes with no problem."""
    problems = verify_shards(path)
    return dg.AssetCheckResult(passed=not problems, metadata={
        "shards": len(read_index(path).shards), "samples": samples, "problems": bullets(problems)})


@dg.asset_check(asset=packed_sequences, description=(
    "No packed sequence is longer than the max_length it was packed for (320 tokens in the sample world, 2048 "
    "in the paper)."))
def packed_sequences_max_tokens(packed_sequences: PackedSequences) -> dg.AssetCheckResult:
    lengths = list(sequence_lengths(packed_sequences.urls))
    limit = packed_sequences.packing.max_length
    longest = max(lengths, default=0)
    return dg.AssetCheckResult(passed=bool(lengths) and longest <= limit, metadata={
        "longest_sequence": longest, "limit": limit, "sequences": len(lengths)})
