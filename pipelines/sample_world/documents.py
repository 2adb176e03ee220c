"""The sample world as the later data stages see it, without the HTTP round trip.

:func:`world_documents` gives the normalized documents the readers + download stage would give
(MMC4 records parsed by :func:`pipelines.data.readers.parse_mmc4_record`, pairs by
:func:`pipelines.data.documents.make_pair`), with each image element already marked downloaded under
the key ``image_id``; :func:`world_images` gives those keys' JPEG bytes and :func:`world_truth`
the ground truth per key (scene, true caption, mismatch label). Stages and their tests use these
to run on the world in memory; the end-to-end graph uses the real download output instead.
"""

from __future__ import annotations

from typing import Any

from pipelines.data.documents import IMAGE_STATUS_OK, make_pair
from pipelines.data.readers import parse_mmc4_record
from pipelines.sample_world.formats import _split_pairs, mmc4_records
from pipelines.sample_world.scenes import encode, render
from pipelines.sample_world.world import SampleWorld, caption, image_path

BASE_URL = "http://world.invalid"


def _key(url: str) -> str:
    return url.rsplit("/", 1)[-1].split(".", 1)[0]


def world_documents(world: SampleWorld, base_url: str = BASE_URL) -> list[dict[str, Any]]:
    """Stories (``mmc4``, interleaved) then pairs (``laion`` even / ``cc12m`` odd), downloaded."""
    documents = []
    for line, record in enumerate(mmc4_records(world, base_url), start=1):
        documents.append(parse_mmc4_record(record, f"mmc4:world:{line}", "world.jsonl", line))
    laion, _ = _split_pairs(world)
    laion_ids = {p.image_id for p in laion}
    for row, pair in enumerate(world.pairs):
        source = "laion" if pair.image_id in laion_ids else "cc12m"
        documents.append(make_pair(doc_id=f"{source}:world:{pair.image_id}", source=source,
                                   url=base_url + image_path(pair.image_id), caption=pair.text,
                                   source_row=row, source_id=pair.image_id,
                                   meta={"similarity": pair.similarity}))
    for document in documents:
        for element in document["elements"]:
            if element["type"] == "image":
                element.update(key=_key(element["url"]), status=IMAGE_STATUS_OK)
    return documents


def world_texts(world: SampleWorld) -> list[str]:
    """Every text of the world's training sources: pair texts, true captions, story sentences (what the sample
    world's tokenizer is trained on)."""
    texts: list[str] = []
    for pair in world.pairs:
        texts.append(pair.text)
        texts.append(pair.caption)
    for story in world.stories:
        texts.extend(story.sentences)
    return texts


def world_images(world: SampleWorld, size: int | None = None) -> dict[str, bytes]:
    """JPEG bytes per image key (``image_id``), rendered at ``size`` (default: the world's)."""
    size = size or world.config.image_size
    return {image_id: encode(render(scene, size), "jpeg") for image_id, scene in world.scenes().items()}


def world_truth(world: SampleWorld) -> dict[str, dict[str, Any]]:
    """Per image key: ``scene``, ``caption`` (true caption of the image), ``text`` (shown),
    ``text_kind`` and ``mismatched``. Story images' ``caption`` is their frame's full caption."""
    truth: dict[str, dict[str, Any]] = {}
    for pair in world.pairs:
        truth[pair.image_id] = {"scene": pair.scene, "caption": pair.caption, "text": pair.text,
                                "text_kind": pair.text_kind, "mismatched": pair.mismatched}
    for story in world.stories:
        for image in story.images:
            truth[image.image_id] = {"scene": image.scene, "caption": caption(image.scene),
                                     "text": story.sentences[image.matched_text_index],
                                     "text_kind": "mismatched" if image.mismatched else "story_sentence",
                                     "mismatched": image.mismatched}
    return truth
