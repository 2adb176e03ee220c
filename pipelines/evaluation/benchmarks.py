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
:mod:`pipelines.evaluation.cider` and :mod:`pipelines.evaluation.vqa`. :func:`evaluate_benchmark` runs one
benchmark (:class:`BenchmarkFiles`) on a checkpoint: ``weft eval --benchmark coco|vqav2|okvqa|textvqa``.
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from PIL import Image

from pipelines.compute import Compute
from pipelines.evaluation.cider import cider_d
from pipelines.evaluation.run import EvaluationConfig, EvaluationResult, generation_arguments, load_for_evaluation
from pipelines.evaluation.sample_world_tasks import TaskResult
from pipelines.evaluation.vqa import mean_vqa_accuracy, vqa_accuracy

DEFAULT_VQA_PROMPT = "{question} Answer:"
BENCHMARKS = ("coco", "vqav2", "okvqa", "textvqa")
NUM_EXAMPLES = 4
"""Generations kept per benchmark for the report's example grid."""


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


def _example(examples: list[dict[str, Any]], prompt: list, output: Any) -> None:
    if len(examples) < NUM_EXAMPLES:
        examples.append({"prompt": prompt, "text": output.text, "images": list(output.images)})


def evaluate_captioning(
    generate: Callable[..., Any], items: Iterable[CaptionItem], **generation_kwargs: Any
) -> dict[str, Any]:
    """CIDEr of ``generate([image]).text`` over the items; returns the score, the captions and the first
    few generations (``examples``)."""
    candidates, references, examples = {}, {}, []
    for item in items:
        prompt = [_open(item.image_path)]
        output = generate(prompt, **generation_kwargs)
        candidates[item.image_id] = output.text
        references[item.image_id] = list(item.references)
        _example(examples, prompt, output)
    score, per_item = cider_d(candidates, references)
    return {"cider": score, "count": len(candidates), "captions": candidates, "per_item": per_item,
            "examples": examples}


def evaluate_vqa(
    generate: Callable[..., Any],
    items: Iterable[VQAItem],
    prompt: str = DEFAULT_VQA_PROMPT,
    **generation_kwargs: Any,
) -> dict[str, Any]:
    """VQA accuracy of ``generate([image, prompt.format(question=...)]).text`` over the items (and the first few
    generations, ``examples``)."""
    predictions, humans, ids, examples = [], [], [], []
    for item in items:
        question = [_open(item.image_path), prompt.format(question=item.question)]
        output = generate(question, **generation_kwargs)
        predictions.append(output.text)
        humans.append(item.answers)
        ids.append(item.question_id)
        _example(examples, question, output)
    return {"accuracy": mean_vqa_accuracy(predictions, humans), "count": len(ids), "answers": dict(zip(ids, predictions)),
            "per_item": [vqa_accuracy(p, a) for p, a in zip(predictions, humans)], "examples": examples}


@dataclass(frozen=True)
class BenchmarkFiles:
    """A real benchmark's files on local disk (official layouts, see the module docstring)."""

    name: str
    """One of :data:`BENCHMARKS`."""
    annotations: Path
    """``coco``: ``dataset_coco.json`` (Karpathy split); ``vqav2``/``okvqa``: the annotations file; ``textvqa``:
    the TextVQA json."""
    images: Path
    """The image folder (``coco``: the folder holding each image's ``filepath``, e.g. ``val2014/``)."""
    questions: Path | None = None
    """``vqav2``/``okvqa``: the questions file."""
    split: str = "test"
    """``coco``: the Karpathy split."""
    image_pattern: str = "COCO_val2014_{image_id:012d}.jpg"
    """``vqav2``/``okvqa``: an image's file name under ``images``."""

    def __post_init__(self) -> None:
        if self.name not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {self.name!r}; expected one of {BENCHMARKS}")
        if self.name in ("vqav2", "okvqa") and self.questions is None:
            raise ValueError(f"{self.name} needs its questions file")
        for path in (self.annotations, self.questions):
            if path is not None and not Path(path).is_file():
                raise FileNotFoundError(f"{self.name}: {path} is not a file")
        if not Path(self.images).is_dir():
            raise FileNotFoundError(f"{self.name}: image folder {self.images} does not exist")


def read_benchmark(files: BenchmarkFiles) -> Iterator[CaptionItem] | Iterator[VQAItem]:
    """The items of a benchmark: captions (``coco``) or questions with human answers."""
    if files.name == "coco":
        return read_karpathy_coco(files.annotations, files.images, files.split)
    if files.name == "textvqa":
        return read_textvqa(files.annotations, files.images)
    return read_vqa(files.questions, files.annotations, files.images, files.image_pattern)


def evaluate_benchmark(checkpoint: str | Path, files: BenchmarkFiles, config: EvaluationConfig = EvaluationConfig(),
                       compute: Compute = Compute()) -> EvaluationResult:
    """Run a real benchmark on a checkpoint (the first ``config.limit`` items) with ``config``'s sampling: CIDEr
    for ``coco``, VQA accuracy for the others, as one task named after the benchmark."""
    start = time.perf_counter()
    with compute.threads():
        model, model_dir, step = load_for_evaluation(checkpoint, compute)
        sampling = generation_arguments(model.generate, **config.sampling(), max_new_tokens=config.max_new_tokens)
        generator = torch.Generator(device=compute.device).manual_seed(config.seed)
        items = itertools.islice(read_benchmark(files), config.limit)
        if files.name == "coco":
            scored = evaluate_captioning(model.generate, items, generator=generator, **sampling)
            scores = {"cider": list(scored["per_item"].values())}
        else:
            scored = evaluate_vqa(model.generate, items, generator=generator, **sampling)
            scores = {"accuracy": scored["per_item"]}
    task = TaskResult(files.name, scores, scored["count"], scored["examples"])
    settings = {"benchmark": files.name, "limit": config.limit, "seed": config.seed, "device": compute.device, **sampling}
    return EvaluationResult(str(model_dir), step, [task], settings=settings, seconds=time.perf_counter() - start)
