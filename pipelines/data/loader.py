"""Reading packed-sequence shards for training: a webdataset pipeline and a collate to the model batch.

Stages (:func:`sequence_dataset`), in webdataset's order:

1. shard list: the shard URLs in a seeded order that changes each epoch and is the same on every
   rank (``detshuffle``), or, with ``resampled=True``, an endless per-worker resampling of shards
   (the multi-node recipe: combine with ``epoch_samples``);
2. ``split_by_node`` then ``split_by_worker`` (not when resampling), so ranks × workers read
   disjoint shards;
3. tar → samples; with ``source_rates``, each sample repeated or dropped to reweight its corpus
   (:func:`reweight_sources`); a sample shuffle buffer, then decode (shuffling before decode keeps the
   buffer small: encoded bytes, not tensors);
4. per sample: ``input_ids``, ``cu_seqlens``, its JSON and the images as ``(3, H, W)`` tensors, plus
   ``loss_mask`` (bool) and ``image_trained`` when the sequence has them (instruction data).

:func:`collate_sequences` pads a list of those into :class:`model.batch.InterleavedBatch`
(``document_ids`` from ``cu_seqlens``, ``-1`` on padding; images in row-major ``<BoI>`` order). When a
sample has a loss mask, the batch gets ``labels`` (``input_ids`` with :data:`NOT_TRAINED` where the mask is
0 and on padding) and ``image_loss_mask`` (the images' ``image_trained``); samples without one count as
trained everywhere. A batch of pretraining sequences has neither: the model's defaults apply.
Rank and world size come from ``torch.distributed`` or the ``RANK``/``WORLD_SIZE`` environment,
as webdataset reads them.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from model.batch import InterleavedBatch, image_to_tensor

NOT_TRAINED = -100
"""``InterleavedBatch.labels`` value of a token that is not a target (the model's ``IGNORE_INDEX``)."""


def _decode_sample(sample: dict[str, Any], image_size: tuple[int, int]) -> dict[str, Any]:
    """A packed row's tensors and images; its ``"json"`` is the row's JSON bytes or, after :func:`reweight_sources`,
    the dict they parse to."""
    info = sample["json"]
    if isinstance(info, (bytes, bytearray)):
        info = json.loads(info)
    extensions = info.get("image_exts") or [info.get("image_ext", "jpg")] * info["num_images"]
    images = []
    for i, ext in enumerate(extensions):
        data = sample[f"{i:03d}.{ext}"]
        images.append(image_to_tensor(Image.open(io.BytesIO(data)), image_size))
    decoded = {
        "__key__": sample["__key__"],
        "__url__": sample.get("__url__"),
        "input_ids": torch.from_numpy(np.load(io.BytesIO(sample["input_ids.npy"])).astype(np.int64)),
        "cu_seqlens": torch.from_numpy(np.load(io.BytesIO(sample["cu_seqlens.npy"])).astype(np.int64)),
        "info": info,
        "images": images,
    }
    if "loss_mask.npy" in sample:
        decoded["loss_mask"] = torch.from_numpy(np.load(io.BytesIO(sample["loss_mask.npy"])).astype(np.bool_))
        decoded["image_trained"] = torch.tensor(info["image_trained"], dtype=torch.bool)
    return decoded


def reweight_sources(samples: Iterable[dict[str, Any]], rates: Mapping[str, float], seed: int) -> Iterator[dict[str, Any]]:
    """Each packed row as many times as its corpus's rate asks: ``rates[source]`` is the expected number of times a
    row of that source is used per epoch (e.g. ``{"mmc4": 0.5, "laion": 2.0}``; unlisted sources 1, 0 drops them).

    A row of documents from several sources gets the mean of their rates. The fractional part is a coin drawn from
    ``blake2b(seed, row key)``, so an epoch (``seed``) repeats and drops the same rows on every rank and on resume,
    and another epoch draws again. Rows must carry their documents' ``sources`` (row format 2,
    :data:`pipelines.data.packing.ROW_FORMAT`); a row without them is a ``ValueError`` naming its shard and key.
    """
    for sample in samples:
        info = json.loads(sample["json"])
        sources = info.get("sources")
        if not sources:
            raise ValueError(f"{sample.get('__url__')}: row {sample['__key__']} has no 'sources': it was packed before "
                             "row format 2; re-run packing to reweight its sources")
        rate = sum(rates.get(source, 1.0) for source in sources) / len(sources)
        digest = hashlib.blake2b(f"{seed}:{sample['__key__']}".encode(), digest_size=8).digest()
        coin = int.from_bytes(digest, "big") / 2**64
        parsed = {**sample, "json": info}  # decoded once: _decode_sample takes the dict as it is
        for _ in range(int(rate) + (coin < rate - int(rate))):
            yield parsed


def sequence_dataset(
    urls: str | Sequence[str],
    *,
    image_size: tuple[int, int],
    resampled: bool = False,
    shuffle_buffer: int = 256,
    seed: int = 0,
    epoch_samples: int | None = None,
    source_rates: Mapping[str, float] | None = None,
    handler=wds.reraise_exception,
) -> wds.DataPipeline:
    """Decoded packed sequences, one dict per sample (see the module docstring).

    ``source_rates``: per corpus, the expected uses of each of its rows per epoch (:func:`reweight_sources`).

    ``epoch_samples`` bounds an epoch per worker (``with_epoch``); required with ``resampled``.
    """
    urls = [urls] if isinstance(urls, str) else list(urls)
    if not urls:
        raise ValueError("no shard URLs")
    if resampled:
        if epoch_samples is None:
            raise ValueError("resampled=True reads forever: set epoch_samples")
        stages = [wds.ResampledShards(urls, seed=seed, deterministic=True)]
    else:
        stages = [wds.SimpleShardList(urls), wds.detshuffle(bufsize=len(urls), initial=len(urls), seed=seed),
                  wds.split_by_node, wds.split_by_worker]
    stages += [wds.tarfile_to_samples(handler=handler)]
    if source_rates:
        stages.append(functools.partial(reweight_sources, rates=dict(source_rates), seed=seed))
    if shuffle_buffer > 1:
        stages.append(wds.shuffle(shuffle_buffer, initial=min(shuffle_buffer, 64), seed=seed))
    stages.append(wds.map(functools.partial(_decode_sample, image_size=tuple(image_size)), handler=handler))
    pipeline = wds.DataPipeline(*stages)
    if epoch_samples is not None:
        pipeline = pipeline.with_epoch(epoch_samples)
    return pipeline


def collate_sequences(samples: Sequence[dict[str, Any]], *, pad_token_id: int, pad_to: int | None = None,
                      image_size: tuple[int, int] | None = None) -> InterleavedBatch:
    """Pad decoded samples to ``pad_to`` (default: the longest) into an :class:`InterleavedBatch`."""
    if not samples:
        raise ValueError("cannot collate an empty batch")
    length = max(int(s["input_ids"].shape[0]) for s in samples)
    if pad_to is not None:
        if pad_to < length:
            raise ValueError(f"a sequence of {length} tokens does not fit pad_to={pad_to}")
        length = pad_to
    input_ids = torch.full((len(samples), length), pad_token_id, dtype=torch.long)
    document_ids = torch.full((len(samples), length), -1, dtype=torch.long)
    images: list[torch.Tensor] = []
    next_doc = 0
    for row, sample in enumerate(samples):
        ids, cu = sample["input_ids"], sample["cu_seqlens"]
        input_ids[row, : ids.shape[0]] = ids
        segment_lengths = (cu[1:] - cu[:-1])
        document_ids[row, : ids.shape[0]] = torch.repeat_interleave(
            torch.arange(next_doc, next_doc + segment_lengths.shape[0]), segment_lengths)
        next_doc += segment_lengths.shape[0]
        images.extend(sample["images"])
    if images:
        stacked = torch.stack(images)
    else:
        h, w = image_size if image_size is not None else (1, 1)
        stacked = torch.zeros((0, 3, h, w))
    if not any("loss_mask" in s for s in samples):
        return InterleavedBatch(input_ids=input_ids, document_ids=document_ids, images=stacked)
    labels = torch.full_like(input_ids, NOT_TRAINED)
    trained_images = []
    for row, sample in enumerate(samples):
        ids = sample["input_ids"]
        mask = sample.get("loss_mask")
        labels[row, : ids.shape[0]] = ids if mask is None else ids.masked_fill(~mask, NOT_TRAINED)
        trained_images.append(sample.get("image_trained", torch.ones(len(sample["images"]), dtype=torch.bool)))
    return InterleavedBatch(input_ids=input_ids, document_ids=document_ids, images=stacked, labels=labels,
                            image_loss_mask=torch.cat(trained_images))


def make_loader(
    urls: str | Sequence[str],
    *,
    batch_size: int,
    image_size: tuple[int, int],
    pad_token_id: int,
    num_workers: int = 0,
    pad_to: int | None = None,
    resampled: bool = False,
    shuffle_buffer: int = 256,
    seed: int = 0,
    epoch_samples: int | None = None,
) -> torch.utils.data.DataLoader:
    """A DataLoader of :class:`InterleavedBatch` es; batching happens in the workers."""
    collate = functools.partial(collate_sequences, pad_token_id=pad_token_id, pad_to=pad_to, image_size=image_size)
    dataset = sequence_dataset(urls, image_size=image_size, resampled=resampled, shuffle_buffer=shuffle_buffer,
                               seed=seed, epoch_samples=epoch_samples)
    dataset = dataset.compose(wds.batched(batch_size, collation_fn=collate, partial=True))
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       persistent_workers=False)


def bench_loader(urls: Sequence[str], *, image_size: tuple[int, int], pad_token_id: int, batch_size: int = 8,
                 num_workers: int = 0, repeats: int = 1) -> dict[str, float]:
    """Samples/s and tokens/s through :func:`make_loader` over ``urls`` (best of ``repeats`` epochs)."""
    best = float("inf")
    samples = tokens = 0
    for _ in range(repeats):
        loader = make_loader(urls, batch_size=batch_size, image_size=image_size, pad_token_id=pad_token_id,
                             num_workers=num_workers, shuffle_buffer=64)
        start = time.perf_counter()
        samples = tokens = 0
        for batch in loader:
            samples += batch.input_ids.shape[0]
            tokens += int((batch.document_ids >= 0).sum())
        best = min(best, time.perf_counter() - start)
    return {"samples": samples, "seconds": best, "samples_per_s": samples / best, "tokens_per_s": tokens / best}
