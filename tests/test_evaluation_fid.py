"""Fréchet distance and FID feature extractors."""

import numpy as np
import pytest
import torch
from scipy import linalg

from pipelines.data.clip_score import ClipScorer
from pipelines.evaluation.fid import ClipFeatures, InceptionFeatures, fid, frechet_distance
from pipelines.training.clip_scorer import tiny_clip_config


def scipy_frechet(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def test_frechet_distance_matches_the_sqrtm_formula():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 6)), rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 1.0
    stats = [(x.mean(0), np.cov(x, rowvar=False)) for x in (a, b)]
    assert frechet_distance(*stats[0], *stats[1]) == pytest.approx(scipy_frechet(*stats[0], *stats[1]), rel=1e-6)
    assert frechet_distance(*stats[0], *stats[0]) == pytest.approx(0.0, abs=1e-8)


class MeanColour:
    """A transparent extractor for testing: mean and std of each channel."""

    name = "mean_colour"

    def __call__(self, images):
        return torch.cat([images.mean((2, 3)), images.std((2, 3))], dim=1)


def test_fid_grows_with_the_distribution_shift():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(64, 3, 8, 8, generator=g)
    same = torch.rand(64, 3, 8, 8, generator=g)
    shifted = (torch.rand(64, 3, 8, 8, generator=g) * 0.5 + 0.5)
    near, far = fid(real, same, MeanColour()), fid(real, shifted, MeanColour())
    assert near.value < far.value
    assert far.label.startswith("FID (mean_colour features")


def test_inception_features_load_from_a_local_file(tmp_path):
    from torchvision.models import inception_v3

    path = tmp_path / "inception.pt"
    torch.save(inception_v3(weights=None, aux_logits=True, init_weights=False).state_dict(), path)
    features = InceptionFeatures(path)(torch.rand(2, 3, 64, 64))
    assert features.shape == (2, 2048)
    bad = tmp_path / "bad.pt"
    torch.save({"conv.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="bad.pt"):
        InceptionFeatures(bad)


def test_clip_feature_fid_is_labelled_and_sees_the_shift():
    torch.manual_seed(0)
    scorer = ClipScorer.from_config(tiny_clip_config(image_size=32, context_length=16))
    g = torch.Generator().manual_seed(1)
    real = torch.rand(6, 3, 32, 32, generator=g)
    dark = torch.rand(6, 3, 32, 32, generator=g) * 0.2
    features = ClipFeatures(scorer)
    assert features(real[:2]).shape == (2, scorer.model.text_projection.shape[1])
    same, shifted = fid(real, real, features), fid(real, dark, features)
    assert same.value == pytest.approx(0.0, abs=1e-6) and shifted.value > 1e-3
    assert shifted.label == "FID (clip features, not comparable to FID)"
