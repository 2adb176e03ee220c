"""Decontamination: training data checked against the evaluation splits before packing, so that no score is earned
on an item the model was trained on.

An image is an evaluation image when its bytes have the same sha256 or, with ``image_max_distance`` set, its
perceptual hash (:mod:`pipelines.data.image_hashes`) lies within that many bits of one (a re-encoded or resized
copy). A text is contaminated when it holds at least ``min_overlap`` of an evaluation text's word n-grams (PaLM's
rule: 8-grams, 70%), words lower-cased and stripped of punctuation; an evaluation text shorter than ``ngram`` words is
matched as a whole, one shorter than ``min_words`` not at all (too generic to tell).

:func:`decontaminate_documents` removes contaminated elements with their reason: an evaluation image
(``eval_image``), a contaminated text (``eval_text``); a pair that loses its image or its text is dropped
(``pair_contaminated``), an interleaved document that loses every image is dropped (``no_images``).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from pipelines.data.filtering import Drop
from pipelines.data.image_hashes import HammingIndex, content_sha256, perceptual_hash


@dataclass(frozen=True)
class DecontaminationConfig:
    """How close training data may come to the evaluation splits."""

    ngram: int = 8
    """Words per n-gram of the text match (PaLM's contamination study uses 8)."""
    min_overlap: float = 0.7
    """A training text is contaminated by an evaluation text when it holds at least this share of the evaluation
    text's n-grams."""
    min_words: int = 6
    """Evaluation texts of fewer words are not matched ("What colour is the square?" is in any corpus)."""
    image_max_distance: int | None = 4
    """A training image within this many bits of an evaluation image's 64-bit perceptual hash is that image;
    None: byte-identical copies only (sha256)."""

    def __post_init__(self) -> None:
        if self.ngram < 1 or self.min_words < 1:
            raise ValueError("ngram and min_words must be >= 1")
        if not 0.0 < self.min_overlap <= 1.0:
            raise ValueError(f"min_overlap must be in (0, 1], got {self.min_overlap}")
        if self.image_max_distance is not None and not 0 <= self.image_max_distance < 64:
            raise ValueError(f"image_max_distance must be None or in [0, 64), got {self.image_max_distance}")


@dataclass(frozen=True)
class EvaluationImage:
    split: str
    item: str
    sha256: str
    phash: int | None


@dataclass(frozen=True)
class EvaluationText:
    split: str
    item: str
    text: str


@dataclass(frozen=True)
class EvaluationSplits:
    """What training data must not contain: the images and texts of the evaluation splits."""

    name: str
    images: tuple[EvaluationImage, ...]
    texts: tuple[EvaluationText, ...]

    @classmethod
    def build(cls, name: str, images: Iterable[tuple[str, str, bytes]],
              texts: Iterable[tuple[str, str, str]]) -> EvaluationSplits:
        """From ``(split, item, encoded image)`` and ``(split, item, text)`` records."""
        return cls(name, tuple(EvaluationImage(s, i, content_sha256(data), perceptual_hash(data)) for s, i, data in images),
                   tuple(EvaluationText(s, i, t) for s, i, t in texts))

    def describe(self) -> dict[str, Any]:
        """The splits' name and per split its image and text counts."""
        counts: dict[str, dict[str, int]] = {}
        for kind, records in (("images", self.images), ("texts", self.texts)):
            for split, n in Counter(r.split for r in records).items():
                counts.setdefault(split, {"images": 0, "texts": 0})[kind] = n
        return {"name": self.name, "splits": counts}


class EvaluationSplitsSource(Protocol):
    """Where the evaluation splits come from (the sample world's, :mod:`pipelines.sample_world.contamination`, or
    real benchmarks on local disk, :mod:`pipelines.evaluation.contamination`)."""

    def build(self) -> EvaluationSplits:
        ...


def words(text: str) -> list[str]:
    """Lower-cased words without punctuation: what n-grams are made of."""
    return re.findall(r"[^\W_]+", text.lower())


def _grams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i: i + n]) for i in range(len(tokens) - n + 1)}


class Contamination:
    """The evaluation splits indexed for lookups: :meth:`image` and :meth:`text` say why something is an evaluation
    item (None when it is not)."""

    def __init__(self, splits: EvaluationSplits, config: DecontaminationConfig) -> None:
        self.config = config
        self._sha256 = {image.sha256: image for image in splits.images}
        self._phash: HammingIndex[EvaluationImage] | None = None
        if config.image_max_distance is not None:
            self._phash = HammingIndex(config.image_max_distance)
            for image in splits.images:
                if image.phash is not None:
                    self._phash.add(image.phash, image)
        self._texts: list[tuple[EvaluationText, int]] = []  # (text, its number of distinct n-grams)
        self._index: dict[int, dict[tuple[str, ...], list[int]]] = {}  # n -> n-gram -> text positions
        for text in splits.texts:
            tokens = words(text.text)
            if len(tokens) < config.min_words:
                continue
            n = min(config.ngram, len(tokens))
            grams = _grams(tokens, n)
            for gram in grams:
                self._index.setdefault(n, {}).setdefault(gram, []).append(len(self._texts))
            self._texts.append((text, len(grams)))

    @property
    def texts_checked(self) -> int:
        return len(self._texts)

    def image(self, sha256: str | None, phash: int | None) -> str | None:
        if sha256 is not None and sha256 in self._sha256:
            found = self._sha256[sha256]
            return f"same bytes (sha256) as {found.split} {found.item}"
        if phash is not None and self._phash is not None:
            near = self._phash.nearest(phash)
            if near is not None:
                found, distance = near
                return f"perceptual hash {distance} bits from {found.split} {found.item}"
        return None

    def text(self, text: str) -> str | None:
        tokens = words(text)
        best: tuple[float, int] | None = None
        for n, index in self._index.items():
            hits: Counter[int] = Counter()
            for gram in _grams(tokens, n):
                hits.update(index.get(gram, ()))
            for position, count in hits.items():
                overlap = count / self._texts[position][1]
                if overlap >= self.config.min_overlap and (best is None or (overlap, -position) > (best[0], -best[1])):
                    best = (overlap, position)
        if best is None:
            return None
        found = self._texts[best[1]][0]
        n = min(self.config.ngram, len(words(found.text)))
        return f"{best[0]:.0%} of the {n}-grams of {found.split} {found.item}"


def decontaminate_documents(
    documents: Iterable[dict[str, Any]],
    contamination: Contamination,
    on_drop: Callable[[Drop], None],
    *,
    image_hashes: Mapping[str, tuple[str | None, int | None]],
    trained_texts: Mapping[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Documents without their evaluation images and contaminated texts (see the module docstring).

    ``image_hashes`` maps an element's download ``key`` to its ``(sha256, perceptual hash)`` (what the dedup stage
    wrote for every image it kept; an image without one is matched by its element's ``sha256`` alone).
    ``trained_texts`` maps a pair's ``doc_id`` to the text it is trained on instead of its own (a recaption)."""
    trained_texts = trained_texts or {}
    for document in documents:
        doc_id = document["doc_id"]
        kept: list[dict[str, Any]] = []
        for position, element in enumerate(document["elements"]):
            reason = _contaminated(element, doc_id, contamination, image_hashes, trained_texts)
            if reason is None:
                kept.append(element)
            else:
                on_drop(Drop(doc_id, position, element.get("url"), *reason))
        if len(kept) == len(document["elements"]):
            yield document
            continue
        n_images = sum(e["type"] == "image" for e in kept)
        if document["kind"] == "pair":
            on_drop(Drop(doc_id, None, None, "pair_contaminated", "its image or its text is an evaluation item"))
            continue
        if not n_images:
            on_drop(Drop(doc_id, None, None, "no_images", "every image was an evaluation image"))
            continue
        yield {**document, "elements": kept}


def _contaminated(element: dict[str, Any], doc_id: str, contamination: Contamination,
                  image_hashes: Mapping[str, tuple[str | None, int | None]],
                  trained_texts: Mapping[str, str]) -> tuple[str, str] | None:
    if element["type"] == "image":
        sha256, phash = image_hashes.get(element.get("key") or "", (element.get("sha256"), None))
        reason = contamination.image(sha256, phash)
        return None if reason is None else ("eval_image", reason)
    text = trained_texts.get(doc_id, element["text"] or "")
    reason = contamination.text(text)
    if reason is None:
        return None
    return "eval_text", reason + (" (in its recaption, the text it is trained on)" if doc_id in trained_texts else "")
