"""The sample world's tokenizer: a byte-level BPE trained on the world's texts (the ``tiny`` preset's)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from pipelines.data.tokenizer import TINY_BOI_TOKEN, TINY_IMAGE_TOKEN, train_tokenizer
from pipelines.sample_world.documents import world_texts
from pipelines.sample_world.world import WorldConfig, generate_world


@dataclass(frozen=True)
class WorldTokenizer:
    """A byte-level BPE of ``vocab_size`` tokens trained on ``world``'s texts, plus the two image tokens."""

    world: WorldConfig
    vocab_size: int = 510
    """BPE tokens with ``<unk> <s> </s> <pad>``; the image tokens come on top (510 + 2 = the tiny preset's 512)."""
    boi_token: str = TINY_BOI_TOKEN
    image_token: str = TINY_IMAGE_TOKEN

    def build(self) -> PreTrainedTokenizerBase:
        return train_tokenizer(world_texts(generate_world(self.world)), vocab_size=self.vocab_size,
                               boi_token=self.boi_token, image_token=self.image_token)

    def describe(self) -> dict[str, Any]:
        return {"kind": "sample_world_bpe", "vocab_size": self.vocab_size, "world": asdict(self.world),
                "boi_token": self.boi_token, "image_token": self.image_token}
