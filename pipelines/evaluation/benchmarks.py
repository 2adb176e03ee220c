"""Readers and runners for real benchmarks kept on local disk (no downloads).

- COCO captions, Karpathy split (``dataset_coco.json``): ``images[{filepath, filename, split,
  cocoid, sentences[{raw}]}]``, images under ``image_root/<filepath>/<filename>``.
- VQAv2 and OK-VQA: a questions file ``{"questions": [{question_id, image_id, question}]}`` and an
  annotations file ``{"annotations": [{question_id, answers[{answer}]}]}``; COCO images found as
  ``image_root/COCO_<split>_<image_id:012d>.jpg`` (``image_pattern`` overrides).
- TextVQA: ``{"data": [{question_id, image_id, question, answers[str]}]}``, images
  ``image_root/<image_id>.jpg``.

Each reader yields small records with an image path; :func:`evaluate_captioning` and
:func:`evaluate_vqa` run them through an interleaved generator and score them with
:mod:`pipelines.evaluation.cider` and :mod:`pipelines.evaluation.vqa`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from PIL import Image

from pipelines.evaluation.cider import cider_d
from pipelines.evaluation.vqa import mean_vqa_accuracy

DEFAULT_VQA_PROMPT = "{question} Answer:"


@dataclass(frozen=True)
class CaptionItem:
    image_id: str
    image_path: Path
    references: tuple[str, ...]


@dataclass(frozen=True)
class VQAItem:
    question_id: str
    image_path: Path
    question: str
    answers: tuple[str, ...]


def _load_json(path: str | Path, key: str) -> list[dict]:
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: not JSON ({error.msg})") from error
    if key not in data:
        raise ValueError(f"{path}: expected a top-level {key!r} list, found keys {sorted(data)[:5]}")
    return data[key]


def read_karpathy_coco(path: str | Path, image_root: str | Path, split: str = "test") -> Iterator[CaptionItem]:
    """COCO Karpathy-split captions of ``split`` (``train``, ``restval``, ``val``, ``test``)."""
    for index, image in enumerate(_load_json(path, "images")):
        if image.get("split") != split:
            continue
        try:
            references = tuple(s["raw"] for s in image["sentences"])
            image_path = Path(image_root) / image.get("filepath", "") / image["filename"]
            image_id = str(image.get("cocoid", image["filename"]))
        except (KeyError, TypeError) as error:
            raise ValueError(f"{path}: images[{index}] lacks {error}") from error
        yield CaptionItem(image_id, image_path, references)


def read_vqa(
    questions_path: str | Path,
    annotations_path: str | Path,
    image_root: str | Path,
    image_pattern: str = "COCO_val2014_{image_id:012d}.jpg",
) -> Iterator[VQAItem]:
    """VQAv2 / OK-VQA questions joined with their human answers by ``question_id``."""
    answers = {
        a["question_id"]: tuple(x["answer"] for x in a["answers"]) for a in _load_json(annotations_path, "annotations")
    }
    for index, q in enumerate(_load_json(questions_path, "questions")):
        if q.get("question_id") not in answers:
            raise ValueError(f"{questions_path}: questions[{index}] (id {q.get('question_id')}) has no annotation")
        image = Path(image_root) / image_pattern.format(image_id=q["image_id"])
        yield VQAItem(str(q["question_id"]), image, q["question"], answers[q["question_id"]])


def read_textvqa(path: str | Path, image_root: str | Path) -> Iterator[VQAItem]:
    """TextVQA questions with their 10 human answers."""
    for index, q in enumerate(_load_json(path, "data")):
        try:
            yield VQAItem(str(q["question_id"]), Path(image_root) / f"{q['image_id']}.jpg", q["question"], tuple(q["answers"]))
        except KeyError as error:
            raise ValueError(f"{path}: data[{index}] lacks {error}") from error


def _open(path: Path) -> Image.Image:
    try:
        return Image.open(path).convert("RGB")
    except FileNotFoundError as error:
        raise FileNotFoundError(f"benchmark image missing: {path}") from error


def evaluate_captioning(
    generate: Callable[..., Any], items: Iterable[CaptionItem], **generation_kwargs: Any
) -> dict[str, Any]:
    """CIDEr of ``generate([image]).text`` over the items; returns the score and the captions."""
    candidates, references = {}, {}
    for item in items:
        candidates[item.image_id] = generate([_open(item.image_path)], **generation_kwargs).text
        references[item.image_id] = list(item.references)
    score, per_item = cider_d(candidates, references)
    return {"cider": score, "count": len(candidates), "captions": candidates, "per_item": per_item}


def evaluate_vqa(
    generate: Callable[..., Any],
    items: Iterable[VQAItem],
    prompt: str = DEFAULT_VQA_PROMPT,
    **generation_kwargs: Any,
) -> dict[str, Any]:
    """VQA accuracy of ``generate([image, prompt.format(question=...)]).text`` over the items."""
    predictions, humans, ids = [], [], []
    for item in items:
        predictions.append(generate([_open(item.image_path), prompt.format(question=item.question)], **generation_kwargs).text)
        humans.append(item.answers)
        ids.append(item.question_id)
    return {"accuracy": mean_vqa_accuracy(predictions, humans), "count": len(ids), "answers": dict(zip(ids, predictions))}
