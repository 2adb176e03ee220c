"""The instruction_sequences stage: LLaVA-style instruction files (:mod:`pipelines.data.instructions`) tokenized and
packed with loss on the answers only (:mod:`pipelines.data.packing`) into WebDataset tars with an index
(:mod:`pipelines.data.shards`): the data of the supervised fine-tuning stage.

The packing settings and the tokenizer are the pretraining shards' (:class:`PackedSequences`), so the fine-tuned
model reads the same sequence length, visual tokens and token ids it was pretrained on. The output folder is named
by the fingerprint of those settings, the tokenizer's version and each instruction file's sha256 (not their paths).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from pipelines.data.errors import BadRecordLog
from pipelines.data.instructions import ImageFolder, InstructionSources, read_instructions
from pipelines.data.layout import DataLayout
from pipelines.data.packed_sequences import PackedSequences, SequenceShardSet, SequenceShards
from pipelines.data.packing import ROW_FORMAT, PackedSequence, PackingConfig, PackingStats, pack_documents
from pipelines.data.shards import write_shards
from pipelines.data.tokenizer import TokenizerManifest
from pipelines.files import fingerprint, sha256, write_json

logger = logging.getLogger(__name__)

COUNTS = "counts.json"
EXTENSIONS = {"JPEG": "jpg", "PNG": "png"}
"""WebDataset extension of an image's format (others: the format's name, lower-cased)."""


@dataclass
class LossCounts:
    """What the fine-tuning trains on: text tokens that are targets and those that are context only (image
    placeholders are neither), and images with and without the diffusion loss."""

    trained_tokens: int = 0
    untrained_tokens: int = 0
    trained_images: int = 0
    untrained_images: int = 0

    def add(self, sequence: PackedSequence, image_token: int) -> None:
        text = sequence.input_ids != image_token
        mask = np.ones(len(sequence), dtype=bool) if sequence.loss_mask is None else sequence.loss_mask.astype(bool)
        trained = int((mask & text).sum())
        self.trained_tokens += trained
        self.untrained_tokens += int(text.sum()) - trained
        flags = sequence.image_trained or [True] * len(sequence.images)
        self.trained_images += sum(flags)
        self.untrained_images += len(flags) - sum(flags)


@dataclass
class InstructionCounts:
    """What reading and packing the instruction files counted (kept beside the shards as ``counts.json``, so a
    re-run that finds the shards complete reports them too)."""

    items: int = 0
    """Items read (each one instruction document)."""
    malformed: int = 0
    """Items reported malformed and skipped."""
    malformed_examples: list[str] = field(default_factory=list)
    """The first malformed items as ``file:index: reason``."""
    stats: PackingStats = field(default_factory=PackingStats)
    losses: LossCounts = field(default_factory=LossCounts)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InstructionCounts":
        return cls(data["items"], data["malformed"], data["malformed_examples"], PackingStats(**data["stats"]),
                   LossCounts(**data["losses"]))


@dataclass(frozen=True)
class InstructionSequences(SequenceShardSet):
    """The packed instruction shards; ``meta`` holds the packing settings, tokenizer, instruction files (sha256) and
    image folder."""

    counts: InstructionCounts


def image_extension(data: bytes) -> str:
    """The WebDataset extension of encoded image bytes, from their format (the header; the name may lie)."""
    with Image.open(io.BytesIO(data)) as image:
        return EXTENSIONS.get(image.format or "", (image.format or "bin").lower())


def pack_instructions(sources: InstructionSources, tokenizer: TokenizerManifest, pretraining: PackedSequences,
                      shards: SequenceShards, layout: DataLayout,
                      log: Callable[[str], None] = logger.info) -> InstructionSequences:
    """Read every instruction file of ``sources`` (relative paths under the raw folder), pack the items as the
    ``pretraining`` shards were packed, with loss on the answers, into
    ``instruction_sequences/<fingerprint>/seq-NNNNNN.tar`` + ``index.json``."""
    files, image_dir = sources.resolve(layout.raw)
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"instruction files not found: {missing}")
    packing = pretraining.packing
    hashes = {str(f): sha256(f) for f in files}
    meta = {"packing": packing.to_dict(), "tokenizer": tokenizer.source, "image_dir": str(image_dir),
            "instructions": hashes}
    # named by what it is made of (settings, the tokenizer's version, the files' content), never by where those lie
    identity = {"packing": packing.to_dict(), "row_format": ROW_FORMAT, "tokenizer": tokenizer.version, "instructions": sorted(hashes.values())}
    out = layout.path("instruction_sequences", fingerprint(identity, shards.samples_per_shard))
    text_tokenizer = tokenizer.load()
    counts, malformed, images = InstructionCounts(), BadRecordLog(keep=20), ImageFolder(image_dir)
    packed = False

    def documents() -> Iterator[dict[str, Any]]:
        for file in files:
            before = malformed.count
            for document in read_instructions(file, image_dir, malformed):
                counts.items += 1
                yield document
            log(f"{file}: read, {malformed.count - before} malformed items skipped")

    def sequences() -> Iterator[dict[str, Any]]:
        nonlocal packed
        packed = True
        for n, sequence in enumerate(pack_documents(documents(), text_tokenizer, packing, images=images,
                                                    stats=counts.stats, handler=malformed,
                                                    boi_token=tokenizer.boi_token, image_token=tokenizer.image_token)):
            counts.losses.add(sequence, tokenizer.token_ids.image)
            yield sequence.to_sample(f"{n:09d}", [image_extension(data) for data in sequence.images])

    index = write_shards(sequences(), out, maxcount=shards.samples_per_shard, prefix="seq", meta=meta)
    if packed or not (out / COUNTS).is_file():
        if not packed:  # complete shards of a run that stopped before writing its counts: count them again
            for _ in sequences():
                pass
        counts.malformed, counts.malformed_examples = malformed.count, malformed.reasons()
        write_json(out / COUNTS, asdict(counts))
    else:  # the shards were complete: nothing was read this time
        counts = InstructionCounts.from_dict(json.loads((out / COUNTS).read_text()))
    return InstructionSequences(str(out), index.urls(out), index.samples, index.bytes, packing, tokenizer.token_ids,
                                index.meta, counts)
