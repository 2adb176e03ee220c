"""Tokenizer helpers: the model's special tokens, and a tiny BPE for offline tests and demos."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast


def add_multimodal_tokens(tokenizer: PreTrainedTokenizerBase, boi_token: str, image_token: str) -> tuple[int, int]:
    """Add ``<BoI>`` and the image placeholder as special tokens if missing; return their ids."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (boi_token, image_token) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return tokenizer.convert_tokens_to_ids(boi_token), tokenizer.convert_tokens_to_ids(image_token)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` (milliseconds for small corpora) with ``<s>``, ``</s>``,
    ``<pad>``, ``<unk>``. For tests and the embedded default until a data-trained tokenizer exists."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(list(texts), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
