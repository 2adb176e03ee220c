"""The MM-Interleaved model: MMFS, image tokenizer, MMFS-augmented LLM and diffusion decoder.

Light imports only here (configs and the batch contract), so data stages can build batches
without loading transformers/diffusers/open_clip. The model itself:
``from model.mm_interleaved import MMInterleaved``.
"""

from model.batch import InterleavedBatch, document_ids_from_cu_seqlens
from model.config import (
    DecoderConfig,
    LanguageConfig,
    MMFSConfig,
    MMInterleavedConfig,
    ResamplerConfig,
    VisionConfig,
    ViTAdapterConfig,
)

__all__ = [
    "DecoderConfig",
    "InterleavedBatch",
    "LanguageConfig",
    "MMFSConfig",
    "MMInterleavedConfig",
    "ResamplerConfig",
    "VisionConfig",
    "ViTAdapterConfig",
    "document_ids_from_cu_seqlens",
]
