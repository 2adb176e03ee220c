"""How right a caption of a sample-world scene is: exact match and the facts it states.

A caption is *correct* when it equals the scene's true caption (:func:`pipelines.sample_world.caption`)
after :func:`normalize_caption`; ``fact_f1`` gives partial credit over the (size, colour, shape, position)
and (digit, position) facts a caption states.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence

import numpy as np

from pipelines.sample_world.scenes import COLOURS, SHAPES, SIZES

_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})
_POSITIONS = "top left|top right|bottom left|bottom right|top|bottom|left|right|center|middle"
_OBJECT = re.compile(rf"\b({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) (?:in|at) the ({_POSITIONS})\b")
_DIGIT = re.compile(rf"\bdigit (\d) at the ({_POSITIONS})\b")


def normalize_caption(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def caption_facts(text: str) -> set[tuple[str, ...]]:
    """The facts a caption states: ``(size, colour, shape, position)`` per object, ``("digit", d, position)``."""
    norm = normalize_caption(text)
    facts = {m.groups() for m in _OBJECT.finditer(norm)}
    facts |= {("digit", *m.groups()) for m in _DIGIT.finditer(norm)}
    return facts


def caption_scores(predictions: Sequence[str], truths: Sequence[str]) -> dict[str, float]:
    """``accuracy``: fraction with ``normalize_caption(prediction) == normalize_caption(truth)``;
    ``fact_f1``: mean per-caption F1 of :func:`caption_facts` against the truth's facts."""
    if len(predictions) != len(truths) or not truths:
        raise ValueError("need as many predictions as truths, at least one")
    exact, f1 = [], []
    for prediction, truth in zip(predictions, truths):
        exact.append(normalize_caption(prediction) == normalize_caption(truth))
        got, want = caption_facts(prediction), caption_facts(truth)
        hit = len(got & want)
        f1.append(0.0 if not hit else 2 * hit / (len(got) + len(want)))
    return {"accuracy": float(np.mean(exact)), "fact_f1": float(np.mean(f1)), "n": len(truths)}


