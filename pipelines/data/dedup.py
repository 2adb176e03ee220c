"""Dedup of documents across shards and sources: exact image URLs, then the downloaded images' content (sha256 of the
bytes, and a perceptual hash within a Hamming distance), with a reason for every drop.

:func:`dedup_documents` is a generator over documents with its state in a :class:`DedupIndex`, so one index over
many shards (taken in a stable order) deduplicates all of them: the first occurrence wins, later ones are dropped.
Per image element, in order:

1. ``duplicate_url``: its URL was seen before (in this or an earlier document);
2. ``duplicate_image``: its bytes' sha256 was seen before (the same file behind another URL; the download's
   ``sha256`` of the original bytes, else the stored bytes');
3. ``near_duplicate_image``: its perceptual hash is within ``phash_max_distance`` bits of one seen before (a
   re-encoded or resized copy), when that is set.

A pair that loses its image is dropped (``pair_without_image``); an interleaved document that loses every image is
dropped (``no_images``, as the filter drops one without images); other documents keep their text and other images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pipelines.data.filtering import Drop
from pipelines.data.image_hashes import HammingIndex, content_sha256, hash_hex, perceptual_hash

INTERLEAVED_FIRST = ("mmc4", "obelics", "omnicorpus", "mint1t", "laion", "cc12m")


@dataclass(frozen=True)
class DedupConfig:
    """Which copy of a duplicate is kept and what counts as one."""

    source_priority: tuple[str, ...] = INTERLEAVED_FIRST
    """Shards are deduplicated source by source in this order (sources not named after them, by name), each shard's
    documents in their order: the first occurrence is kept. Interleaved sources first: an image dropped from a
    pair loses a pair, one dropped from a document loses part of its context."""
    phash_max_distance: int | None = 4
    """Images whose 64-bit perceptual hashes differ in at most this many bits are one image (re-encoded, resized);
    None: exact copies only (URL and sha256)."""

    def __post_init__(self) -> None:
        if self.phash_max_distance is not None and not 0 <= self.phash_max_distance < 64:
            raise ValueError(f"phash_max_distance must be None or in [0, 64), got {self.phash_max_distance}")


@dataclass
class DedupIndex:
    """What has been seen so far (keep one across shards for cross-shard dedup)."""

    config: DedupConfig = DedupConfig()
    urls: dict[str, str] = field(default_factory=dict)
    """url -> doc_id of its first use."""
    sha256: dict[str, tuple[str, str]] = field(default_factory=dict)
    """image sha256 -> (url, doc_id) of its first appearance."""
    phash: HammingIndex[tuple[str, str]] | None = None
    """perceptual hash -> (url, doc_id) of its first appearance (None: not matched)."""

    def __post_init__(self) -> None:
        if self.phash is None and self.config.phash_max_distance is not None:
            self.phash = HammingIndex(self.config.phash_max_distance)


@dataclass(frozen=True)
class ImageHash:
    """A kept image's identity, for later stages (decontamination) to reuse."""

    doc_id: str
    key: str | None
    url: str
    sha256: str | None
    phash: str | None
    """16 hex digits; None when the image has no bytes or does not decode."""


def shard_order(keys: Iterable[str], source_priority: tuple[str, ...]) -> list[str]:
    """Partition keys (``<source>/<file>``) in dedup order: by the source's place in ``source_priority`` (others
    after, by name), then by file name."""
    rank = {source: i for i, source in enumerate(source_priority)}
    return sorted(keys, key=lambda k: (rank.get(k.partition("/")[0], len(rank)), k))


def dedup_documents(
    documents: Iterable[dict[str, Any]],
    index: DedupIndex,
    on_drop: Callable[[Drop], None],
    *,
    images: Mapping[str, bytes] | None = None,
    on_hash: Callable[[ImageHash], None] | None = None,
) -> Iterator[dict[str, Any]]:
    """Drop image elements whose URL or content was seen before (see the module docstring); ``images`` maps an
    element's download ``key`` to its bytes (content dedup needs them). Each drop goes to ``on_drop`` with its rule
    and reason, each kept image's hashes to ``on_hash``; ``index`` carries the state across calls."""
    images = images or {}
    for document in documents:
        doc_id = document["doc_id"]
        kept: list[dict[str, Any]] = []
        hashes: list[ImageHash] = []
        n_images = 0
        for position, element in enumerate(document["elements"]):
            if element["type"] != "image":
                kept.append(element)
                continue
            n_images += 1
            data = images.get(element.get("key") or "")
            drop, identity = _duplicate(element, doc_id, data, index)
            if drop is not None:
                on_drop(Drop(doc_id, position, element["url"], *drop))
                continue
            kept.append(element)
            hashes.append(identity)
        n_kept = sum(e["type"] == "image" for e in kept)
        if n_kept < n_images and document["kind"] == "pair":
            on_drop(Drop(doc_id, None, None, "pair_without_image", "its image was a duplicate"))
            continue
        if n_images and not n_kept:
            on_drop(Drop(doc_id, None, None, "no_images", "every image was a duplicate"))
            continue
        for identity in hashes:
            if on_hash is not None:
                on_hash(identity)
        yield {**document, "elements": kept} if n_kept < n_images else document


def _duplicate(element: dict[str, Any], doc_id: str, data: bytes | None,
               index: DedupIndex) -> tuple[tuple[str, str] | None, ImageHash | None]:
    """``((rule, reason), None)`` for a duplicate, else ``(None, its ImageHash)`` after recording it as seen."""
    url = element["url"]
    if url in index.urls:
        return ("duplicate_url", f"first used by {index.urls[url]}"), None
    index.urls[url] = doc_id
    digest = element.get("sha256") or (content_sha256(data) if data is not None else None)
    if digest is not None and digest in index.sha256:
        first_url, first_doc = index.sha256[digest]
        return ("duplicate_image", f"same sha256 as {first_url} in {first_doc}"), None
    phash = perceptual_hash(data) if data is not None else None
    if phash is not None and index.phash is not None:
        near = index.phash.nearest(phash)
        if near is not None:
            (first_url, first_doc), distance = near
            return ("near_duplicate_image", f"perceptual hash {distance} bits from {first_url} in {first_doc}"), None
    if digest is not None:
        index.sha256[digest] = (url, doc_id)
    if phash is not None and index.phash is not None:
        index.phash.add(phash, (url, doc_id))
    return None, ImageHash(doc_id, element.get("key"), url, digest, hash_hex(phash))
