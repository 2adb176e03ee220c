"""The sample_world stage: a seeded world written into the watched raw folder as MMC4 jsonl.zip, LAION parquet and
CC-12M tsv shards (each a partition, like any raw shard), with its ground truth, held-out eval splits and
instruction data (``instructions/``, LLaVA-style, for the fine-tuning stage)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from pipelines.files import fingerprint
from pipelines.sample_world.formats import ShardSizes, write_metadata
from pipelines.sample_world.images import METADATA_BASE_URL
from pipelines.sample_world.instructions import InstructionConfig
from pipelines.sample_world.world import WorldConfig, generate_world

SOURCES = ("mmc4", "laion", "cc12m")


@dataclass(frozen=True)
class PublishedWorld:
    """Where the world's metadata lies, the world that wrote it and what it holds."""

    world: WorldConfig
    shards: ShardSizes
    raw_dir: str
    partition_keys: list[str]
    """``<source>/<file>`` of every raw shard written."""
    ground_truth: str
    eval_dir: str
    """``<task>.jsonl`` per benchmark and the world's config (``world.json``)."""
    pairs: int
    stories: int
    images: int
    eval_items: dict[str, int]
    instructions: InstructionConfig
    instruction_file: str
    """The LLaVA-style JSON file of instruction items (images beside it)."""
    instruction_items: int

    @property
    def version(self) -> str:
        return fingerprint(asdict(self.world), asdict(self.shards), asdict(self.instructions))

    def preview(self, limit: int = 3) -> list[tuple[bytes, str]]:
        """The first pairs' images (JPEG) with their text as written in the metadata."""
        world = generate_world(self.world)
        return [(world.image_bytes(p.image_id), f"{p.text_kind}: {p.text}") for p in world.pairs[:limit]]


def publish_world(world: WorldConfig, shards: ShardSizes, raw_dir: Path,
                  instructions: InstructionConfig = InstructionConfig()) -> PublishedWorld:
    """Generate ``world`` and write its metadata under ``raw_dir`` (``<source>/<file>``; images named on
    :data:`pipelines.sample_world.images.METADATA_BASE_URL`) and its instruction data (``instructions/``)."""
    generated = generate_world(world)
    written = write_metadata(generated, raw_dir, METADATA_BASE_URL, docs_per_shard=shards.docs_per_shard,
                             rows_per_shard=shards.rows_per_shard, instructions=instructions)
    instruction_file = written["instructions"][0]
    return PublishedWorld(
        world=world, shards=shards, raw_dir=str(raw_dir),
        partition_keys=[f"{source}/{path.name}" for source in SOURCES for path in written[source]],
        ground_truth=str(written["ground_truth"][0]), eval_dir=str(Path(raw_dir) / "eval"),
        pairs=len(generated.pairs), stories=len(generated.stories), images=len(generated.scenes()),
        eval_items={name: len(items) for name, items in generated.eval_splits.items()},
        instructions=instructions, instruction_file=str(instruction_file),
        instruction_items=len(json.loads(instruction_file.read_text())))

