"""The text tokenizer of the data stages: a BPE trained on the sample world (tiny preset) or the
LLM's own tokenizer from a local directory (paper preset), always with the model's image tokens.

Token names come from the model's config (``LanguageConfig.boi_token`` / ``image_token``; the tiny
preset uses ``<BoI>`` and ``<image>``, the paper preset ``<|beginofimage|>`` and ``<|image|>``), and
the tokens are added with :func:`model.tokenizer.add_multimodal_tokens`, the same function the
model uses, so the ids the packer writes are the ids the model reads.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from model.tokenizer import add_multimodal_tokens, train_bpe_tokenizer
from pipelines.sample_world.world import SampleWorld

TINY_BOI_TOKEN = "<BoI>"
TINY_IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class TokenIds:
    """The ids the packer needs; ``pad`` is what collate writes after the last document."""

    bos: int
    eos: int
    pad: int
    boi: int
    image: int


def world_texts(world: SampleWorld) -> list[str]:
    """Every text of the sample world's training sources: pair texts, true captions, story sentences."""
    texts: list[str] = []
    for pair in world.pairs:
        texts.append(pair.text)
        texts.append(pair.caption)
    for story in world.stories:
        texts.extend(story.sentences)
    return texts


def train_tokenizer(
    texts: Iterable[str],
    out_dir: str | os.PathLike | None = None,
    *,
    vocab_size: int = 510,
    boi_token: str = TINY_BOI_TOKEN,
    image_token: str = TINY_IMAGE_TOKEN,
) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE on ``texts`` and add ``<BoI>`` and the image placeholder.

    ``vocab_size`` counts the BPE (with ``<unk> <s> </s> <pad>``); the two image tokens come on top
    (510 + 2 = the tiny preset's 512). With ``out_dir`` the tokenizer is saved there as a Hugging
    Face tokenizer directory (written to a temporary sibling and renamed, so a reader never sees a
    half-written one) and loads back with :func:`load_tokenizer` or ``AutoTokenizer``.
    """
    tokenizer = train_bpe_tokenizer(texts, vocab_size=vocab_size)
    add_multimodal_tokens(tokenizer, boi_token, image_token)
    if out_dir is not None:
        save_tokenizer(tokenizer, out_dir)
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> Path:
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_tokenizer(
    path: str | os.PathLike, *, boi_token: str = TINY_BOI_TOKEN, image_token: str = TINY_IMAGE_TOKEN
) -> PreTrainedTokenizerBase:
    """A local tokenizer directory (ours or an LLM's), with the image tokens added if it lacks them."""
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    add_multimodal_tokens(tokenizer, boi_token, image_token)
    return tokenizer


def token_ids(
    tokenizer: PreTrainedTokenizerBase, *, boi_token: str = TINY_BOI_TOKEN, image_token: str = TINY_IMAGE_TOKEN
) -> TokenIds:
    """Special-token ids, checked: a tokenizer without ``<s>``/``</s>`` or the image tokens is refused."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (boi_token, image_token) if t not in vocab]
    if missing:
        raise ValueError(f"tokenizer lacks {missing}; load it with load_tokenizer() or add_multimodal_tokens()")
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError("tokenizer needs bos (<s>) and eos (</s>) tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TokenIds(tokenizer.bos_token_id, tokenizer.eos_token_id, pad, vocab[boi_token], vocab[image_token])
