"""Instruction data (supervised fine-tuning) in LLaVA's JSON layout, read into instruction documents.

A file is a JSON list of items, as LLaVA-665k (``llava_v1_5_mix665k.json``) is released::

    [{"id": "000000033471",
      "image": "coco/train2017/000000033471.jpg",        # or a list: ["a.jpg", "b.png"]; absent: text only
      "conversations": [
        {"from": "human", "value": "<image>\\nWhat colour is the bus?"},
        {"from": "gpt", "value": "white and red"},
        {"from": "human", "value": "What is on its back?"},
        {"from": "gpt", "value": "an advertisement"}]},
     ...]

Image paths are relative to one image folder. Each ``<image>`` in a value marks where the next listed
image goes; in a ``gpt`` turn it is an image the model must generate (e.g. segmentation-to-image:
``human: "<image>"`` holding a label map, ``gpt: "<image>"`` the scene). Turns alternate ``human``,
``gpt``, ``human``, ... and end with ``gpt``. The whitespace around an ``<image>`` (LLaVA writes
``"<image>\\n"``) is dropped: a text is its stripped pieces.

:func:`read_instructions` yields one instruction document (:mod:`pipelines.data.documents`, ``kind ==
"instruction"``) per item: the turns' texts and images in order, each with its ``role``
(``instruction`` for human turns, ``answer`` for gpt turns), the images keyed by their path in the image
folder (:class:`ImageFolder` gives the packer their bytes). A malformed item (not an object, no
conversations, a turn that is not ``{"from": "human" | "gpt", "value": str}``, turns out of order, an
``<image>`` count different from the listed images, an image file that is missing or does not decode) is
reported to the ``handler`` as ``BadRecord(file, item index, reason)`` and the rest are read.

:func:`vqa_instructions` turns VQAv2 / OK-VQA questions and annotations (as
:func:`pipelines.evaluation.benchmarks.read_vqa` reads them) into such items, one per question, asked
as ``weft eval --benchmark vqav2`` asks them.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from pipelines.data.documents import (
    ANSWER_ROLE,
    IMAGE_STATUS_OK,
    INSTRUCTION_ROLE,
    image_element,
    make_document,
    text_element,
)
from pipelines.data.errors import BadRecord, Handler, warn_and_continue

IMAGE_MARKER = "<image>"
INSTRUCTIONS_DIR, INSTRUCTIONS_FILE = "instructions", "instructions.json"
"""Where instruction data lies by default, under the raw folder (the sample world writes its own there)."""
ROLES = {"human": INSTRUCTION_ROLE, "gpt": ANSWER_ROLE}
"""LLaVA's speakers and the roles of their turns."""


@dataclass(frozen=True)
class InstructionSources:
    """Where the instruction data lies."""

    files: tuple[str, ...] = (f"{INSTRUCTIONS_DIR}/{INSTRUCTIONS_FILE}",)
    """LLaVA-style JSON files (a list of items each); a relative path is under the raw folder (where the sample
    world writes its own)."""
    image_dir: str = INSTRUCTIONS_DIR
    """The folder the items' image paths are relative to; a relative path is under the raw folder."""

    def __post_init__(self) -> None:
        if not self.files:
            raise ValueError("InstructionSources needs at least one JSON file")

    def resolve(self, raw_dir: str | os.PathLike) -> tuple[list[Path], Path]:
        """The files and the image folder as paths, relative ones under ``raw_dir``."""
        return [Path(raw_dir) / f for f in self.files], Path(raw_dir) / self.image_dir


class _BadItem(ValueError):
    """Raised inside the reader for one item; turned into a BadRecord for the handler."""


class ImageFolder(Mapping[str, bytes]):
    """The encoded bytes of the image files under ``root``, by path relative to it, read when asked (the packer's
    ``images`` for instruction documents)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def __getitem__(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, TypeError):
            raise KeyError(key) from None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and (self.root / key).is_file()

    def __iter__(self) -> Iterator[str]:
        return (str(p.relative_to(self.root)) for p in sorted(self.root.rglob("*")) if p.is_file())

    def __len__(self) -> int:
        return sum(1 for _ in self)


def load_items(path: str | os.PathLike) -> list[Any]:
    """The items of an instruction file; a file that is not a JSON list is named."""
    try:
        with open(path) as f:
            data = json.load(f)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}:{error.lineno}: not JSON ({error.msg})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of items, found {type(data).__name__}")
    return data


def _image_names(item: dict[str, Any]) -> list[str]:
    image = item.get("image")
    if image is None:
        return []
    names = [image] if isinstance(image, str) else image
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise _BadItem(f"'image' must be a path or a list of paths, got {image!r}")
    return names


def _turns(item: dict[str, Any]) -> list[tuple[str, str]]:
    """``(role, value)`` per turn, checked: human and gpt alternate, human first, gpt last."""
    conversations = item.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        raise _BadItem("no 'conversations' list")
    turns = []
    for number, turn in enumerate(conversations):
        if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
            raise _BadItem(f"turn {number} is not {{'from': ..., 'value': str}}")
        speaker = turn.get("from")
        if speaker not in ROLES:
            raise _BadItem(f"turn {number} is from {speaker!r}, expected one of {sorted(ROLES)}")
        expected = "human" if number % 2 == 0 else "gpt"
        if speaker != expected:
            raise _BadItem(f"turn {number} is from {speaker!r}, expected {expected!r} (human and gpt alternate, "
                           "human first)")
        turns.append((ROLES[speaker], turn["value"]))
    if len(turns) % 2:
        raise _BadItem("the last turn is from 'human': there is no answer to train on")
    return turns


def _checked_image(image_dir: Path, name: str) -> None:
    path = image_dir / name
    if not path.is_file():
        raise _BadItem(f"image {name!r} not found in {image_dir}")
    try:
        with Image.open(path) as image:
            image.load()  # the whole file decodes (a truncated JPEG passes a header check)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise _BadItem(f"image {name!r} does not decode: {error}") from None


def _document(item: Any, file: Path, index: int, image_dir: Path) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise _BadItem(f"item is a {type(item).__name__}, not an object")
    names = _image_names(item)
    turns = _turns(item)
    markers = sum(value.count(IMAGE_MARKER) for _, value in turns)
    if markers != len(names):
        raise _BadItem(f"{markers} {IMAGE_MARKER} markers for {len(names)} listed images")
    for name in names:
        _checked_image(image_dir, name)
    elements: list[dict[str, Any]] = []
    pending = iter(names)
    for role, value in turns:
        pieces = value.split(IMAGE_MARKER)
        for k, piece in enumerate(pieces):
            if k:
                name = next(pending)
                image = image_element(str(image_dir / name), image_name=name)
                image.update(key=name, status=IMAGE_STATUS_OK, role=role)
                elements.append(image)
            if piece.strip():
                elements.append({**text_element(piece.strip()), "role": role})
    if not any(e["role"] == ANSWER_ROLE for e in elements):
        raise _BadItem("every gpt turn is empty: there is no answer to train on")
    return make_document(doc_id=f"{file.name}:{index}", source="instructions", kind="instruction", elements=elements,
                         source_file=str(file), source_row=index, meta={"id": item.get("id")})


def read_instructions(path: str | os.PathLike, image_dir: str | os.PathLike,
                      handler: Handler = warn_and_continue) -> Iterator[dict[str, Any]]:
    """The instruction documents of one LLaVA-style file (see the module docstring), images under ``image_dir``;
    a malformed item goes to ``handler`` as ``BadRecord(path, item index, reason)``."""
    file, folder = Path(path), Path(image_dir)
    for index, item in enumerate(load_items(file)):
        try:
            yield _document(item, file, index, folder)
        except _BadItem as error:
            handler(BadRecord(str(file), index, str(error)))


def vqa_instructions(questions: Iterable[Any], prompt: str = "{question} Answer:") -> list[dict[str, Any]]:
    """VQA questions with their human answers as LLaVA-style items, one per question: ``[image]`` and ``prompt``
    (the default is how ``weft eval --benchmark vqav2`` asks) from the human, the most common human answer from
    gpt. ``questions`` are records with ``question_id``, ``image_path``, ``question`` and ``answers``, as
    :func:`pipelines.evaluation.benchmarks.read_vqa` reads a VQAv2 / OK-VQA questions + annotations pair; give it
    an empty ``image_root`` so that the paths are relative to the image folder the items are read with::

        items = vqa_instructions(read_vqa("v2_OpenEnded_mscoco_train2014_questions.json",
                                          "v2_mscoco_train2014_annotations.json", "",
                                          "train2014/COCO_train2014_{image_id:012d}.jpg"))
    """
    items = []
    for record in questions:
        answer = Counter(record.answers).most_common(1)[0][0]
        items.append({"id": str(record.question_id), "image": str(record.image_path), "conversations": [
            {"from": "human", "value": f"{IMAGE_MARKER}\n{prompt.format(question=record.question)}"},
            {"from": "gpt", "value": answer}]})
    return items
