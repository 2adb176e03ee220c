"""evaluate_checkpoint on a tiny model, the CLIP score of generated images, and the written report."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from model.config import MMInterleavedConfig
from model.mm_interleaved import MMInterleaved
from pipelines.data.clip_score import ClipScorer
from pipelines.data.tokenizer import train_tokenizer
from pipelines.evaluation.clip_similarity import clip_score
from pipelines.evaluation.report import inline_images, write_report
from pipelines.evaluation.run import VAE_CEILING, EvaluationConfig, evaluate_checkpoint, world_image_loader, written_world_config
from pipelines.evaluation.sample_world_tasks import TASKS
from pipelines.lineage import git_commit
from pipelines.sample_world import WorldConfig, generate_world, render, write_metadata
from pipelines.sample_world.documents import world_texts
from pipelines.sample_world.formats import WORLD_CONFIG_FILE
from pipelines.training.clip_scorer import tiny_clip_config

WORLD = WorldConfig(seed=3, n_pairs=4, n_stories=2, n_eval=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A written world and an untrained tiny model saved as a ``model/`` folder."""
    root = tmp_path_factory.mktemp("evaluation")
    world = generate_world(WORLD)
    write_metadata(world, root / "raw", "http://127.0.0.1:1")
    torch.manual_seed(0)
    model = MMInterleaved.from_config(MMInterleavedConfig.tiny(), train_tokenizer(world_texts(world)))
    model.save_pretrained(root / "model")
    scorer = ClipScorer.from_config(tiny_clip_config(image_size=32, context_length=16))
    return root, scorer


@pytest.fixture(scope="module")
def result(setup):
    root, scorer = setup
    return evaluate_checkpoint(root / "model", root / "raw" / "eval", EvaluationConfig(limit=1, num_inference_steps=2,
                               max_new_tokens=4), world=WORLD, clip_scorer=scorer, progress=False)


def test_every_task_is_scored_with_a_labelled_clip_score(result):
    expected = [*TASKS[:TASKS.index("text_to_image") + 1], VAE_CEILING, *TASKS[TASKS.index("text_to_image") + 1:]]
    assert [t.task for t in result.tasks] == expected
    assert all(t.count == 1 and (t.examples or t.task == VAE_CEILING) for t in result.tasks)
    ceiling = next(t for t in result.tasks if t.task == VAE_CEILING).metrics
    assert 0.0 <= ceiling["attribute_accuracy"] <= 1.0 and ceiling["rendered"] > 0.5  # the parser reads 32-px renderings
    assert result.step is None  # a model folder outside a training run
    assert result.clip is not None and result.clip.count == 1 and result.clip.scorer == "sample_world_tiny_clip"
    assert 0.0 <= result.clip.clip_score <= 100.0 and result.clip.reference_clip_score is not None
    assert result.fid is None  # one image per task: no covariance to compare
    data = json.loads(json.dumps(result.to_dict()))
    assert data["tasks"][0]["examples"][0]["prompt"] == ["<image>"]
    assert set(result.metrics()) == {*TASKS, VAE_CEILING, "clip_score"}
    assert all(e.low <= e.value <= e.high for metrics in result.estimates().values() for e in metrics.values())


def test_sampling_is_seeded(setup, result):
    root, _ = setup
    again = evaluate_checkpoint(root / "model", root / "raw" / "eval", EvaluationConfig(
        tasks=("text_to_image",), limit=1, num_inference_steps=2, max_new_tokens=4), progress=False)
    first = next(t for t in result.tasks if t.task == "text_to_image").examples[0]["images"][0]
    assert again.tasks[0].examples[0]["images"][0].tobytes() == first.tobytes()


def test_image_tasks_need_the_world_that_wrote_the_eval_files(setup, tmp_path):
    root, _ = setup
    assert WorldConfig(**written_world_config(root / "raw" / "eval")) == WORLD  # written beside the splits
    bare = shutil.copytree(root / "raw" / "eval", tmp_path / "eval")
    (bare / WORLD_CONFIG_FILE).unlink()
    with pytest.raises(ValueError, match="need the world's images"):
        evaluate_checkpoint(root / "model", bare, EvaluationConfig(tasks=("captioning",), limit=1), progress=False)
    with pytest.raises(ValueError, match="was not written by the sample world"):
        world_image_loader(WorldConfig(seed=4, n_pairs=4, n_stories=2, n_eval=2), root / "raw" / "eval")
    image = world_image_loader(WORLD, root / "raw" / "eval")("e00000")
    assert image.size == (WORLD.image_size, WORLD.image_size)


def test_clip_score_scores_references_alike_and_checks_lengths():
    """Images scored as generated and as references give the same number; mismatched lengths are refused."""
    torch.manual_seed(0)
    scorer = ClipScorer.from_config(tiny_clip_config(image_size=32, context_length=16))
    scene = generate_world(WORLD).pairs[0]
    image = render(scene.scene, 64)
    result = clip_score(scorer, [image, image], [scene.caption, scene.caption], references=[image, image])
    assert result.clip_score == pytest.approx(result.reference_clip_score)
    with pytest.raises(ValueError, match="as many images as texts"):
        clip_score(scorer, [image], [])


def test_report_compares_results_and_is_replaced_atomically(result, tmp_path):
    training = {"trained": [{"step": s, "loss": 3.0 / s, "text_loss": 2.0 / s, "image_loss": 0.1 / s, "seconds": 1.0}
                            for s in range(1, 5)]}
    lineage = {"checkpoint": "run/checkpoints/step-00000004", "filter thresholds": {"min_similarity": 0.24},
               "git commit": git_commit()}
    out = write_report(tmp_path / "report", {"trained": result, "untrained (step 0)": result}, training=training,
                       lineage=lineage, examples_of=["trained"])
    text = (out / "report.md").read_text()
    assert "| captioning | cider |" in text and "trained − untrained (step 0)" in text and "+0.000" in text
    assert "min_similarity" in text and "sample_world_tiny_clip" in text and "FID: not computed" in text
    for name in re.findall(r"\]\(([^)]+\.png)\)", text):
        assert Image.open(out / name).size[0] > 50
    assert {"tasks.png", "loss.png", "examples_trained_text_to_image.png"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "results.json").read_text())["results"]["trained"]["tasks"][0]["task"] == "captioning"
    assert "data:image/png;base64," in inline_images(out, names=["tasks.png"])

    write_report(tmp_path / "report", {"only": result})
    assert "only" in (out / "report.md").read_text() and not (out / "loss.png").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["report"]  # no temporary folder left


def test_git_commit_tolerates_a_folder_outside_git(tmp_path):
    assert git_commit(tmp_path) == "not a git repo"
    assert re.fullmatch(r"[0-9a-f]{40}(\+dirty)?|not a git repo", git_commit(Path(__file__).parent))
