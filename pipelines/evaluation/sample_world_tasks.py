"""The sample world's held-out benchmarks, run through any interleaved generator.

Each task reads its split (``eval/<task>.jsonl`` written by
:func:`pipelines.sample_world.write_metadata`), builds interleaved prompts in the training format
(pairs are an image and its lower-cased caption; ``<BoI>`` at the end of a prompt asks for an
image), calls ``generate(prompt, **generation_kwargs)`` — e.g. ``MMInterleaved.generate`` — and
scores the output exactly:

==================  =======================================  ===========================
task                prompt                                   metrics
==================  =======================================  ===========================
captioning          [image]                                  CIDEr, exact-match accuracy
vqa                 [image, "question"]                      VQA accuracy, per type
                                                             (``digit`` = fine detail)
text_to_image       ["caption <BoI>"]                        attribute accuracy
seg_to_image        [label-map image, "<BoI>"]               mIoU
story_continuation  [img, sentence, ..., "sentence <BoI>"]   attribute accuracy
==================  =======================================  ===========================
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
from pipelines.evaluation.scenes import attribute_accuracy, scene_miou
from pipelines.evaluation.vqa import vqa_accuracy
from pipelines.sample_world import Scene, parse_image
from pipelines.sample_world.scenes import COLOURS, GLYPH_COLOUR, render_segmentation

TASKS = ("captioning", "vqa", "text_to_image", "seg_to_image", "story_continuation")
BOI = "<BoI>"


class Generation(Protocol):
    text: str
    images: list[Image.Image]


Generate = Callable[..., Generation]


@dataclass
class TaskResult:
    """Scores of one task and a few examples (prompt, generated text and images) for the report."""

    task: str
    metrics: dict[str, float]
    count: int
    examples: list[dict[str, Any]] = field(default_factory=list)


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


def label_map_image(scene: Scene, size: int) -> Image.Image:
    """The scene's segmentation map drawn in its label colours (the seg-to-image prompt)."""
    labels = render_segmentation(scene, size)
    palette = np.array([(0, 0, 0), *COLOURS.values()], dtype=np.uint8)
    pixels = np.where(labels[..., None] == 255, np.array(GLYPH_COLOUR, np.uint8), palette[np.minimum(labels, len(palette) - 1)])
    return Image.fromarray(pixels.astype(np.uint8))


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
    **generation_kwargs: Any,
) -> TaskResult:
    """Run one task of :data:`TASKS` and score it (see the module docstring).

    Args:
        generate: ``generate(prompt: list[str | Image], **generation_kwargs) -> Generation``.
        image_for: image id -> the world's image (e.g. ``world.image_bytes`` decoded).
        image_size: pixels at which scenes are rendered and generated images parsed.
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
        cider, _ = cider_d(candidates, references)
        exact = np.mean([tokenize_caption(candidates[i]) in {tokenize_caption(r) for r in references[i]} for i in candidates])
        metrics = {"cider": cider, "exact_match": float(exact)}
    elif task == "vqa":
        by_type = defaultdict(list)
        for record in records:
            answer = run([image_for(record["image_id"]), record["question"]]).text
            by_type[record["type"]].append(vqa_accuracy(answer, [record["answer"]]))
        metrics = {"accuracy": float(np.mean([s for scores in by_type.values() for s in scores]))}
        metrics.update({f"accuracy_{kind}": float(np.mean(scores)) for kind, scores in sorted(by_type.items())})
    elif task == "text_to_image":
        scores = []
        for record in records:
            image = _first_image(run([f"{record['prompt'].lower()} {BOI}"]))
            target = Scene.from_dict(record["scene"])
            scores.append(0.0 if image is None else attribute_accuracy(_parse(image, image_size), target))
        metrics = {"attribute_accuracy": float(np.mean(scores))}
    elif task == "seg_to_image":
        scores = []
        for record in records:
            target = Scene.from_dict(record["scene"])
            image = _first_image(run([label_map_image(target, image_size), BOI]))
            scores.append(0.0 if image is None else scene_miou(_parse(image, image_size), target, image_size))
        metrics = {"miou": float(np.mean(scores))}
    else:  # story_continuation
        scores = []
        for record in records:
            prompt: list[str | Image.Image] = []
            for step in record["context"]:
                prompt += [image_for(step["image_id"]), step["sentence"]]
            prompt.append(f"{record['next_sentence']} {BOI}")
            image = _first_image(run(prompt))
            target = Scene.from_dict(record["next_scene"])
            scores.append(0.0 if image is None else attribute_accuracy(_parse(image, image_size), target))
        metrics = {"attribute_accuracy": float(np.mean(scores))}
    return TaskResult(task, metrics, len(records), examples)

