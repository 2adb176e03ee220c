"""Exact sample-world scores: attribute accuracy and segmentation mIoU."""

import numpy as np
import pytest

from pipelines.evaluation.scenes import attribute_accuracy, scene_miou, segmentation_miou
from pipelines.sample_world import Scene, Shape, parse_image, render

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
