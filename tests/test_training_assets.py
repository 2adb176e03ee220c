"""checkpoint -> evaluation_report in Dagster on a tiny sample world, upstream manifests from the real assets."""

import json
from pathlib import Path

import dagster as dg
import pytest

from assets.clip import clip_scorer
from assets.evaluation import EvaluationSettings, evaluation_report, evaluation_report_beats_untrained
from assets.metadata import data_version
from assets.packing import tokenizer
from assets.sample_world import sample_world
from assets.training import TrainingSettings, checkpoint
from orchestration.io_managers import ManifestIOManager
from orchestration.resources import SampleWorld, SampleWorldClipScorer, SampleWorldTokenizer, Storage
from pipelines.packing import PackingConfig, pack_documents
from pipelines.sample_world import WorldConfig, generate_world
from pipelines.shards import write_shards
from pipelines.tokenizer import load_tokenizer
from pipelines.world_data import world_documents, world_images

PACKING = PackingConfig(max_length=160, num_image_tokens=8, seed=0)


@dg.asset(name="packed_sequences", group_name="packing")
def world_packed_sequences(storage: Storage, tokenizer: dict, sample_world: dict) -> dict:
    """Stand-in for the download -> filter -> pack chain: the world's documents packed the same way."""
    world = generate_world(WorldConfig(**{k: v for k, v in sample_world["config"].items()
                                          if k not in ("docs_per_shard", "rows_per_shard")}))
    text_tokenizer = load_tokenizer(tokenizer["path"], boi_token="<BoI>", image_token="<image>")
    thresholds = {"world": {"min_similarity": 0.1, "max_images_per_document": 6}}
    meta = {"packing": PACKING.to_dict(), "filter_thresholds": thresholds}
    out = storage.path("packed_sequences", data_version(meta).value)
    sequences = pack_documents(world_documents(world), text_tokenizer, PACKING, images=world_images(world))
    index = write_shards((s.to_sample(f"{i:09d}") for i, s in enumerate(sequences)), out, maxcount=8, prefix="seq", meta=meta)
    return {"path": str(out), "urls": index.urls(out), "samples": index.samples, "meta": meta}


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph")
    world = SampleWorld(n_pairs=8, n_stories=3, n_eval=2)
    storage = Storage(root=str(root))
    resources = {
        "storage": storage,
        "world": world,
        "tokenizer_source": SampleWorldTokenizer(world=world),
        "clip_scorer_source": SampleWorldClipScorer(world=world, steps=2, batch_size=8, training_pairs=8,
                                                    training_stories=4),
        "io_manager": ManifestIOManager(storage=storage),
    }
    assets = [sample_world, tokenizer, clip_scorer, world_packed_sequences, checkpoint, evaluation_report,
              evaluation_report_beats_untrained]
    run_config = dg.RunConfig(ops={
        "checkpoint": TrainingSettings(max_steps=2, warmup_steps=0, checkpoint_every=2, vae_steps=3),
        "evaluation_report": EvaluationSettings(limit=1, num_inference_steps=2, max_new_tokens=4),
    })
    with dg.instance_for_test() as instance:
        result = dg.materialize(assets, resources=resources, run_config=run_config, instance=instance)
        yield root, result, assets, resources, run_config, instance


def test_checkpoint_has_lineage_and_a_baseline(graph):
    root, result, *_ = graph
    assert result.success
    manifest = result.output_for_node("checkpoint")
    assert manifest["step"] == 2 and Path(manifest["model_dir"], "config.json").is_file()
    assert Path(manifest["untrained_model_dir"], "model.safetensors").is_file()
    assert manifest["shards"]["data_version"] == Path(manifest["shards"]["path"]).name
    assert manifest["filter_thresholds"] == {"world": {"min_similarity": 0.1, "max_images_per_document": 6}}
    metadata = result.asset_materializations_for_node("checkpoint")[0].metadata
    assert metadata["step"].value == 2 and "data:image/png;base64," in metadata["loss_curve"].value
    assert isinstance(metadata["vae_final_loss"].value, float)


def test_report_compares_with_the_untrained_baseline(graph):
    root, result, *_ = graph
    manifest = result.output_for_node("evaluation_report")
    assert set(manifest["scores"]) == {"trained", "untrained (step 0)"}
    assert "clip_score" in manifest["scores"]["trained"]
    text = Path(manifest["report"]).read_text()
    checkpoint_manifest = result.output_for_node("checkpoint")
    for needle in (checkpoint_manifest["shards"]["data_version"], checkpoint_manifest["model_config_hash"],
                   checkpoint_manifest["git_commit"], "min_similarity", "sample_world_tiny_clip", "| text_to_image |"):
        assert needle in text, needle
    assert (Path(manifest["path"]) / "loss.png").is_file()
    metadata = result.asset_materializations_for_node("evaluation_report")[0].metadata
    assert "captioning/cider" in metadata and "untrained captioning/cider" in metadata
    evaluations = result.get_asset_check_evaluations()
    assert [e.check_name for e in evaluations] == ["evaluation_report_beats_untrained"]


def test_materializing_the_checkpoint_again_resumes_without_new_steps(graph):
    root, first, assets, resources, run_config, instance = graph
    only_checkpoint = dg.RunConfig(ops={"checkpoint": run_config.ops["checkpoint"]})
    again = dg.materialize(assets, selection=[checkpoint], resources=resources, run_config=only_checkpoint,
                           instance=instance)
    manifest = again.output_for_node("checkpoint")
    assert manifest["checkpoint"] == first.output_for_node("checkpoint")["checkpoint"]
    records = [json.loads(line) for line in Path(manifest["run_dir"], "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
