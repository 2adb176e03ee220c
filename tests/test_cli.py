"""The ``weft`` console script: train from shards, then generate from the checkpoint it saved."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.mm_interleaved import MMInterleaved
from pipelines.cli import build_parser, main
from pipelines.data.clip_score import ClipScorer
from pipelines.evaluation.run import EvaluationConfig, generation_arguments
from pipelines.sample_world.world import WorldConfig, generate_world
from pipelines.training.clip_scorer import tiny_clip_config

from world_shards import write_world_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny model trained for two steps by ``weft train`` on packed sample-world shards."""
    out = tmp_path_factory.mktemp("cli")
    write_world_shards(out, WorldConfig(seed=3, n_pairs=24, n_stories=4), maxcount=8)
    config = {"run_dir": str(out / "run"), "shards": str(out / "shards"), "tokenizer": str(out / "tokenizer"),
              "max_steps": 50, "warmup_steps": 1, "zero_stage": 0, "progress": False, "shuffle_buffer": 4}
    (out / "train.json").write_text(json.dumps(config))
    # --set overrides the file (JSON values): two steps, not fifty
    assert main(["train", "--config", str(out / "train.json"), "--set", "max_steps=2", "--set", "checkpoint_every=2"]) == 0
    assert (out / "run" / "checkpoints" / "step-00000002" / "model" / "config.json").is_file()
    return out / "run"


def test_generate_writes_text_and_images_in_order(run_dir, tmp_path):
    Image.new("RGB", (48, 48), (200, 30, 30)).save(tmp_path / "red.png")
    out = tmp_path / "gen"
    # the console script itself, as a user runs it (a run folder resolves to its latest checkpoint)
    command = [str(Path(sys.executable).parent / "weft"), "generate", "--checkpoint", str(run_dir),
               "--image", str(tmp_path / "red.png"), "--prompt", "a red square. next, <BoI>",
               "--max-new-tokens", "4", "--steps", "2", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads((out / "generation.json").read_text())
    assert [e["type"] for e in result["prompt"]] == ["image", "text"]
    # options left out sample as MMInterleaved.generate does by default (it used to be 3.5 here, 7.5 there)
    defaults = inspect.signature(MMInterleaved.generate).parameters
    assert result["settings"] == {"guidance_scale": defaults["guidance_scale"].default,
                                  "max_new_images": defaults["max_new_images"].default, "max_new_tokens": 4,
                                  "num_inference_steps": 2, "seed": 0}
    images = [e for e in result["generated"] if e["type"] == "image"]
    assert result["generated"][0]["type"] == "image" and len(images) == 1  # the prompt's <BoI> forces an image first
    assert Image.open(out / images[0]["path"]).size == (32, 32)  # the tiny preset's image size
    assert "![image-00.png](image-00.png)" in (out / "generation.md").read_text()
    assert not list(tmp_path.glob(".gen.tmp-*"))
    # an existing output is not clobbered without --overwrite
    with pytest.raises(SystemExit, match="--overwrite"):
        main(command[1:])


def test_eval_reads_the_world_beside_its_splits_and_writes_a_report(run_dir, tmp_path):
    from pipelines.sample_world.formats import write_metadata

    write_metadata(generate_world(WorldConfig(seed=3, n_pairs=24, n_stories=4)), tmp_path / "raw", "http://127.0.0.1:1")
    torch.manual_seed(0)
    ClipScorer.from_config(tiny_clip_config(image_size=32, context_length=16)).save(tmp_path / "clip")
    out = tmp_path / "report"
    assert main(["eval", "--checkpoint", str(run_dir), "--eval-dir", str(tmp_path / "raw" / "eval"), "--out", str(out),
                 "--tasks", "captioning", "text_to_image", "--limit", "2", "--steps", "2",
                 "--clip-scorer", str(tmp_path / "clip")]) == 0
    (result,) = json.loads((out / "results.json").read_text())["results"].values()
    assert result["step"] == 2 and [t["task"] for t in result["tasks"]] == ["captioning", "text_to_image", "vae_ceiling"]
    assert result["clip"]["count"] == 2 and result["fid"]["label"] == "FID (clip features, not comparable to FID)"
    assert "captioning" in (out / "report.md").read_text()


def _coco(root: Path) -> Path:
    """Two images and their captions in the Karpathy split's layout, plus VQAv2-style questions about them."""
    (root / "val2014").mkdir(parents=True)
    for number, colour in ((1, "red"), (2, "blue")):
        Image.new("RGB", (48, 48), colour).save(root / "val2014" / f"COCO_val2014_{number:012d}.jpg")
    images = [{"filepath": "val2014", "filename": f"COCO_val2014_{n:012d}.jpg", "split": "test", "cocoid": n,
               "sentences": [{"raw": f"a {c} square."}]} for n, c in ((1, "red"), (2, "blue"))]
    (root / "dataset_coco.json").write_text(json.dumps({"images": images}))
    (root / "questions.json").write_text(json.dumps({"questions": [
        {"question_id": n, "image_id": n, "question": "what colour is it?"} for n in (1, 2)]}))
    (root / "annotations.json").write_text(json.dumps({"annotations": [
        {"question_id": n, "answers": [{"answer": c}] * 10} for n, c in ((1, "red"), (2, "blue"))]}))
    return root


def test_eval_runs_real_benchmarks_from_local_files(run_dir, tmp_path):
    coco = _coco(tmp_path / "coco")
    common = ["--checkpoint", str(run_dir), "--max-new-tokens", "4", "--steps", "2"]
    assert main(["eval", "--benchmark", "coco", "--annotations", str(coco / "dataset_coco.json"), "--images", str(coco),
                 "--out", str(tmp_path / "coco_report"), *common]) == 0
    (result,) = json.loads((tmp_path / "coco_report" / "results.json").read_text())["results"].values()
    assert [(t["task"], t["count"], list(t["metrics"])) for t in result["tasks"]] == [("coco", 2, ["cider"])]
    assert "| coco | cider |" in (tmp_path / "coco_report" / "report.md").read_text()
    vqa = ["--annotations", str(coco / "annotations.json"), "--images", str(coco / "val2014"), *common]
    assert main(["eval", "--benchmark", "vqav2", "--questions", str(coco / "questions.json"), "--limit", "1",
                 "--out", str(tmp_path / "vqa_report"), *vqa]) == 0
    (result,) = json.loads((tmp_path / "vqa_report" / "results.json").read_text())["results"].values()
    assert [(t["task"], t["count"], list(t["metrics"])) for t in result["tasks"]] == [("vqav2", 1, ["accuracy"])]
    assert result["settings"]["benchmark"] == "vqav2" and result["settings"]["num_inference_steps"] == 2
    with pytest.raises(SystemExit, match="vqav2 needs its questions file"):
        main(["eval", "--benchmark", "vqav2", "--out", "o", *vqa])
    with pytest.raises(SystemExit, match="either --eval-dir"):
        main(["eval", "--checkpoint", str(run_dir), "--out", "o"])


def test_eval_options_left_out_take_the_evaluation_defaults():
    args = build_parser().parse_args(["eval", "--checkpoint", "c", "--out", "o", "--eval-dir", "e"])
    from pipelines.cli import evaluation_config

    assert evaluation_config(args) == EvaluationConfig()
    args = build_parser().parse_args(["eval", "--checkpoint", "c", "--out", "o", "--eval-dir", "e", "--steps", "3",
                                      "--tasks", "vqa"])
    assert evaluation_config(args) == EvaluationConfig(num_inference_steps=3, tasks=("vqa",))


def test_eval_samplers_name_the_demos_and_the_papers_settings():
    """The paper's COCO FID settings (guidance 3.5, 250 steps) beside the release demo's (generate's 7.5 / 30) and
    the CPU default; an option given wins over its sampler's value."""
    from pipelines.cli import evaluation_config

    args = build_parser().parse_args(["eval", "--checkpoint", "c", "--out", "o", "--eval-dir", "e", "--sampler", "paper"])
    assert evaluation_config(args).sampling() == {"guidance_scale": 3.5, "num_inference_steps": 250}
    defaults = inspect.signature(MMInterleaved.generate).parameters
    demo = generation_arguments(MMInterleaved.generate, **EvaluationConfig(sampler="demo").sampling())
    assert demo == {"guidance_scale": 7.5, "num_inference_steps": 30} == {k: defaults[k].default for k in demo}
    assert EvaluationConfig().sampling() == {"guidance_scale": None, "num_inference_steps": 10}
    assert EvaluationConfig(sampler="paper", num_inference_steps=50).sampling()["num_inference_steps"] == 50
    with pytest.raises(ValueError, match="sampler"):
        EvaluationConfig(sampler="fast")


def test_cli_errors_name_the_bad_input(run_dir, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"run_dir": "x",\n "shards": }')
    with pytest.raises(SystemExit, match=r"bad.json:2: not JSON"):
        main(["train", "--config", str(bad)])
    bad.write_text(json.dumps({"run_dir": "x", "shards": "y", "learning_rate": 1}))
    with pytest.raises(SystemExit, match=r"unknown TrainConfig keys \['learning_rate'\]"):
        main(["train", "--config", str(bad)])
    (tmp_path / "notimage.png").write_text("hello")
    with pytest.raises(SystemExit, match="notimage.png: cannot read it as an image"):
        main(["generate", "--checkpoint", str(run_dir), "--image", str(tmp_path / "notimage.png"), "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit, match="not a model folder"):
        main(["generate", "--checkpoint", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "o")])
    args = build_parser().parse_args(["generate", "--checkpoint", "c", "--prompt", "a", "--image", "b.png",
                                      "--prompt", "c", "--out", "o"])
    assert args.elements == [("text", "a"), ("image", "b.png"), ("text", "c")]
