"""Exact sample-world scores: attribute accuracy and segmentation mIoU."""

import numpy as np
import pytest

from pipelines.evaluation.scenes import attribute_accuracy, object_miou, scene_miou, score_scene, segmentation_miou
from pipelines.sample_world import Glyph, Scene, Shape, parse_image, render

TARGET = Scene(objects=(Shape("circle", "red", "large", 0, 0), Shape("square", "blue", "small", 2, 2)))


def test_attribute_accuracy_counts_each_attribute():
    assert attribute_accuracy(TARGET, TARGET) == 1.0
    wrong_colour = Scene(objects=(Shape("circle", "green", "large", 0, 0), TARGET.objects[1]))
    assert attribute_accuracy(wrong_colour, TARGET) == pytest.approx(7 / 8)
    assert attribute_accuracy(Scene(objects=(TARGET.objects[1],)), TARGET) == pytest.approx(4 / 8)
    assert attribute_accuracy(Scene(objects=()), TARGET) == 0.0
    assert attribute_accuracy(Scene(objects=()), Scene(objects=())) == 1.0


def test_attribute_accuracy_of_a_rendered_and_parsed_scene_is_perfect():
    assert attribute_accuracy(parse_image(render(TARGET, 64)), TARGET) == 1.0


def test_segmentation_miou():
    target = np.zeros((4, 4), dtype=np.uint8)
    target[:2, :2] = 1
    predicted = np.zeros_like(target)
    predicted[:2, :1] = 1
    # label 1: IoU 2/4; background: IoU 12/14
    assert segmentation_miou(predicted, target) == pytest.approx((0.5 + 12 / 14) / 2)
    assert segmentation_miou(target, target) == 1.0
    with pytest.raises(ValueError, match="shape"):
        segmentation_miou(target, target[:2])


def test_scene_miou_falls_when_an_object_moves():
    moved = Scene(objects=(Shape("circle", "red", "large", 1, 1), TARGET.objects[1]))
    assert scene_miou(TARGET, TARGET) == 1.0
    assert scene_miou(moved, TARGET) < 0.8


def test_objects_drawn_where_the_target_has_none_count_as_wrong_in_the_strict_accuracy():
    """A canvas cluttered with blobs must not score: every blob in an empty cell is four wrong facts."""
    clutter = Scene(objects=tuple(Shape("circle", "red", "large", r, c) for r in range(3) for c in range(3)))
    score = score_scene(clutter, TARGET)
    assert score.extra_objects == 7
    # right: the red circle (4 facts) and the blue square's position (1) of 8 asked; strict: of 4 x (2 + 7)
    assert score.accuracy == pytest.approx(5 / 8) and score.strict_accuracy == pytest.approx(5 / 36)
    assert score.attributes == {"position": 1.0, "colour": 0.5, "shape": 0.5, "size": 0.5, "digit": None}


def test_breakdown_by_attribute_and_digit():
    target = Scene(objects=TARGET.objects, glyph=Glyph(7, 1, 1))
    wrong_digit = Scene(objects=(Shape("circle", "red", "small", 0, 0),), glyph=Glyph(3, 1, 1))
    score = score_scene(wrong_digit, target)
    assert score.attributes == {"position": 0.5, "colour": 0.5, "shape": 0.5, "size": 0.0, "digit": 0.0}
    assert score_scene(target, target).attributes["digit"] == 1.0


def test_object_miou_leaves_the_background_out():
    blank = Scene(objects=())
    assert object_miou(blank, TARGET) == 0.0 and scene_miou(blank, TARGET) > 0.25  # the background alone scores
    assert object_miou(TARGET, TARGET) == 1.0 and object_miou(blank, blank) == 1.0
