"""Tiny, deterministic inputs for the model tests of the ``tiny`` preset: a BPE tokenizer, coloured squares and
hand-packed interleaved batches (two documents a row) built with the model's own ``encode_document``.

The model tests use these instead of the data stages' shards so that a model test fails for a model bug only.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerFast

from model.batch import InterleavedBatch, encode_document
from pipelines.data.tokenizer import train_bpe_tokenizer

COLOURS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.1, 0.2, 0.9), "yellow": (0.9, 0.9, 0.1)}
CORPUS = [
    f"a {c} square on a white background. then a {d} circle. the {c} square moves left."
    for c in COLOURS
    for d in COLOURS
]


def tiny_tokenizer(vocab_size: int = 200) -> PreTrainedTokenizerFast:
    return train_bpe_tokenizer(CORPUS, vocab_size=vocab_size)


def square_image(colour: str, size: int = 32, offset: int = 0) -> torch.Tensor:
    """``(3, size, size)`` white image with a coloured square; ``offset`` shifts it right."""
    image = torch.ones(3, size, size)
    lo, hi = size // 4, 3 * size // 4
    image[:, lo:hi, lo + offset : hi + offset] = torch.tensor(COLOURS[colour])[:, None, None]
    return image


def tiny_batch(model, seed: int = 0, rows: int = 2, pad_to: int | None = None) -> InterleavedBatch:
    """Rows of two packed documents each: a text-first two-image story, then a one-image caption."""
    generator = torch.Generator().manual_seed(seed)
    names = list(COLOURS)
    size = model.image_size[0]
    all_ids, all_docs, images = [], [], []
    for _ in range(rows):
        c, d = (names[int(i)] for i in torch.randint(len(names), (2,), generator=generator))
        docs = [
            [f"a {c} square", square_image(c, size), f"then a {d} square.", square_image(d, size, offset=2), "the end."],
            [square_image(d, size), f"a {d} square on a white background."],
        ]
        ids, doc_ids = [], []
        for doc_index, elements in enumerate(docs):
            tokens, doc_images = encode_document(
                model.tokenizer, elements, model.boi_token_id, model.image_token_id, model.num_visual_tokens, (size, size)
            )
            ids += tokens
            doc_ids += [doc_index] * len(tokens)
            images += doc_images
        all_ids.append(ids)
        all_docs.append(doc_ids)
    length = max(map(len, all_ids)) if pad_to is None else pad_to
    pad = model.tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids in all_ids])
    document_ids = torch.tensor([docs + [-1] * (length - len(docs)) for docs in all_docs])
    return InterleavedBatch(input_ids=input_ids, document_ids=document_ids, images=torch.stack(images))
