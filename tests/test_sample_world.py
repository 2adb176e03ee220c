"""The sample world: deterministic, exact ground truth, real formats, parse-back of images."""

import hashlib
import io
import json
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.data.errors import BadRecordLog, reraise
from pipelines.data.readers import read_source
from pipelines.evaluation.sample_world_tasks import label_map_image as eval_label_map
from pipelines.sample_world.formats import write_metadata
from pipelines.sample_world.instructions import InstructionConfig
from pipelines.sample_world.parse import parse_image
from pipelines.sample_world.scenes import COLOURS, Scene, encode, random_scene, render, render_segmentation
from pipelines.sample_world.world import WorldConfig, caption, generate_world

BASE = "http://127.0.0.1:8123"
SMALL = WorldConfig(seed=3, n_pairs=40, n_stories=12, n_eval=10)


def digest_tree(root):
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_given_seed(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_metadata(generate_world(SMALL), a, BASE, mmc4_zipped=False)
    write_metadata(generate_world(SMALL), b, BASE, mmc4_zipped=False)
    assert digest_tree(a) == digest_tree(b)
    assert generate_world(SMALL).routes() == generate_world(SMALL).routes()
    other = generate_world(WorldConfig(seed=4, n_pairs=40, n_stories=12, n_eval=10))
    assert other.routes() != generate_world(SMALL).routes()


def test_items_do_not_depend_on_other_counts():
    small, big = generate_world(SMALL), generate_world(WorldConfig(seed=3, n_pairs=80, n_stories=20, n_eval=10))
    assert [p.text for p in small.pairs] == [p.text for p in big.pairs[:40]]
    assert [s.sentences for s in small.stories] == [s.sentences for s in big.stories[:12]]


@pytest.mark.parametrize("size", [64, 96])
def test_parse_reads_every_rendered_scene_back(size):
    world = generate_world(WorldConfig(seed=1, n_pairs=60, n_stories=10, n_eval=5, image_size=size))
    scenes = world.scenes()
    for image_id, scene in scenes.items():
        assert parse_image(render(scene, size)) == Scene(scene.objects, scene.glyph), image_id
    # also through the JPEG bytes the server sends
    for path, data in list(world.routes().items())[:40]:
        image_id = path.rsplit("/", 1)[1].split(".")[0]
        parsed = parse_image(Image.open(io.BytesIO(data)))
        assert (parsed.objects, parsed.glyph) == (scenes[image_id].objects, scenes[image_id].glyph), image_id


def test_parse_reports_what_is_not_there():
    blank = Image.new("RGB", (64, 64), (238, 238, 238))
    assert parse_image(blank) == Scene(objects=())
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert len(parse_image(noise).objects) == 0


def test_segmentation_map_labels():
    scene = random_scene(random.Random(5), "x", min_objects=3, max_objects=3, glyph_probability=1.0)
    labels = render_segmentation(scene, 64)
    colours = list(COLOURS)
    present = {colours[v - 1] for v in np.unique(labels) if 0 < v < 255}
    assert present == {o.colour for o in scene.objects}
    assert (labels == 255).any() and (labels == 0).mean() > 0.5


def test_pairs_stories_and_mismatches_are_labelled():
    world = generate_world(WorldConfig(seed=0, n_pairs=300, n_stories=40))
    kinds = [p.text_kind for p in world.pairs]
    assert 10 < kinds.count("mismatched") < 60 and kinds.count("alt_text") > 100 and kinds.count("caption") > 20
    for pair in world.pairs:
        mentioned = {(o.colour, o.shape) for o in pair.scene.objects}
        if pair.mismatched:
            assert not any(f"{c} {s}" in pair.text for c, s in mentioned)
            assert pair.similarity < 0.24
        else:
            assert pair.similarity >= 0.24
        if pair.text_kind == "caption":
            assert pair.text == caption(pair.scene)
    assert {len(s.images) for s in world.stories} <= set(range(2, 7))
    assert len({len(s.images) for s in world.stories}) >= 3
    for story in world.stories:
        assert len(story.sentences) == len(story.images) + 1
        for image, frame in zip(story.images, story.frames):
            assert story.sentences[image.matched_text_index]
            assert (image.scene.objects != frame.objects) == image.mismatched


def test_metadata_in_real_formats_reads_back_exactly(tmp_path):
    world = generate_world(SMALL)
    written = write_metadata(world, tmp_path, BASE, docs_per_shard=5, rows_per_shard=7)
    assert [p.name for p in written["mmc4"]] == [f"docs_shard_{i}_v2.jsonl.zip" for i in range(3)]
    assert len(written["laion"]) == 3 and len(written["cc12m"]) == 3
    log = BadRecordLog()
    docs = {k: [d for p in written[k] for d in read_source(p, log)] for k in ("mmc4", "laion", "cc12m")}
    assert log.count == 0
    assert len(docs["mmc4"]) == 12 and len(docs["laion"]) + len(docs["cc12m"]) == 40
    truth = {r["url"]: r for r in map(json.loads, written["ground_truth"][0].read_text().splitlines())}
    assert len(truth) == 40 + sum(len(s.images) for s in world.stories)
    for doc in docs["laion"] + docs["cc12m"]:
        image, text = doc["elements"]
        assert truth[image["url"]]["text"] == text["text"]
        assert image["url"].startswith(BASE + "/images/")
    for doc, story in zip(docs["mmc4"], world.stories):
        texts = [e["text"] for e in doc["elements"] if e["type"] == "text"]
        assert texts == story.sentences
        for element in doc["elements"]:
            if element["type"] == "image":
                record = truth[element["url"]]
                assert (element["matched_sim"] < 0.24) == record["mismatched"]


def test_eval_splits_are_held_out_and_exact():
    world = generate_world(SMALL)
    train_ids = set(world.scenes())
    splits = world.eval_splits
    assert set(splits) == {"captioning", "vqa", "text_to_image", "seg_to_image", "story_continuation"}
    assert all(len(splits[k]) == 10 for k in ("captioning", "text_to_image", "seg_to_image", "story_continuation"))
    assert not train_ids & set(world.eval_scenes)
    assert {q["type"] for q in splits["vqa"]} >= {"count", "colour", "position", "digit"}
    for q in splits["vqa"]:
        parsed = parse_image(Image.open(io.BytesIO(world.image_bytes(q["image_id"]))))
        if q["type"] == "count":
            assert q["answer"] == str(len(parsed.objects))
        if q["type"] == "digit":
            assert q["answer"] == str(parsed.glyph.digit)
        if q["type"] == "colour":
            shape = q["question"].removeprefix("What colour is the ").rstrip("?")
            assert [o.colour for o in parsed.objects if o.shape == shape] == [q["answer"]]
    for item in splits["text_to_image"]:
        scene = Scene.from_dict(item["scene"])
        assert item["prompt"] == caption(scene)
        assert parse_image(render(scene)) == Scene(scene.objects, scene.glyph)
    for item in splits["story_continuation"]:
        assert 2 <= len(item["context"]) <= 5
        assert item["next_image_id"] in world.eval_scenes


def test_config_is_checked():
    with pytest.raises(ValueError, match="image_size"):
        WorldConfig(image_size=16)
    with pytest.raises(ValueError, match="story images"):
        WorldConfig(max_story_images=7)


def test_readers_accept_plain_jsonl_world(tmp_path):
    written = write_metadata(generate_world(SMALL), tmp_path, BASE, mmc4_zipped=False)
    assert sum(1 for p in written["mmc4"] for _ in read_source(p, reraise)) == 12


def test_instruction_data_is_deterministic_and_drawn_as_the_eval_prompts(tmp_path):
    world = generate_world(WorldConfig(seed=3, n_pairs=8, n_stories=6, n_eval=2))
    a = write_metadata(world, tmp_path / "a", BASE, instructions=InstructionConfig())["instructions"][0]
    b = write_metadata(world, tmp_path / "b", BASE, instructions=InstructionConfig())["instructions"][0]
    assert a == tmp_path / "a" / "instructions" / "instructions.json"
    assert digest_tree(a.parent) == digest_tree(b.parent)
    items = json.loads(a.read_text())
    scenes = world.scenes()
    assert {Path(i["image"][-1]).stem for i in items} == set(scenes)  # every training image
    for image_id, scene in scenes.items():
        assert (a.parent / "images" / f"{image_id}.jpg").read_bytes() == encode(render(scene, 64), "jpeg")
        label_map = Image.open(a.parent / "labels" / f"{image_id}.png")
        assert np.array_equal(np.asarray(label_map.convert("RGB")), np.asarray(eval_label_map(scene, 64)))
    stories = [i for i in items if "-story-" in i["id"]]
    per_image = (len(items) - len(stories)) / len(scenes)
    assert 1 + 1 + 1 + 1 < per_image <= 4 + 1 + 1 + 1 + 1  # vqa (up to 4), captioning, grounding, seg/text-to-image
    t2i = next(i for i in items if i["id"].endswith("-t2i"))
    assert t2i["conversations"][0]["value"] == caption(scenes[Path(t2i["image"][0]).stem]).lower()
    # story items: a clean story of n frames gives n - 1, each prompting frame k as the story benchmark does
    clean = [s for s in world.stories if not any(image.mismatched for image in s.images)]
    assert len(stories) >= sum(len(s.images) - 1 for s in clean)
    story = next(s for s in clean if len(s.images) >= 3)
    item = next(i for i in stories if i["id"] == f"{story.story_id}-story-2")
    assert item["image"] == [f"images/{image.image_id}.jpg" for image in story.images[:3]]
    assert item["conversations"][0]["value"] == (f"<image>\n{story.sentences[0]}\n<image>\n{story.sentences[1]} "
                                                 f"{story.sentences[2]}")
    assert item["conversations"][1]["value"] == "<image>"
    fewer = write_metadata(world, tmp_path / "c", BASE, instructions=InstructionConfig(
        instruction_kinds=("captioning",)))["instructions"][0]
    assert len(json.loads(fewer.read_text())) == len(scenes) and not any((fewer.parent / "labels").iterdir())
    with pytest.raises(ValueError, match="unknown instruction kinds"):
        InstructionConfig(instruction_kinds=("vqa", "poetry"))
