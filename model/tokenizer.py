"""The model's special tokens: ``<BoI>`` and the image placeholder, added to any Hugging Face tokenizer."""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def add_multimodal_tokens(tokenizer: PreTrainedTokenizerBase, boi_token: str, image_token: str) -> tuple[int, int]:
    """Add ``<BoI>`` and the image placeholder as special tokens if missing; return their ids."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (boi_token, image_token) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(boi_token), tokenizer.convert_tokens_to_ids(image_token)
