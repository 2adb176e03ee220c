"""MMC4's filtering rules, with a reason for every dropped image and document.

Rules, in order (paper defaults; all in :class:`FilterConfig`, recorded in every report):

1. an image whose download failed is dropped (``download``);
2. an image whose CLIP similarity to its matched sentence is below ``min_similarity`` (0.24) is
   dropped (``similarity``); pairs use ``pair_min_similarity`` on the caption instead;
3. at most ``max_images_per_document`` (6) images stay: the most similar ones, in reading order
   (``max_images``);
4. a document left without images is dropped (``no_images``);
5. ``one_image_drop_fraction`` (½) of the interleaved documents left with exactly one image are
   dropped, chosen by a hash of the document id so that every run agrees (``one_image``).

Similarities come from ``scores`` (the CLIP scoring stage: ``(doc_id, element_index) -> sim``) or,
without it, from the source's ``matched_sim``. Dropped images are removed from the document's
elements; its text stays. :class:`FilterReport` holds every drop and the pass rates.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pyarrow as pa

from pipelines.data.documents import IMAGE_STATUS_OK


@dataclass(frozen=True)
class FilterConfig:
    """The thresholds and rules; a similarity threshold of None means "the CLIP scorer's calibrated threshold"
    (the sample world's tiny scorer has its own scale; 0.24 / 0.28 are for CLIP ViT-L/14 and B/32), set with
    :meth:`with_scorer_threshold` before filtering."""

    min_similarity: float | None = 0.24
    """MMC4: keep images with CLIP ViT-L/14 similarity >= 0.24 to their matched sentence."""
    max_images_per_document: int = 6
    drop_documents_without_images: bool = True
    one_image_drop_fraction: float = 0.5
    """Fraction of one-image interleaved documents dropped (deterministically, by doc id hash)."""
    pair_min_similarity: float | None = 0.28
    """Image-text pairs: keep when similarity >= this (DataComp's CLIP B/32 filter uses 0.28)."""
    require_download: bool = True
    """Drop images whose download ``status`` is not ``ok`` (None counts as not downloaded)."""
    hash_salt: str = "weft-mmc4-one-image"

    def __post_init__(self) -> None:
        if not 0.0 <= self.one_image_drop_fraction <= 1.0:
            raise ValueError("one_image_drop_fraction must be in [0, 1]")
        if self.max_images_per_document < 1:
            raise ValueError("max_images_per_document must be >= 1")

    def with_scorer_threshold(self, threshold: float | None) -> "FilterConfig":
        """This config with every None similarity threshold set to the scorer's ``threshold``."""
        unset = [name for name in ("min_similarity", "pair_min_similarity") if getattr(self, name) is None]
        if unset and threshold is None:
            raise ValueError(f"{unset} are null (use the scorer's threshold) but the CLIP scorer has no calibrated threshold")
        return replace(self, **{name: threshold for name in unset})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Drop:
    doc_id: str
    element_index: int | None
    """The image's index in the input document's elements; None when the whole document is dropped."""
    url: str | None
    rule: str
    reason: str


DROPS_SCHEMA = pa.schema([
    pa.field("doc_id", pa.string(), nullable=False), pa.field("element_index", pa.int32()),
    pa.field("url", pa.string()), pa.field("rule", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
])


@dataclass
class FilterReport:
    config: FilterConfig
    documents_in: int = 0
    documents_kept: int = 0
    images_in: int = 0
    images_kept: int = 0
    drops: list[Drop] = field(default_factory=list)

    def rule_counts(self, level: str | None = None) -> dict[str, int]:
        """Drops per rule; ``level`` ``"image"`` or ``"document"`` counts only those records."""
        wanted = {None: (True, False), "image": (True,), "document": (False,)}[level]
        return dict(Counter(d.rule for d in self.drops if (d.element_index is not None) in wanted))

    def metadata(self) -> dict[str, Any]:
        """Pass rates, per-rule counts and the thresholds, for an asset's metadata."""
        return {
            "documents_in": self.documents_in, "documents_kept": self.documents_kept,
            "document_pass_rate": self.documents_kept / self.documents_in if self.documents_in else 0.0,
            "images_in": self.images_in, "images_kept": self.images_kept,
            "image_pass_rate": self.images_kept / self.images_in if self.images_in else 0.0,
            "image_drops_by_rule": self.rule_counts("image"),
            "document_drops_by_rule": self.rule_counts("document"), "config": self.config.to_dict(),
        }

    def drops_table(self) -> pa.Table:
        return pa.Table.from_pylist([asdict(d) for d in self.drops], schema=DROPS_SCHEMA)


def hash_fraction(doc_id: str, salt: str) -> float:
    """A stable number in [0, 1) from the document id (same on every machine and run)."""
    return int.from_bytes(hashlib.sha256(f"{salt}:{doc_id}".encode()).digest()[:8], "big") / 2**64


def filter_document(document: dict[str, Any], config: FilterConfig, scores: Mapping[tuple[str, int], float] | None,
                    report: FilterReport) -> dict[str, Any] | None:
    """Apply the rules to one document; returns the kept document (a new dict) or None."""
    doc_id = document["doc_id"]
    pair = document["kind"] == "pair"
    threshold = config.pair_min_similarity if pair else config.min_similarity
    elements = document["elements"]
    candidates: list[tuple[int, float]] = []
    for index, element in enumerate(elements):
        if element["type"] != "image":
            continue
        report.images_in += 1
        url = element.get("url")
        if config.require_download and element.get("status") != IMAGE_STATUS_OK:
            report.drops.append(Drop(doc_id, index, url, "download", f"download status {element.get('status')!r}: {element.get('error')}"))
            continue
        sim = scores.get((doc_id, index)) if scores is not None else element.get("matched_sim")
        if sim is None:
            report.drops.append(Drop(doc_id, index, url, "similarity", "no similarity score"))
            continue
        if sim < threshold:
            report.drops.append(Drop(doc_id, index, url, "similarity", f"similarity {sim:.4f} < {threshold}"))
            continue
        candidates.append((index, float(sim)))
    if len(candidates) > config.max_images_per_document:
        ranked = sorted(candidates, key=lambda c: (-c[1], c[0]))
        for index, sim in ranked[config.max_images_per_document:]:
            report.drops.append(Drop(doc_id, index, elements[index].get("url"), "max_images",
                                     f"similarity {sim:.4f} not among the {config.max_images_per_document} highest"))
        candidates = sorted(ranked[: config.max_images_per_document])
    kept = {index for index, _ in candidates}
    if not kept and config.drop_documents_without_images:
        report.drops.append(Drop(doc_id, None, None, "no_images", "no image left"))
        return None
    if (not pair and len(kept) == 1 and config.one_image_drop_fraction > 0
            and hash_fraction(doc_id, config.hash_salt) < config.one_image_drop_fraction):
        reason = f"one-image document, id hash below {config.one_image_drop_fraction}"
        (index,) = kept
        report.drops.append(Drop(doc_id, index, elements[index].get("url"), "one_image", reason))
        report.drops.append(Drop(doc_id, None, None, "one_image", reason))
        return None
    new_elements = []
    for index, element in enumerate(elements):
        if element["type"] == "image":
            if index not in kept:
                continue
            if scores is not None:  # the kept image carries the score it was filtered on
                element = dict(element, matched_sim=float(scores[(doc_id, index)]))
        new_elements.append(element)
    out = dict(document, elements=new_elements)
    report.images_kept += len(kept)
    return out


def filter_documents(
    documents: Iterable[dict[str, Any]],
    config: FilterConfig = FilterConfig(),
    *,
    scores: Mapping[tuple[str, int], float] | None = None,
    report: FilterReport | None = None,
) -> Iterator[dict[str, Any]]:
    """Kept documents (see module docstring); pass a :class:`FilterReport` to collect drops and rates."""
    if config.min_similarity is None or config.pair_min_similarity is None:
        raise ValueError("a similarity threshold is null: set it with FilterConfig.with_scorer_threshold first")
    report = report if report is not None else FilterReport(config)
    for document in documents:
        report.documents_in += 1
        kept = filter_document(document, config, scores, report)
        if kept is not None:
            report.documents_kept += 1
            yield kept
