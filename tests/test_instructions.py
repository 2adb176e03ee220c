"""Instruction data in LLaVA's JSON layout: the reader (malformed items named by file and index, the rest read), the
VQAv2 converter, and the sample world's own instruction files read back."""

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pipelines.data.errors import BadRecordLog, reraise
from pipelines.data.instructions import ImageFolder, InstructionSources, read_instructions, vqa_instructions
from pipelines.evaluation.benchmarks import read_vqa
from pipelines.sample_world.instructions import InstructionConfig, write_instructions
from pipelines.sample_world.world import WorldConfig, caption, generate_world, scene_questions


def _image(path: Path, fmt: str, colour=(200, 30, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path, format=fmt)


def _turns(*pairs):
    return [{"from": speaker, "value": value} for speaker, value in pairs]


@pytest.fixture
def llava_file(tmp_path):
    images = tmp_path / "images"
    _image(images / "coco" / "train2017" / "a.jpg", "JPEG")
    _image(images / "labels" / "a.png", "PNG", (0, 0, 0))
    data = Image.new("RGB", (64, 64), (10, 200, 10))
    buffer = io.BytesIO()
    data.save(buffer, format="JPEG")
    (images / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    (images / "not_an_image.jpg").write_text("<html>404</html>")
    items = [
        {"id": "vqa", "image": "coco/train2017/a.jpg",
         "conversations": _turns(("human", "<image>\nWhat colour is the triangle?"), ("gpt", "red"))},
        {"id": "seg", "image": ["labels/a.png", "coco/train2017/a.jpg"],
         "conversations": _turns(("human", "<image>"), ("gpt", "<image>"))},
        {"id": "text", "conversations": _turns(("human", "Say hi."), ("gpt", "hi"), ("human", "Again?"), ("gpt", "hi"))},
        "a string, not an item",
        {"id": "no-conversations", "image": "coco/train2017/a.jpg"},
        {"id": "bad-role", "conversations": _turns(("system", "be nice"), ("gpt", "ok"))},
        {"id": "gpt-first", "conversations": _turns(("gpt", "hello"), ("human", "hi"))},
        {"id": "two-markers", "image": "coco/train2017/a.jpg",
         "conversations": _turns(("human", "<image> and <image>?"), ("gpt", "same"))},
        {"id": "missing", "image": "coco/train2017/gone.jpg",
         "conversations": _turns(("human", "<image>\nWhat is it?"), ("gpt", "nothing"))},
        {"id": "truncated", "image": "truncated.jpg",
         "conversations": _turns(("human", "<image>\nWhat is it?"), ("gpt", "green"))},
        {"id": "not-image", "image": "not_an_image.jpg",
         "conversations": _turns(("human", "<image>\nWhat is it?"), ("gpt", "a page"))},
        {"id": "no-answer", "conversations": _turns(("human", "Hello?"))},
    ]
    path = tmp_path / "llava_mix.json"
    path.write_text(json.dumps(items))
    return path, images


def test_reader_names_each_malformed_item_by_file_and_index_and_reads_the_rest(llava_file):
    path, images = llava_file
    log = BadRecordLog()
    documents = list(read_instructions(path, images, log))
    assert [d["source_row"] for d in documents] == [0, 1, 2]
    assert all(d["kind"] == "instruction" and d["source_file"] == str(path) for d in documents)
    expected = {3: "not an object", 4: "conversations", 5: "'system'", 6: "expected 'human'",
                7: "2 <image> markers for 1 listed images", 8: "not found", 9: "does not decode",
                10: "does not decode", 11: "no answer"}
    assert {r.line: r.file for r in log.records} == {index: str(path) for index in expected}
    for record in log.records:
        assert expected[record.line] in record.reason, record
        assert str(record).startswith(f"{path}:{record.line}: ")

    vqa, seg, text = documents
    assert [(e["type"], e["role"], e["text"] or e["key"]) for e in vqa["elements"]] == [
        ("image", "instruction", "coco/train2017/a.jpg"), ("text", "instruction", "What colour is the triangle?"),
        ("text", "answer", "red")]
    assert json.loads(vqa["meta"]) == {"id": "vqa"}
    assert [(e["type"], e["role"], e["key"]) for e in seg["elements"]] == [
        ("image", "instruction", "labels/a.png"), ("image", "answer", "coco/train2017/a.jpg")]
    assert [(e["role"], e["text"]) for e in text["elements"]] == [
        ("instruction", "Say hi."), ("answer", "hi"), ("instruction", "Again?"), ("answer", "hi")]
    folder = ImageFolder(images)
    assert "labels/a.png" in folder and "labels/gone.png" not in folder
    assert folder["labels/a.png"] == (images / "labels" / "a.png").read_bytes()


def test_reader_refuses_a_file_that_is_not_a_list_of_items(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"conversations": []}')
    with pytest.raises(ValueError, match="bad.json: expected a JSON list"):
        list(read_instructions(path, tmp_path))
    path.write_text("[{")
    with pytest.raises(ValueError, match="bad.json:1: not JSON"):
        list(read_instructions(path, tmp_path))


def test_sources_resolve_relative_paths_under_the_raw_folder(tmp_path):
    files, image_dir = InstructionSources(files=("instructions/a.json", "/data/llava.json"),
                                          image_dir="instructions").resolve(tmp_path)
    assert files == [tmp_path / "instructions" / "a.json", Path("/data/llava.json")]
    assert image_dir == tmp_path / "instructions"


def test_vqav2_questions_and_annotations_become_llava_items_the_reader_reads(tmp_path):
    _image(tmp_path / "train2014" / "COCO_train2014_000000000042.jpg", "JPEG")
    questions = tmp_path / "q.json"
    annotations = tmp_path / "a.json"
    questions.write_text(json.dumps({"questions": [{"question_id": 7, "image_id": 42, "question": "Is it red?"}]}))
    annotations.write_text(json.dumps({"annotations": [
        {"question_id": 7, "answers": [{"answer": a} for a in ["yes"] * 7 + ["no"] * 3]}]}))
    items = vqa_instructions(read_vqa(questions, annotations, "", "train2014/COCO_train2014_{image_id:012d}.jpg"))
    assert items == [{"id": "7", "image": "train2014/COCO_train2014_000000000042.jpg", "conversations": [
        {"from": "human", "value": "<image>\nIs it red? Answer:"}, {"from": "gpt", "value": "yes"}]}]
    path = tmp_path / "vqav2.json"
    path.write_text(json.dumps(items))
    (document,) = read_instructions(path, tmp_path, reraise)
    assert [e["text"] for e in document["elements"] if e["type"] == "text"] == ["Is it red? Answer:", "yes"]


def test_sample_world_instruction_file_round_trips_through_the_reader(tmp_path):
    world = generate_world(WorldConfig(seed=5, n_pairs=12, n_stories=4, n_eval=2))
    path = write_instructions(world, tmp_path, InstructionConfig(vqa_per_image=3))
    documents = list(read_instructions(path, path.parent, reraise))
    items = json.loads(path.read_text())
    assert len(documents) == len(items) > 0
    scenes = world.scenes()
    kinds = {kind: 0 for kind in ("vqa", "caption", "grounding", "seg", "t2i", "story")}
    stories = {story.story_id: story for story in world.stories}
    for item, document in zip(items, documents):
        image_id = Path(item["image"][-1]).stem
        # <image id>-vqa-0, -caption, -grounding-0, -seg, -t2i; <story id>-story-<k>
        kind = "story" if "-story-" in item["id"] else item["id"][len(image_id) + 1:].split("-")[0]
        kinds[kind] += 1
        scene = scenes[image_id]
        texts = [(e["role"], e["text"]) for e in document["elements"] if e["type"] == "text"]
        keys = [(e["role"], e["key"]) for e in document["elements"] if e["type"] == "image"]
        if kind == "seg":  # [label map] -> [scene]: the answer is an image to draw
            assert texts == [] and keys == [("instruction", f"labels/{image_id}.png"),
                                            ("answer", f"images/{image_id}.jpg")]
            continue
        if kind == "t2i":  # [caption] -> [scene], the caption lower-cased as pairs are packed
            assert texts == [("instruction", caption(scene).lower())] and keys == [("answer", f"images/{image_id}.jpg")]
            continue
        if kind == "story":  # [frame, sentence, ..., frame k-1, sentence k-1 + sentence k] -> [frame k]
            story_id, k = item["id"].rsplit("-story-", 1)
            story, k = stories[story_id], int(k)
            assert [role for role, _ in keys] == ["instruction"] * k + ["answer"]
            assert [key for _, key in keys] == [f"images/{image.image_id}.jpg" for image in story.images[:k + 1]]
            assert texts == [("instruction", s) for s in story.sentences[:k - 1]] + [
                ("instruction", f"{story.sentences[k - 1]} {story.sentences[k]}")]
            continue
        assert keys == [("instruction", f"images/{image_id}.jpg")]
        if kind == "vqa":  # asked as the VQA benchmark asks: [image, question] -> answer
            question = {"question": texts[0][1], "answer": texts[1][1]}
            assert question in [{"question": q["question"], "answer": q["answer"]} for q in scene_questions(scene)]
        elif kind == "caption":  # captioning: [image] -> caption, lower-cased as pairs are packed
            assert texts == [("answer", caption(scene).lower())]
        else:
            assert texts[0][1].startswith("What is ") and texts[1][1].endswith(".")
            assert texts[1][1] in [f"{o.describe()}." for o in scene.objects] + [
                f"the digit {scene.glyph.digit}." if scene.glyph else ""]
    assert all(kinds.values()), kinds
    assert any("digit" in i["conversations"][0]["value"] for i in items), "digit questions are among the VQA items"
