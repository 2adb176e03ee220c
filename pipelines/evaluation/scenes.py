"""Exact scores for the sample world: generated images are parsed back into scenes and compared.

Because every sample-world image is a rendering of a known :class:`Scene`, generation can be
scored attribute by attribute instead of by a learned metric:

- :func:`score_scene`: per target object, is there an object in its grid cell (position) and does
  it have the target's colour, shape and size; the digit when the target has one. That accuracy
  alone rewards clutter (parsed noise scores ~0.45: a blob in every cell gets every position right
  and a third of shapes by chance), so a strict accuracy also counts every object drawn in a cell
  the target leaves empty as four wrong facts.
- :func:`object_miou`: mean IoU of the label maps over the object labels (one per colour, and the
  digit) present in either map, background left out — so a blank image scores 0, where an mIoU that
  counts the background gives it ~0.3.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines.sample_world import Scene, render_segmentation

ATTRIBUTES = ("position", "colour", "shape", "size")
BREAKDOWN = (*ATTRIBUTES, "digit")
"""What :attr:`SceneScore.attributes` breaks the accuracy down by."""


@dataclass(frozen=True)
class SceneScore:
    """How well a predicted scene matches its target.

    Attributes:
        accuracy: right (target object, attribute) facts / 4 per target object, in [0, 1].
        strict_accuracy: the same with 4 more wrong facts per predicted object in a cell the target
            leaves empty.
        attributes: per :data:`BREAKDOWN` name, the fraction of target objects that got it right
            (``digit``: 1 or 0 when the target has a digit, else None).
        extra_objects: predicted objects in cells the target leaves empty.
    """

    accuracy: float
    strict_accuracy: float
    attributes: dict[str, float | None]
    extra_objects: int


def score_scene(predicted: Scene, target: Scene) -> SceneScore:
    """Compare ``predicted`` with ``target`` (see :class:`SceneScore`). A target with no objects scores 1 if the
    prediction has none either, else 0."""
    by_cell = {(o.row, o.col): o for o in predicted.objects}
    target_cells = {(o.row, o.col) for o in target.objects}
    extra = sum(cell not in target_cells for cell in by_cell)
    right = dict.fromkeys(ATTRIBUTES, 0)
    for obj in target.objects:
        found = by_cell.get((obj.row, obj.col))
        if found is not None:
            right["position"] += 1
            right["colour"] += found.colour == obj.colour
            right["shape"] += found.shape == obj.shape
            right["size"] += found.size == obj.size
    n = len(target.objects)
    attributes: dict[str, float | None] = {a: (right[a] / n if n else None) for a in ATTRIBUTES}
    attributes["digit"] = None if target.glyph is None else float(predicted.glyph == target.glyph)
    if not n:
        return SceneScore(float(not predicted.objects), float(not predicted.objects), attributes, extra)
    facts = sum(right.values())
    return SceneScore(facts / (len(ATTRIBUTES) * n), facts / (len(ATTRIBUTES) * (n + extra)), attributes, extra)


def attribute_accuracy(predicted: Scene, target: Scene) -> float:
    """:attr:`SceneScore.accuracy` of :func:`score_scene`."""
    return score_scene(predicted, target).accuracy


def segmentation_miou(predicted: np.ndarray, target: np.ndarray, *, background: bool = True) -> float:
    """Mean IoU over the labels present in either ``(H, W)`` label map; ``background=False`` leaves label 0 out
    (and scores 1 when neither map has any other label)."""
    if predicted.shape != target.shape:
        raise ValueError(f"label maps differ in shape: {predicted.shape} vs {target.shape}")
    labels = np.union1d(np.unique(predicted), np.unique(target))
    if not background:
        labels = labels[labels != 0]
        if labels.size == 0:
            return 1.0
    ious = [np.logical_and(predicted == label, target == label).sum() / np.logical_or(predicted == label, target == label).sum()
            for label in labels]
    return float(np.mean(ious))


def scene_miou(predicted: Scene, target: Scene, size: int = 64, *, background: bool = True) -> float:
    """:func:`segmentation_miou` of the two scenes' label maps rendered at ``size`` pixels."""
    return segmentation_miou(render_segmentation(predicted, size), render_segmentation(target, size), background=background)


def object_miou(predicted: Scene, target: Scene, size: int = 64) -> float:
    """:func:`scene_miou` over the object labels only (background left out)."""
    return scene_miou(predicted, target, size, background=False)
