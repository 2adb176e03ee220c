"""Real-benchmark readers on small files in the official layouts, and their runners."""

import json
from dataclasses import dataclass

import pytest
from PIL import Image

from pipelines.evaluation.benchmarks import (
    BenchmarkFiles,
    evaluate_captioning,
    evaluate_vqa,
    read_benchmark,
    read_karpathy_coco,
    read_textvqa,
    read_vqa,
)


@dataclass
class Output:
    text: str
    images: tuple = ()


def colour_namer(prompt, **kwargs):
    """A real (if simple) captioner: names the dominant colour of the image."""
    red, green, blue = prompt[0].resize((1, 1)).getpixel((0, 0))
    return Output("a red square" if red > max(green, blue) else "a blue square")


@pytest.fixture
def coco(tmp_path):
    (tmp_path / "val2014").mkdir()
    for name, colour in (("COCO_val2014_000000000001.jpg", "red"), ("COCO_val2014_000000000002.jpg", "blue")):
        Image.new("RGB", (16, 16), colour).save(tmp_path / "val2014" / name)
    karpathy = {
        "images": [
            {"filepath": "val2014", "filename": "COCO_val2014_000000000001.jpg", "split": "test", "cocoid": 1,
             "sentences": [{"raw": "A red square."}, {"raw": "a square that is red"}]},
            {"filepath": "val2014", "filename": "COCO_val2014_000000000002.jpg", "split": "test", "cocoid": 2,
             "sentences": [{"raw": "A blue square."}, {"raw": "blue square on white"}]},
            {"filepath": "train2014", "filename": "x.jpg", "split": "train", "cocoid": 3, "sentences": [{"raw": "x"}]},
        ]
    }
    (tmp_path / "dataset_coco.json").write_text(json.dumps(karpathy))
    questions = {"questions": [{"question_id": 10, "image_id": 1, "question": "What colour is it?"},
                               {"question_id": 20, "image_id": 2, "question": "What colour is it?"}]}
    annotations = {"annotations": [{"question_id": 10, "answers": [{"answer": "red"}] * 10},
                                   {"question_id": 20, "answers": [{"answer": "blue"}] * 2 + [{"answer": "navy"}] * 8}]}
    (tmp_path / "questions.json").write_text(json.dumps(questions))
    (tmp_path / "annotations.json").write_text(json.dumps(annotations))
    return tmp_path


def test_karpathy_reader_and_captioning(coco):
    items = list(read_karpathy_coco(coco / "dataset_coco.json", coco, split="test"))
    assert [i.image_id for i in items] == ["1", "2"]
    assert items[0].references == ("A red square.", "a square that is red")
    result = evaluate_captioning(colour_namer, items)
    assert result["count"] == 2 and result["captions"] == {"1": "a red square", "2": "a blue square"}
    assert result["cider"] > 0


def test_vqa_reader_and_accuracy(coco):
    items = list(read_vqa(coco / "questions.json", coco / "annotations.json", coco / "val2014"))
    assert [i.question_id for i in items] == ["10", "20"] and len(items[1].answers) == 10

    def answer(prompt, **kwargs):
        assert prompt[1] == "What colour is it? Answer:"
        return Output(colour_namer(prompt).text.split()[1])

    result = evaluate_vqa(answer, items)
    # "red": 10/10 humans -> 1.0; "blue": 2 of 10 humans -> 0.6 (official leave-one-out average)
    assert result["accuracy"] == pytest.approx((1.0 + 0.6) / 2)


def test_textvqa_reader(tmp_path):
    (tmp_path / "textvqa.json").write_text(json.dumps({"data": [
        {"question_id": 5, "image_id": "abc", "question": "what does it say?", "answers": ["stop"] * 10}]}))
    (item,) = read_textvqa(tmp_path / "textvqa.json", tmp_path / "train_images")
    assert item.image_path == tmp_path / "train_images" / "abc.jpg" and item.answers == ("stop",) * 10


def test_reader_errors_name_the_file(tmp_path):
    (tmp_path / "bad.json").write_text('{"images": [\n{"split": "test"}]}')
    with pytest.raises(ValueError, match=r"bad.json: images\[0\] lacks"):
        list(read_karpathy_coco(tmp_path / "bad.json", tmp_path))
    (tmp_path / "broken.json").write_text('{"data": [\n')
    with pytest.raises(ValueError, match=r"broken.json:2"):
        list(read_textvqa(tmp_path / "broken.json", tmp_path))
    with pytest.raises(FileNotFoundError, match="benchmark image missing"):
        evaluate_captioning(colour_namer, read_karpathy_coco(_karpathy(tmp_path), tmp_path))


def _karpathy(tmp_path):
    path = tmp_path / "k.json"
    path.write_text(json.dumps({"images": [{"filename": "nope.jpg", "split": "test", "sentences": [{"raw": "x"}]}]}))
    return path


def test_benchmark_files_pick_their_reader_and_name_what_is_missing(coco, tmp_path):
    okvqa = BenchmarkFiles("okvqa", coco / "annotations.json", coco / "val2014", questions=coco / "questions.json")
    assert [i.question_id for i in read_benchmark(okvqa)] == ["10", "20"]
    coco_files = BenchmarkFiles("coco", coco / "dataset_coco.json", coco)
    assert [i.image_id for i in read_benchmark(coco_files)] == ["1", "2"]
    (tmp_path / "textvqa.json").write_text(json.dumps({"data": [
        {"question_id": 5, "image_id": "abc", "question": "what does it say?", "answers": ["stop"] * 10}]}))
    (tmp_path / "images").mkdir()
    (item,) = read_benchmark(BenchmarkFiles("textvqa", tmp_path / "textvqa.json", tmp_path / "images"))
    assert item.answers == ("stop",) * 10
    with pytest.raises(ValueError, match="unknown benchmark 'gqa'"):
        BenchmarkFiles("gqa", coco / "annotations.json", coco)
    with pytest.raises(FileNotFoundError, match="okvqa: .*missing.json is not a file"):
        BenchmarkFiles("okvqa", coco / "missing.json", coco, questions=coco / "questions.json")
    with pytest.raises(FileNotFoundError, match="image folder"):
        BenchmarkFiles("coco", coco / "dataset_coco.json", coco / "nowhere")
