"""The sample world's held-out benchmarks, run through any interleaved generator.

Each task reads its split (``eval/<task>.jsonl`` written by
:func:`pipelines.sample_world.write_metadata`), builds interleaved prompts in the training format
(pairs are an image and its lower-cased caption; ``<BoI>`` at the end of a prompt asks for an
image), calls ``generate(prompt, **generation_kwargs)`` — e.g. ``MMInterleaved.generate`` — and
scores the output exactly:

==================  =======================================  ======================================
task                prompt                                   metrics
==================  =======================================  ======================================
captioning          [image]                                  CIDEr-D, exact-match accuracy; with
                                                             ``text_nats``, the reference's nats
                                                             given its image and another's
vqa                 [image, "question"]                      VQA accuracy, per type
                                                             (``digit`` = fine detail)
text_to_image       ["caption <BoI>"]                        attribute accuracy, per attribute
seg_to_image        [label-map image, "<BoI>"]               object mIoU (+ with background)
story_continuation  [img, sentence, ..., "sentence <BoI>"]   attribute accuracy, per attribute; the
                                                             copy-the-previous-image floor
==================  =======================================  ======================================

Every metric keeps its per-item scores (:attr:`TaskResult.scores`), so the report gives each one a
bootstrap interval. The image tasks also score floors, what a generator that ignores its prompt
would get: ``*_floor`` scores each output against the next item's target (the outputs of a shuffled
prompt set), and seg-to-image's ``*_blank`` scores an empty canvas. Story continuation also scores
``*_copy``: the story's last context image itself against the target, what a generator that copies the
previous image gets (a story's next frame moves or recolours one object, so copying scores about half).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
from PIL import Image

from pipelines.evaluation.cider import cider_d, tokenize_caption
from pipelines.evaluation.intervals import Estimate, bootstrap_mean
from pipelines.evaluation.scenes import BREAKDOWN, object_miou, scene_miou, score_scene
from pipelines.evaluation.vqa import vqa_accuracy
from pipelines.sample_world import Scene, parse_image
from pipelines.sample_world.scenes import label_map_image

TASKS = ("captioning", "vqa", "text_to_image", "seg_to_image", "story_continuation")
BOI = "<BoI>"


class Generation(Protocol):
    text: str
    images: list[Image.Image]


Generate = Callable[..., Generation]


@dataclass
class TaskResult:
    """Scores of one task and a few examples (prompt, generated text and images) for the report.

    Attributes:
        scores: metric -> its per-item scores (a metric over a subset, e.g. ``digit``, has fewer items).
        count: items evaluated.
    """

    task: str
    scores: dict[str, list[float]]
    count: int
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def metrics(self) -> dict[str, float]:
        """metric -> mean over its items."""
        return {metric: float(np.mean(values)) for metric, values in self.scores.items()}

    def estimates(self, seed: int = 0) -> dict[str, Estimate]:
        """metric -> mean with its 95% bootstrap interval."""
        return {metric: bootstrap_mean(values, seed=seed) for metric, values in self.scores.items()}


def read_split(eval_dir: str | Path, task: str, limit: int | None = None) -> list[dict]:
    """Records of ``eval/<task>.jsonl`` (the first ``limit`` ones)."""
    path = Path(eval_dir) / f"{task}.jsonl"
    records = []
    with open(path) as f:
        for line_number, line in enumerate(f, 1):
            if limit is not None and len(records) >= limit:
                break
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not JSON ({error.msg})") from error
    return records


def _parse(image: Image.Image, size: int) -> Scene:
    return parse_image(image.convert("RGB").resize((size, size), Image.NEAREST))


def _first_image(output: Generation) -> Image.Image | None:
    return output.images[0] if output.images else None


def evaluate_task(
    task: str,
    generate: Generate,
    eval_dir: str | Path,
    image_for: Callable[[str], Image.Image],
    *,
    limit: int | None = None,
    image_size: int = 64,
    num_examples: int = 4,
    text_nats: Callable[[Sequence[str | Image.Image]], float] | None = None,
    **generation_kwargs: Any,
) -> TaskResult:
    """Run one task of :data:`TASKS` and score it (see the module docstring).

    Args:
        generate: ``generate(prompt: list[str | Image], **generation_kwargs) -> Generation``.
        image_for: image id -> the world's image (e.g. ``world.image_bytes`` decoded).
        image_size: pixels at which scenes are rendered and generated images parsed.
        text_nats: ``text_nats([image, caption]) -> nats per text token`` (e.g. ``MMInterleaved.text_nats``); with
            it, captioning also scores each item's first reference (lower-cased, as training sees pair captions)
            given its own image (``caption_nats``) and given the next item's (``caption_nats_other_image``), and
            their difference per item (``image_reliance``, > 0 when the model reads the image: a model whose greedy
            captions ignore the image can still rank captions by it).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    records = read_split(eval_dir, task, limit)
    if not records:
        raise ValueError(f"{eval_dir}/{task}.jsonl has no records")
    examples: list[dict[str, Any]] = []

    def run(prompt: Sequence[str | Image.Image]) -> Generation:
        output = generate(list(prompt), **generation_kwargs)
        if len(examples) < num_examples:
            examples.append({"prompt": list(prompt), "text": output.text, "images": list(output.images)})
        return output

    if task == "captioning":
        candidates, references = {}, {}
        for record in records:
            candidates[record["image_id"]] = run([image_for(record["image_id"])]).text
            references[record["image_id"]] = record["references"]
        _, per_image = cider_d(candidates, references)
        scores = {"cider": [per_image[i] for i in candidates],
                  "exact_match": [float(tokenize_caption(candidates[i]) in {tokenize_caption(r) for r in references[i]})
                                  for i in candidates]}
        if text_nats is not None:
            scores.update(_caption_nats(records, image_for, text_nats))
    elif task == "vqa":
        by_type = defaultdict(list)
        for record in records:
            answer = run([image_for(record["image_id"]), record["question"]]).text
            by_type[record["type"]].append(vqa_accuracy(answer, [record["answer"]]))
        scores = {"accuracy": [s for kind in by_type.values() for s in kind]}
        scores.update({f"accuracy_{kind}": values for kind, values in sorted(by_type.items())})
    elif task == "text_to_image":
        outputs = [_first_image(run([f"{record['prompt'].lower()}{BOI}"])) for record in records]
        scores = _scene_scores(outputs, [Scene.from_dict(r["scene"]) for r in records], image_size)
    elif task == "seg_to_image":
        targets = [Scene.from_dict(r["scene"]) for r in records]
        outputs = [_first_image(run([label_map_image(target, image_size), BOI])) for target in targets]
        scores = _segmentation_scores(outputs, targets, image_size)
    else:  # story_continuation
        outputs = []
        for record in records:
            prompt: list[str | Image.Image] = []
            for step in record["context"]:
                prompt += [image_for(step["image_id"]), step["sentence"]]
            prompt[-1] = f"{prompt[-1]} {record['next_sentence']}{BOI}"  # a text after a text: one space, as packed
            outputs.append(_first_image(run(prompt)))
        targets = [Scene.from_dict(r["next_scene"]) for r in records]
        scores = _scene_scores(outputs, targets, image_size)
        previous = _parsed([image_for(r["context"][-1]["image_id"]) for r in records], image_size)
        copied = [score_scene(p, t) for p, t in zip(previous, targets)]
        scores["attribute_accuracy_copy"] = [c.accuracy for c in copied]
        scores["strict_accuracy_copy"] = [c.strict_accuracy for c in copied]
    return TaskResult(task, scores, len(records), examples)


def _caption_nats(records: Sequence[dict], image_for: Callable[[str], Image.Image],
                  text_nats: Callable[[Sequence[str | Image.Image]], float]) -> dict[str, list[float]]:
    """Per item: its reference's nats after its own image, after the next item's image, and the difference."""
    own, other = [], []
    for i, record in enumerate(records):
        reference = record["references"][0].lower()
        own.append(text_nats([image_for(record["image_id"]), reference]))
        other.append(text_nats([image_for(records[(i + 1) % len(records)]["image_id"]), reference]))
    return {"caption_nats": own, "caption_nats_other_image": other,
            "image_reliance": [b - a for a, b in zip(own, other)]}


def _parsed(images: Sequence[Image.Image | None], size: int) -> list[Scene]:
    """Each output parsed back into a scene (no image: an empty scene)."""
    return [Scene(objects=()) if image is None else _parse(image, size) for image in images]


def _scene_scores(images: Sequence[Image.Image | None], targets: Sequence[Scene], size: int) -> dict[str, list[float]]:
    """Attribute accuracy (and its strict form, which counts objects drawn where the target has none), its
    :data:`BREAKDOWN` and extra objects, plus the floor: each output against the next item's target."""
    predicted = _parsed(images, size)
    scored = [score_scene(p, t) for p, t in zip(predicted, targets)]
    shuffled = list(targets[1:]) + list(targets[:1])
    scores = {"attribute_accuracy": [s.accuracy for s in scored], "strict_accuracy": [s.strict_accuracy for s in scored]}
    for name in BREAKDOWN:
        values = [s.attributes[name] for s in scored if s.attributes[name] is not None]
        if values:
            scores[name] = values
    scores["extra_objects"] = [float(s.extra_objects) for s in scored]
    scores["attribute_accuracy_floor"] = [score_scene(p, t).accuracy for p, t in zip(predicted, shuffled)]
    return scores


def _segmentation_scores(images: Sequence[Image.Image | None], targets: Sequence[Scene], size: int) -> dict[str, list[float]]:
    """Object mIoU and mIoU with the background, each with its blank-canvas and shuffled-target floors."""
    predicted = _parsed(images, size)
    shuffled = list(targets[1:]) + list(targets[:1])
    blank = Scene(objects=())
    return {
        "object_miou": [object_miou(p, t, size) for p, t in zip(predicted, targets)],
        "object_miou_floor": [object_miou(p, t, size) for p, t in zip(predicted, shuffled)],
        "object_miou_blank": [object_miou(blank, t, size) for t in targets],
        "miou": [scene_miou(p, t, size) for p, t in zip(predicted, targets)],
        "miou_blank": [scene_miou(blank, t, size) for t in targets],
    }

