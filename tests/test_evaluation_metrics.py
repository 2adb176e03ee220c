"""Captioning CIDEr against pycocoevalcap, and VQA accuracy on hand-worked cases."""

import pytest
from pycocoevalcap.cider.cider import Cider

from pipelines.evaluation.cider import cider_d, tokenize_caption
from pipelines.evaluation.vqa import mean_vqa_accuracy, normalize_answer, vqa_accuracy

CANDIDATES = {
    "1": "a red circle above a blue square",
    "2": "a green triangle on the left",
    "3": "two yellow squares",
    "4": "a big purple circle in the middle of the image",
}
REFERENCES = {
    "1": ["a red circle above a blue square", "red circle over a blue square", "a circle that is red above a square"],
    "2": ["a green triangle at the left", "green triangle left side"],
    "3": ["three yellow squares", "yellow squares three of them", "some yellow squares"],
    "4": ["a large purple circle in the centre", "purple circle in the middle"],
}


def test_cider_matches_pycocoevalcap():
    expected_mean, expected_items = Cider().compute_score(
        REFERENCES, {k: [v] for k, v in CANDIDATES.items()}
    )
    mean, per_item = cider_d(CANDIDATES, REFERENCES, tokenize=False)
    assert mean == pytest.approx(expected_mean, rel=1e-9)
    assert [per_item[k] for k in sorted(CANDIDATES)] == pytest.approx(list(expected_items), rel=1e-9)


def test_cider_ranks_a_better_caption_higher():
    worse = dict(CANDIDATES, **{"1": "a dog on a beach"})
    assert cider_d(worse, REFERENCES)[1]["1"] < cider_d(CANDIDATES, REFERENCES)[1]["1"]


def test_cider_input_errors_name_the_problem():
    with pytest.raises(KeyError, match="same ids"):
        cider_d({"1": "x"}, {"2": ["x"]})
    with pytest.raises(ValueError, match="at least one reference"):
        cider_d({"1": "x"}, {"1": []})


def test_tokenize_caption():
    assert tokenize_caption("A Red, round ball.") == "a red round ball"


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("Two dogs.", "2 dogs"),
        ("the Cat", "cat"),
        ("dont know", "don't know"),
        ("1,000", "1000"),
        ("t-shirt", "t shirt"),
        ("3.5", "3.5"),
        ("yes!", "yes"),
    ],
)
def test_normalize_answer(raw, normalized):
    assert normalize_answer(raw) == normalized


def test_vqa_accuracy_hand_cases():
    humans = ["2"] * 3 + ["3"] * 7
    # "2" matches 2 of the other 9 when a "2" is left out (3 times), 3 of 9 otherwise (7 times).
    assert vqa_accuracy("two", humans) == pytest.approx((3 * (2 / 3) + 7 * 1.0) / 10)
    assert vqa_accuracy("3", humans) == 1.0
    assert vqa_accuracy("4", humans) == 0.0
    assert vqa_accuracy("a red ball", ["red ball"]) == 1.0
    assert mean_vqa_accuracy(["3", "4"], [humans, humans]) == 0.5
