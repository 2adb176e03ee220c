"""Fréchet distance between image sets (FID), on Inception features or, without them, CLIP's.

FID proper needs the Inception-v3 weights of the original TensorFlow release (``pt_inception``
in pytorch-fid); weft never downloads them, so :class:`InceptionFeatures` loads a torchvision
``inception_v3`` state dict from a local path. Without one, :class:`ClipFeatures` embeds images
with the CLIP scorer's open_clip model, and the result is labelled ``clip`` so it is never confused
with FID.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

if TYPE_CHECKING:
    from pipelines.data.clip_score import ClipScorer


class FeatureExtractor(Protocol):
    """Maps a batch of images ``(B, 3, H, W)`` in [0, 1] to features ``(B, F)``."""

    name: str

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


class InceptionFeatures:
    """Pool-3 (2048-d) features of torchvision's Inception-v3, weights from a local file."""

    name = "inception"

    def __init__(self, weights_path: str | Path, device: str | torch.device = "cpu"):
        from torchvision.models import inception_v3

        model = inception_v3(weights=None, aux_logits=True, init_weights=False)
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(f"{weights_path}: not an inception_v3 state dict, missing {missing[:3]}...")
        model.fc = torch.nn.Identity()
        self.model = model.eval().to(device)
        self.device = torch.device(device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images.to(self.device), size=(299, 299), mode="bilinear", align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406], device=self.device).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225], device=self.device).view(1, 3, 1, 1)
        return self.model((x - mean) / std).float()


class ClipFeatures:
    """L2-normalised image embeddings of a :class:`~pipelines.data.clip_score.ClipScorer` (its own preprocessing)."""

    name = "clip"

    def __init__(self, scorer: "ClipScorer"):
        self.scorer = scorer

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        pixels = (images.detach().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        return self.scorer.encode_images([Image.fromarray(p) for p in pixels])


@dataclass(frozen=True)
class FIDResult:
    """A Fréchet distance and the features it was computed on (``inception`` = FID proper)."""

    value: float
    features: str
    num_real: int
    num_generated: int
    low: float | None = None
    high: float | None = None
    """The 95% bootstrap interval (both sets resampled; ``None`` when not computed)."""

    @property
    def label(self) -> str:
        return "FID" if self.features == "inception" else f"FID ({self.features} features, not comparable to FID)"


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` for Gaussians of dimension F.

    The trace of the matrix square root is taken as the sum of square roots of the eigenvalues of
    the symmetric ``S1^(1/2) S2 S1^(1/2)``, which has the same spectrum as ``S1 S2`` and is stable.
    """
    eigvals, eigvecs = np.linalg.eigh(sigma1)
    sqrt_sigma1 = (eigvecs * np.sqrt(np.clip(eigvals, 0, None))) @ eigvecs.T
    middle = sqrt_sigma1 @ sigma2 @ sqrt_sigma1
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt)


def _statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


def fid(
    real: torch.Tensor, generated: torch.Tensor, extractor: FeatureExtractor, batch_size: int = 64,
    resamples: int = 200, seed: int = 0,
) -> FIDResult:
    """Fréchet distance between ``real`` and ``generated`` images, each ``(B, 3, H, W)`` in [0, 1], with a 95%
    percentile-bootstrap interval from ``resamples`` draws of both sets (0: no interval)."""
    if len(real) < 2 or len(generated) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {len(real)} real and {len(generated)} generated")
    features = [torch.cat([extractor(batch) for batch in images.split(batch_size)]).double().cpu().numpy()
                for images in (real, generated)]
    value = frechet_distance(*_statistics(features[0]), *_statistics(features[1]))
    low = high = None
    if resamples:
        rng = np.random.default_rng(seed)
        draws = [frechet_distance(*_statistics(features[0][rng.integers(0, len(features[0]), len(features[0]))]),
                                  *_statistics(features[1][rng.integers(0, len(features[1]), len(features[1]))]))
                 for _ in range(resamples)]
        low, high = (float(q) for q in np.quantile(draws, [0.025, 0.975]))
    return FIDResult(value, extractor.name, len(real), len(generated), low, high)
