"""The sample world's instruction data: LLaVA-style items on its own training images (the SFT stage's source).

Written under ``<raw>/instructions/`` (not a partition: the raw-shard sensor watches ``mmc4/``, ``laion/`` and
``cc12m/`` only): ``instructions.json`` (:mod:`pipelines.data.instructions` reads it), ``images/<id>.jpg`` (every
training image, JPEG at the world's size, as the image server serves it) and ``labels/<id>.png`` (its
segmentation label map). Each item is asked as the held-out benchmark asks
(:mod:`pipelines.evaluation.sample_world_tasks`) and answered with the truth:

==============  =====================================  =====================================
kind            human                                  gpt
==============  =====================================  =====================================
vqa             ``<image>`` + a question of the world  the answer (``red``, ``2``, ``top left``)
captioning      ``<image>``                            the lower-cased true caption
grounding       ``<image>`` + ``What is at the top     ``a large red circle.`` / ``the digit 7.``
                left?``
seg_to_image    ``<image>`` (the label map)            ``<image>`` (the scene)
text_to_image   the lower-cased true caption           ``<image>`` (the scene)
story           ``<image>`` + its sentence for each    ``<image>`` (frame ``k``)
                frame before ``k``, then sentence
                ``k``
==============  =====================================  =====================================

``story`` is the paper's storytelling fine-tuning (its VIST stage: the model generates a story's frame from the
frames and sentences before it), one item per frame ``k >= 1`` of each training story whose frames up to ``k`` are
its own (a mismatched image ends the story's items). The other kinds are per training image.

Everything is drawn from ``random.Random(f"{seed}:instructions:{image_id}")``: the same world and config write
the same files.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.data.instructions import INSTRUCTIONS_DIR, INSTRUCTIONS_FILE
from pipelines.files import atomic_path
from pipelines.sample_world.scenes import Scene, encode, label_map_image, render
from pipelines.sample_world.world import SampleWorld, Story, caption, scene_questions

INSTRUCTION_KINDS = ("vqa", "captioning", "grounding", "seg_to_image", "text_to_image", "story")


@dataclass(frozen=True)
class InstructionConfig:
    """Which instruction items the sample world writes (per training image; ``story`` per training story)."""

    instruction_kinds: tuple[str, ...] = INSTRUCTION_KINDS
    """Kinds of item written (any of :data:`INSTRUCTION_KINDS`); empty: none."""
    vqa_per_image: int = 4
    """VQA items per image, drawn from its questions (all of them when it has fewer)."""
    grounding_per_image: int = 1
    """Grounded-description items per image, each about another occupied cell (fewer when it has fewer)."""

    def __post_init__(self) -> None:
        unknown = sorted(set(self.instruction_kinds) - set(INSTRUCTION_KINDS))
        if unknown:
            raise ValueError(f"unknown instruction kinds {unknown}; expected some of {INSTRUCTION_KINDS}")
        if self.vqa_per_image < 0 or self.grounding_per_image < 0:
            raise ValueError("vqa_per_image and grounding_per_image must be >= 0")


def _where(position: str) -> str:
    return f"{'in' if position == 'center' else 'at'} the {position}"


def _grounding(scene: Scene) -> list[tuple[str, str]]:
    """``(question, answer)`` for every occupied cell: the object there, or the digit."""
    cells = [(o.position, f"{o.describe()}.") for o in scene.objects]
    if scene.glyph is not None:
        cells.append((scene.glyph.position, f"the digit {scene.glyph.digit}."))
    return [(f"What is {_where(position)}?", answer) for position, answer in cells]


def _image_file(image_id: str) -> str:
    """A training image's path in the instruction image folder (JPEG, as the image server serves it)."""
    return f"images/{image_id}.jpg"


def _item(item_id: str, images: list[str], human: str, gpt: str) -> dict[str, Any]:
    return {"id": item_id, "image": images,
            "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]}


def image_items(image_id: str, scene: Scene, config: InstructionConfig, seed: int) -> list[dict[str, Any]]:
    """The instruction items of one training image (see the module docstring)."""
    rng = random.Random(f"{seed}:instructions:{image_id}")
    image, labels = _image_file(image_id), f"labels/{image_id}.png"
    items = []
    kinds = config.instruction_kinds
    if "vqa" in kinds:
        questions = scene_questions(scene)
        for k, q in enumerate(rng.sample(questions, min(config.vqa_per_image, len(questions)))):
            items.append(_item(f"{image_id}-vqa-{k}", [image], f"<image>\n{q['question']}", q["answer"]))
    if "captioning" in kinds:
        items.append(_item(f"{image_id}-caption", [image], "<image>", caption(scene).lower()))
    if "grounding" in kinds:
        cells = _grounding(scene)
        for k, (question, answer) in enumerate(rng.sample(cells, min(config.grounding_per_image, len(cells)))):
            items.append(_item(f"{image_id}-grounding-{k}", [image], f"<image>\n{question}", answer))
    if "seg_to_image" in kinds:
        items.append(_item(f"{image_id}-seg", [labels, image], "<image>", "<image>"))
    if "text_to_image" in kinds:
        items.append(_item(f"{image_id}-t2i", [image], caption(scene).lower(), "<image>"))
    return items


def story_items(story: Story) -> list[dict[str, Any]]:
    """The ``story`` items of one training story: for each frame ``k >= 1``, the frames before it each followed by
    its sentence, then sentence ``k``, as the held-out story benchmark prompts; answered with frame ``k``."""
    items = []
    for k in range(1, len(story.images)):
        if any(image.mismatched for image in story.images[:k + 1]):
            break
        context = "\n".join(f"<image>\n{sentence}" for sentence in story.sentences[:k])
        images = [_image_file(image.image_id) for image in story.images[:k + 1]]
        items.append(_item(f"{story.story_id}-story-{k}", images, f"{context} {story.sentences[k]}", "<image>"))
    return items


def write_instructions(world: SampleWorld, raw_dir: str | os.PathLike, config: InstructionConfig) -> Path:
    """Write ``<raw_dir>/instructions/`` (the JSON file, its images and label maps; replaced whole, atomically) for
    every training image and story of ``world``, each image file once; returns the JSON file's path."""
    size, seed = world.config.image_size, world.config.seed
    scenes = world.scenes()
    items = [item for image_id, scene in sorted(scenes.items()) for item in image_items(image_id, scene, config, seed)]
    if "story" in config.instruction_kinds:
        items += [item for story in world.stories for item in story_items(story)]
    out = Path(raw_dir) / INSTRUCTIONS_DIR
    with atomic_path(out) as tmp:
        (tmp / "images").mkdir(parents=True)
        (tmp / "labels").mkdir()
        for name in sorted({name for item in items for name in item["image"]}):
            folder, image_id = Path(name).parent.name, Path(name).stem
            if folder == "labels":
                label_map_image(scenes[image_id], size).save(tmp / name)
            else:
                (tmp / name).write_bytes(encode(render(scenes[image_id], size), "jpeg"))
        (tmp / INSTRUCTIONS_FILE).write_text(json.dumps(items, indent=1))
    return out / INSTRUCTIONS_FILE
