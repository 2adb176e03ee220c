"""Exact scores for the sample world: generated images are parsed back into scenes and compared.

Because every sample-world image is a rendering of a known :class:`Scene`, generation can be
scored attribute by attribute instead of by a learned metric:

- :func:`attribute_accuracy`: of each target object, is there an object in its grid cell
  (position) and does that object have the target's colour, shape and size;
- :func:`segmentation_miou`: mean IoU of the label maps (background, one label per colour, digit)
  of the generated and the target scene, as ControlNet-style seg-to-image evaluation does with a
  segmenter; here the "segmenter" is the exact colour parser.
"""

from __future__ import annotations

import numpy as np

from pipelines.sample_world import Scene, render_segmentation

ATTRIBUTES = ("position", "colour", "shape", "size")


def attribute_accuracy(predicted: Scene, target: Scene) -> float:
    """Fraction of (target object, attribute) pairs the predicted scene gets right, in [0, 1].

    An object is compared with the predicted object in the same grid cell; with none there, all
    four attributes of that target object count as wrong. A target with no objects scores 1 if the
    prediction has none either, else 0.
    """
    if not target.objects:
        return float(not predicted.objects)
    by_cell = {(o.row, o.col): o for o in predicted.objects}
    correct = 0
    for obj in target.objects:
        found = by_cell.get((obj.row, obj.col))
        if found is not None:
            correct += 1 + (found.colour == obj.colour) + (found.shape == obj.shape) + (found.size == obj.size)
    return correct / (len(ATTRIBUTES) * len(target.objects))


def segmentation_miou(predicted: np.ndarray, target: np.ndarray) -> float:
    """Mean IoU over the labels present in either ``(H, W)`` label map (background included)."""
    if predicted.shape != target.shape:
        raise ValueError(f"label maps differ in shape: {predicted.shape} vs {target.shape}")
    ious = []
    for label in np.union1d(np.unique(predicted), np.unique(target)):
        p, t = predicted == label, target == label
        ious.append(np.logical_and(p, t).sum() / np.logical_or(p, t).sum())
    return float(np.mean(ious))


def scene_miou(predicted: Scene, target: Scene, size: int = 64) -> float:
    """:func:`segmentation_miou` of the two scenes' label maps rendered at ``size`` pixels."""
    return segmentation_miou(render_segmentation(predicted, size), render_segmentation(target, size))
