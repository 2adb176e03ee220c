"""VQA accuracy with the official answer normalisation (VQAv2 / OK-VQA / TextVQA evaluation).

An answer is normalised (punctuation, number words to digits, articles dropped, common
contractions restored) and scored against the 10 human answers as the official evaluation does:
for each human answer left out in turn, ``min(1, #matching other answers / 3)``, averaged.
"""

from __future__ import annotations

import re
from typing import Sequence

_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
# Contractions written without the apostrophe, as annotators often type them.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't",
    "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't",
    "hes": "he's", "im": "i'm", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "ive": "i've",
    "lets": "let's", "shes": "she's", "shouldnt": "shouldn't", "thats": "that's", "theres": "there's",
    "theyre": "they're", "theyve": "they've", "wasnt": "wasn't", "werent": "weren't", "whats": "what's",
    "wheres": "where's", "whos": "who's", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're",
    "youve": "you've",
}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_DECIMAL = re.compile(r"(?!<=\d)(\.)(?!\d)")


def normalize_answer(answer: str) -> str:
    """Official-style normalisation: ``"Two dogs."`` -> ``"2 dogs"``, ``"the Cat"`` -> ``"cat"``."""
    text = answer.replace("\n", " ").replace("\t", " ").strip().lower()
    for mark in _PUNCTUATION:
        # A mark touching a space is removed; one inside a token (e.g. "t-shirt") becomes a space,
        # except commas inside numbers ("1,000"), which are removed.
        if f"{mark} " in text or f" {mark}" in text or _COMMA_BETWEEN_DIGITS.search(text):
            text = text.replace(mark, "")
        else:
            text = text.replace(mark, " ")
    text = _PERIOD_NOT_DECIMAL.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBER_WORDS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """Accuracy of one predicted answer against the human answers (usually 10), in [0, 1]."""
    if not human_answers:
        raise ValueError("vqa_accuracy needs at least one human answer")
    predicted = normalize_answer(prediction)
    answers = [normalize_answer(a) for a in human_answers]
    if len(answers) == 1:
        return float(predicted == answers[0])
    scores = []
    for left_out in range(len(answers)):
        matches = sum(1 for j, a in enumerate(answers) if j != left_out and a == predicted)
        scores.append(min(1.0, matches / 3.0))
    return sum(scores) / len(scores)


def mean_vqa_accuracy(predictions: Sequence[str], human_answers: Sequence[Sequence[str]]) -> float:
    """Mean accuracy over questions (the number reported for a VQA benchmark, as a fraction)."""
    if len(predictions) != len(human_answers):
        raise ValueError(f"{len(predictions)} predictions for {len(human_answers)} questions")
    if not predictions:
        raise ValueError("mean_vqa_accuracy needs at least one question")
    return sum(vqa_accuracy(p, a) for p, a in zip(predictions, human_answers)) / len(predictions)
