"""Image identity for dedup and decontamination: the sha256 of the bytes (an exact copy) and a perceptual hash (the
same picture re-encoded, resized or recompressed), with an index that finds a hash's near neighbours.

- :func:`perceptual_hash`: the 64-bit DCT hash of ``imagehash.phash`` (32x32 grayscale, low 8x8 frequencies above
  their median), as an ``int``; :func:`hamming` counts the bits two hashes differ in.
- :class:`HammingIndex`: every stored hash within ``max_distance`` bits of a query, without comparing against all
  of them: a 64-bit hash is cut into ``max_distance + 1`` bands, and two hashes that differ in at most
  ``max_distance`` bits agree exactly on at least one band (pigeonhole), so only hashes sharing a band are compared.

A perceptual hash cannot tell apart pictures that differ only in small details on a plain background (the sample
world's 64 px scenes of one small shape share hashes): exact sha256 matching is always on, the perceptual match is
a setting.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Hashable
from typing import Generic, TypeVar

import imagehash
from PIL import Image, UnidentifiedImageError

HASH_BITS = 64
T = TypeVar("T", bound=Hashable)


def content_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def perceptual_hash(data: bytes) -> int | None:
    """The 64-bit pHash of encoded image bytes; None when they do not decode as an image."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return int(str(imagehash.phash(image)), 16)
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def hash_hex(value: int | None) -> str | None:
    """A hash as the 16 hex digits ``imagehash`` prints (and OmniCorpus' ``p_hash`` stores)."""
    return None if value is None else f"{value:016x}"


class HammingIndex(Generic[T]):
    """64-bit hashes with an item each; :meth:`nearest` finds the closest stored hash within ``max_distance`` bits
    (the first stored among equally close ones, so results do not depend on anything but the order of adding)."""

    def __init__(self, max_distance: int) -> None:
        if not 0 <= max_distance < HASH_BITS:
            raise ValueError(f"max_distance must be in [0, {HASH_BITS}), got {max_distance}")
        self.max_distance = max_distance
        bands = max_distance + 1
        edges = [round(i * HASH_BITS / bands) for i in range(bands + 1)]
        self._bands = [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]
        self._tables: list[dict[int, list[int]]] = [{} for _ in self._bands]
        self._entries: list[tuple[int, T]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, value: int, item: T) -> None:
        position = len(self._entries)
        self._entries.append((value, item))
        for table, (shift, mask) in zip(self._tables, self._bands):
            table.setdefault((value >> shift) & mask, []).append(position)

    def nearest(self, value: int) -> tuple[T, int] | None:
        """``(item, distance)`` of the closest stored hash within ``max_distance`` bits, or None."""
        best: tuple[int, int] | None = None  # (distance, position)
        for table, (shift, mask) in zip(self._tables, self._bands):
            for position in table.get((value >> shift) & mask, ()):
                distance = hamming(value, self._entries[position][0])
                if distance <= self.max_distance and (best is None or (distance, position) < best):
                    best = (distance, position)
        return None if best is None else (self._entries[best[1]][1], best[0])
