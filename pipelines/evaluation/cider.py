"""CIDEr-D for captioning, computed like the COCO caption toolkit (pycocoevalcap) does.

Differences from pycocoevalcap are only in what surrounds the score: captions are tokenized in
Python (:func:`tokenize_caption`, lower case, punctuation removed) instead of by the Java PTB
tokenizer, and per-item scores come back with the corpus score. The score itself follows the
toolkit, quirks included, so numbers are comparable with published ones: document frequencies are
taken over the references of the evaluated set, n-gram vectors are TF-IDF weighted, the
candidate's weights are clipped by the reference's, a Gaussian penalty (sigma 6) applies to the
length difference, where "length" is the toolkit's count of *bigrams*, and the mean over n = 1..4
and over references is scaled by 10.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Mapping, Sequence

_PUNCTUATION = re.compile(r"[^\w\s]")


def tokenize_caption(text: str) -> str:
    """Lower-case, drop punctuation, collapse whitespace: ``"A red, round ball."`` -> ``"a red round ball"``."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def _ngram_counts(sentence: str, n: int) -> Counter:
    words = sentence.split()
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def cider_d(
    candidates: Mapping[str, str],
    references: Mapping[str, Sequence[str]],
    *,
    n: int = 4,
    sigma: float = 6.0,
    tokenize: bool = True,
) -> tuple[float, dict[str, float]]:
    """Corpus CIDEr-D of ``candidates`` against ``references``.

    Args:
        candidates: item id -> one generated caption.
        references: item id -> ground-truth captions (same ids as ``candidates``).
        tokenize: apply :func:`tokenize_caption` first (pass False for pre-tokenized text).

    Returns:
        ``(mean score, {item id: score})``; scores are on the toolkit's scale (x10).
    """
    missing = set(candidates) ^ set(references)
    if missing:
        raise KeyError(f"candidates and references must have the same ids; differing: {sorted(missing)[:5]}")
    if not candidates:
        raise ValueError("cider_d needs at least one candidate")
    prepare = tokenize_caption if tokenize else (lambda s: s)
    ids = sorted(candidates)
    cand = {i: _ngram_counts(prepare(candidates[i]), n) for i in ids}
    refs = {i: [_ngram_counts(prepare(r), n) for r in references[i]] for i in ids}
    if any(not r for r in refs.values()):
        raise ValueError("every item needs at least one reference caption")

    document_frequency: Counter = Counter()
    for item_refs in refs.values():
        document_frequency.update({g for r in item_refs for g in r})
    log_items = math.log(len(ids))

    def tfidf(counts: Counter) -> tuple[list[dict], list[float], int]:
        vectors: list[dict] = [{} for _ in range(n)]
        norms = [0.0] * n
        for gram, tf in counts.items():
            weight = tf * (log_items - math.log(max(1.0, document_frequency[gram])))
            vectors[len(gram) - 1][gram] = weight
            norms[len(gram) - 1] += weight * weight
        bigrams = sum(tf for gram, tf in counts.items() if len(gram) == 2)
        return vectors, [math.sqrt(x) for x in norms], bigrams

    scores = {}
    for i in ids:
        vec_c, norm_c, len_c = tfidf(cand[i])
        total = 0.0
        for ref in refs[i]:
            vec_r, norm_r, len_r = tfidf(ref)
            penalty = math.exp(-((len_c - len_r) ** 2) / (2 * sigma**2))
            for k in range(n):
                dot = sum(min(w, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, w in vec_c[k].items())
                if norm_c[k] != 0 and norm_r[k] != 0:
                    dot /= norm_c[k] * norm_r[k]
                total += dot * penalty
        scores[i] = total / n / len(refs[i]) * 10.0
    return sum(scores.values()) / len(scores), scores
