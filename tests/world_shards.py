"""Packed WebDataset shards of a small sample world and the tokenizer they were packed with, for training tests."""

from pathlib import Path

from pipelines.data.packing import PackingConfig, pack_documents
from pipelines.data.shards import ShardIndex, write_shards
from pipelines.data.tokenizer import train_tokenizer
from pipelines.sample_world.documents import world_documents, world_images, world_texts
from pipelines.sample_world.world import WorldConfig, generate_world


def write_world_shards(out: Path, world: WorldConfig, maxcount: int) -> ShardIndex:
    """``out/tokenizer`` and ``out/shards`` (96-token sequences, 8 image tokens: the tiny preset), ``maxcount``
    sequences per shard; returns the shards' index."""
    generated = generate_world(world)
    tokenizer = train_tokenizer(world_texts(generated), out / "tokenizer")
    packing = PackingConfig(max_length=96, num_image_tokens=8, seed=0)
    sequences = pack_documents(world_documents(generated), tokenizer, packing, images=world_images(generated))
    return write_shards((s.to_sample(f"seq{i:06d}") for i, s in enumerate(sequences)), out / "shards",
                        maxcount=maxcount, meta={"packing": packing.to_dict()})
