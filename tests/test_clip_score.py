import itertools
import json

import numpy as np
import open_clip
import pytest
import torch

from pipelines.data.clip_score import ClipScorer, score_documents, scores_mapping
from pipelines.data.filtering import FilterConfig, FilterReport, filter_documents
from pipelines.sample_world.documents import world_documents, world_images, world_truth
from pipelines.sample_world.world import WorldConfig, generate_world
from pipelines.training.clip_scorer import ScorerTraining, evaluate_scorer, roc_auc, tiny_clip_config, train_world_scorer

TRAINING = ScorerTraining(steps=300, batch_size=96, image_size=48, context_length=48)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("scorer") / "tiny-clip"
    # story sentences are the hard case (mismatched story images): train on a world with many stories
    scorer, report = train_world_scorer(generate_world(WorldConfig(seed=0, n_pairs=400, n_stories=400)), out, TRAINING)
    return scorer, report, out


@pytest.fixture(scope="module")
def held_out():
    return generate_world(WorldConfig(seed=1, n_pairs=200, n_stories=30))


def test_roc_auc_matches_pair_counting():
    rng = np.random.default_rng(0)
    pos, neg = rng.integers(0, 5, 30).tolist(), rng.integers(0, 5, 20).tolist()
    expected = np.mean([1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg)])
    assert roc_auc(pos, neg) == pytest.approx(expected)


def test_short_training_reduces_the_contrastive_loss_and_saves(tmp_path):
    world = generate_world(WorldConfig(seed=0, n_pairs=60, n_stories=8))
    scorer, report = train_world_scorer(world, tmp_path / "s", ScorerTraining(steps=25, batch_size=32, image_size=48))
    assert report["final_loss"] < report["initial_loss"]
    assert scorer.threshold == report["threshold"] == ClipScorer.load(tmp_path / "s").threshold


def test_recaptioned_pairs_are_scored_against_their_recaption_too():
    """A pair in ``recaptions`` gets the similarity to its recaption beside the one to its own text; the filter's
    mapping takes the recaption's when asked; interleaved documents and other pairs get None."""
    world = generate_world(WorldConfig(seed=2, n_pairs=10, n_stories=2))
    torch.manual_seed(0)
    scorer = ClipScorer.from_config(tiny_clip_config(image_size=48, context_length=48))
    documents, images = world_documents(world), world_images(world)
    pairs = [d for d in documents if d["kind"] == "pair"]
    story = next(d for d in documents if d["kind"] != "pair")
    recaptions = {d["doc_id"]: f"A small red circle at the top, digit {i}." for i, d in enumerate(pairs[:4])}
    rows = list(score_documents(documents, scorer, images, recaptions={**recaptions, story["doc_id"]: "ignored"},
                                chunk_documents=3))
    for row in rows:
        document = next(d for d in documents if d["doc_id"] == row["doc_id"])
        if row["doc_id"] in recaptions:
            own = next(e["text"] for e in document["elements"] if e["type"] == "text")
            both = scorer.similarity([images[row["key"]]], [own, recaptions[row["doc_id"]]])[0].tolist()
            assert row["similarity"] == pytest.approx(both[0], abs=1e-5)
            assert row["similarity_recaption"] == pytest.approx(both[1], abs=1e-5)
        else:
            assert row["similarity_recaption"] is None
    recaptioned = [r for r in rows if r["doc_id"] in recaptions]
    assert len(recaptioned) == len(recaptions)
    judged, original = scores_mapping(rows, prefer_recaption=True), scores_mapping(rows)
    for r in rows:
        expected = r["similarity"] if r["similarity_recaption"] is None else r["similarity_recaption"]
        assert judged[(r["doc_id"], r["element_index"])] == expected
        assert original[(r["doc_id"], r["element_index"])] == r["similarity"]


@pytest.mark.slow
def test_trained_scorer_separates_true_from_mismatched_pairs(trained, held_out):
    scorer, report, out = trained
    result = evaluate_scorer(scorer, held_out)  # a world the scorer never saw
    print("tiny scorer:", report["seconds"], "s", result)
    assert result["roc_auc"] >= 0.9
    # save -> load gives the same scores and threshold
    loaded = ClipScorer.load(out)
    assert loaded.threshold == scorer.threshold
    images = list(world_images(held_out).values())[:5]
    texts = ["a red circle", "a small blue square at the center", "x", "y", "z"]
    torch.testing.assert_close(loaded.similarity(images, texts), scorer.similarity(images, texts))


@pytest.mark.slow
def test_filtering_with_the_trained_scorer_removes_mismatched_and_keeps_true_images(trained, held_out):
    scorer, _, _ = trained
    truth = world_truth(held_out)
    documents = world_documents(held_out)
    images = world_images(held_out)
    rows = list(score_documents(documents, scorer, images, chunk_documents=16))
    assert len(rows) == len(images)
    story_row = next(r for r in rows if r["doc_id"].startswith("mmc4"))
    story = next(d for d in documents if d["doc_id"] == story_row["doc_id"])
    assert len(story_row["similarities"]) == sum(e["type"] == "text" for e in story["elements"])
    assert story_row["similarity"] == story_row["similarities"][story_row["matched_text_index"]]

    config = FilterConfig(min_similarity=scorer.threshold, pair_min_similarity=scorer.threshold,
                          one_image_drop_fraction=0.0)

    def run():
        report = FilterReport(config)
        kept = list(filter_documents(documents, config, scores=scores_mapping(rows), report=report))
        return {e["key"] for d in kept for e in d["elements"] if e["type"] == "image"}, report

    kept, report = run()
    mismatched = {k for k, t in truth.items() if t["mismatched"]}
    true_informative = {k for k, t in truth.items() if t["text_kind"] in ("caption", "story_sentence")}
    removed = 1 - len(mismatched & kept) / len(mismatched)
    kept_true = len(true_informative & kept) / len(true_informative)
    print(f"mismatched removed {removed:.3f}, true kept {kept_true:.3f}, "
          f"alt-text pairs kept {len({k for k, t in truth.items() if t['text_kind'] == 'alt_text'} & kept)}")
    assert removed >= 0.8
    assert kept_true >= 0.9
    dropped = {d.url.rsplit("/", 1)[-1].split(".")[0] for d in report.drops if d.element_index is not None}
    assert dropped | kept == set(images) and not dropped & kept  # every image kept or dropped with a reason
    assert all(d.reason for d in report.drops)
    again, report2 = run()
    assert again == kept and [str(d) for d in report2.drops] == [str(d) for d in report.drops]


def test_open_clip_model_from_a_local_checkpoint(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "weft-test-tiny.json").write_text(json.dumps(tiny_clip_config(48, 32)))
    open_clip.add_model_config(str(configs))
    torch.manual_seed(0)
    reference = ClipScorer.from_config(tiny_clip_config(48, 32))
    torch.save(reference.model.state_dict(), tmp_path / "ckpt.pt")
    scorer = ClipScorer.from_pretrained("weft-test-tiny", tmp_path / "ckpt.pt")
    images = list(world_images(generate_world(WorldConfig(seed=3, n_pairs=3, n_stories=0))).values())
    torch.testing.assert_close(scorer.similarity(images, ["a red circle"]), reference.similarity(images, ["a red circle"]))
    with pytest.raises(FileNotFoundError):
        ClipScorer.from_pretrained("weft-test-tiny", tmp_path / "missing.pt")
