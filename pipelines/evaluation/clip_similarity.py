"""CLIP score of generated images: how well each image matches the text it was generated from.

CLIPScore as in text-to-image papers (Hessel et al. 2021; torchmetrics' ``CLIPScore``):
``100 * mean(max(cos(image, text), 0))`` over the generated images. The number depends on the
CLIP model that computes it, so every result carries the scorer's label: ``sample_world_tiny_clip``
(the sample world's own tiny scorer, only comparable within the sample world) or the open_clip
model name of a local checkpoint (``ViT-L-14``: comparable with published numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image

from pipelines.data.clip_score import ClipScorer
from pipelines.evaluation.intervals import Estimate, bootstrap_mean


@dataclass(frozen=True)
class ClipScoreResult:
    """``clip_score`` (0..100) of the generated images, and of references drawn from the same texts."""

    clip_score: float
    mean_cosine: float
    count: int
    scorer: str
    reference_clip_score: float | None = None
    """The same score for the ground-truth renderings of the prompts: the number to aim for."""
    scores: tuple[float, ...] = ()
    """Per image, ``100 * max(cos, 0)`` (their mean is ``clip_score``)."""

    def estimate(self) -> Estimate:
        """``clip_score`` with its 95% bootstrap interval over the images."""
        return bootstrap_mean(self.scores)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def scorer_label(scorer: ClipScorer) -> str:
    """``sample_world_tiny_clip`` for a scorer built from a config dict, else its open_clip model name."""
    return "sample_world_tiny_clip" if isinstance(scorer.model_config, dict) else str(scorer.model_config)


def _score(scorer: ClipScorer, images: Sequence[Image.Image], texts: Sequence[str]) -> tuple[float, float, tuple[float, ...]]:
    cosines = scorer.pair_scores(list(images), list(texts))
    per_image = 100 * cosines.clamp(min=0)
    return float(per_image.mean()), float(cosines.mean()), tuple(float(x) for x in per_image)


def clip_score(scorer: ClipScorer, images: Sequence[Image.Image], texts: Sequence[str],
               references: Sequence[Image.Image] | None = None) -> ClipScoreResult:
    """CLIP score of ``images[i]`` against ``texts[i]``; ``references`` (same order) are scored alike."""
    if len(images) != len(texts) or not images:
        raise ValueError(f"clip_score needs as many images as texts (at least one), got {len(images)} and {len(texts)}")
    score, cosine, per_image = _score(scorer, images, texts)
    reference = None
    if references is not None:
        if len(references) != len(texts):
            raise ValueError(f"{len(references)} reference images for {len(texts)} texts")
        reference = _score(scorer, references, texts)[0]
    return ClipScoreResult(score, cosine, len(images), scorer_label(scorer), reference, per_image)
