"""checkpoint -> instruction_sequences -> finetuned_checkpoint -> evaluation_report in Dagster on a tiny sample world,
upstream manifests from the real assets."""

import json
from pathlib import Path

import dagster as dg
import pytest

from assets.clip import clip_scorer
from assets.evaluation import (
    EvaluationSettings,
    evaluation_report,
    evaluation_report_beats_untrained,
    evaluation_report_finetuned_beats_baselines,
)
from assets.finetuning import (
    FinetuningSettings,
    InstructionSettings,
    finetuned_checkpoint,
    instruction_sequences,
    instruction_sequences_shard_integrity,
)
from assets.packing import tokenizer
from assets.resources import SampleWorld, SampleWorldClipScorer, Storage
from assets.sample_world import sample_world
from assets.training import TrainingSettings, checkpoint
from orchestration.definitions import sample_world_resources
from pipelines.data.packed_sequences import PackedSequences
from pipelines.data.packing import PackingConfig, PackingStats, pack_documents
from pipelines.data.shards import read_index, write_shards
from pipelines.data.tokenizer import TokenizerManifest
from pipelines.evaluation.evaluation_report import BASELINE_METRICS, FINETUNED, TRAINED, UNTRAINED, EvaluationReport
from pipelines.evaluation.intervals import Estimate
from pipelines.evaluation.run import EvaluationConfig
from pipelines.files import fingerprint
from pipelines.sample_world import generate_world
from pipelines.sample_world.documents import world_documents, world_images
from pipelines.sample_world.publish import PublishedWorld

PACKING = PackingConfig(max_length=160, num_image_tokens=8, seed=0)


@dg.asset(name="packed_sequences", group_name="packing")
def world_packed_sequences(storage: Storage, tokenizer: TokenizerManifest, sample_world: PublishedWorld) -> PackedSequences:
    """Stand-in for the download -> filter -> pack chain: the world's documents packed the same way."""
    world = generate_world(sample_world.world)
    thresholds = {"world": {"min_similarity": 0.1, "max_images_per_document": 6}}
    meta = {"packing": PACKING.to_dict(), "filter_thresholds": thresholds}
    out = storage.layout.path("packed_sequences", fingerprint(meta))
    stats = PackingStats()
    sequences = pack_documents(world_documents(world), tokenizer.load(), PACKING, images=world_images(world), stats=stats)
    index = write_shards((s.to_sample(f"{i:09d}") for i, s in enumerate(sequences)), out, maxcount=8, prefix="seq", meta=meta)
    return PackedSequences(str(out), index.urls(out), index.samples, index.bytes, PACKING, tokenizer.token_ids,
                           index.meta, stats)


@pytest.fixture(scope="module")
def graph(tmp_path_factory):
    root = tmp_path_factory.mktemp("graph")
    world = SampleWorld(n_pairs=8, n_stories=3, n_eval=2)
    resources = {
        **sample_world_resources(str(root), world),
        "clip_scorer_source": SampleWorldClipScorer(world=world, training={"steps": 2, "batch_size": 8},
                                                    training_pairs=8, training_stories=4),
    }
    assets = [sample_world, tokenizer, clip_scorer, world_packed_sequences, checkpoint, instruction_sequences,
              instruction_sequences_shard_integrity, finetuned_checkpoint, evaluation_report,
              evaluation_report_beats_untrained, evaluation_report_finetuned_beats_baselines]
    run_config = dg.RunConfig(ops={
        "checkpoint": TrainingSettings(max_steps=2, warmup_steps=0, checkpoint_every=2, vae_steps=3, zero_stage=0,
                                       lr=1e-3, decoder_lr=2e-3, shuffle_buffer=64),
        "instruction_sequences": InstructionSettings(samples_per_shard=8),
        "finetuned_checkpoint": FinetuningSettings(max_steps=2, warmup_steps=0, checkpoint_every=2, zero_stage=0,
                                                   lr=1e-3, decoder_lr=1e-3, shuffle_buffer=64),
        "evaluation_report": EvaluationSettings(limit=1, num_inference_steps=2, max_new_tokens=4),
    })
    with dg.instance_for_test() as instance:
        result = dg.materialize(assets, resources=resources, run_config=run_config, instance=instance)
        yield root, result, assets, resources, run_config, instance


def test_checkpoint_has_lineage_and_a_baseline(graph):
    root, result, *_ = graph
    assert result.success
    manifest = result.output_for_node("checkpoint")
    assert manifest.step == 2 and Path(manifest.model_dir, "config.json").is_file()
    assert Path(manifest.untrained_model_dir, "model.safetensors").is_file()
    assert manifest.shards.data_version == Path(manifest.shards.path).name
    assert manifest.filter_thresholds == {"world": {"min_similarity": 0.1, "max_images_per_document": 6}}
    assert manifest.packing == PACKING and manifest.train_config["max_steps"] == 2
    metadata = result.asset_materializations_for_node("checkpoint")[0].metadata
    assert metadata["step"].value == 2 and "data:image/png;base64," in metadata["loss_curve"].value
    assert isinstance(metadata["vae_final_loss"].value, float)


def test_instruction_sequences_pack_the_worlds_instruction_file_with_loss_on_answers(graph):
    root, result, *_ = graph
    manifest = result.output_for_node("instruction_sequences")
    items = json.loads((root / "raw" / "instructions" / "instructions.json").read_text())
    assert manifest.counts.items == len(items) > 0 and manifest.counts.malformed == 0
    assert manifest.packing == PACKING and read_index(manifest.path).samples == manifest.samples > 0
    losses = manifest.counts.losses
    assert 0 < losses.trained_tokens < losses.untrained_tokens  # short answers after longer prompts
    drawn = sum(turn["value"].count("<image>") for i in items for turn in i["conversations"] if turn["from"] == "gpt")
    assert drawn > 0 and losses.trained_images == drawn < losses.untrained_images  # seg, text-to-image, story answers
    metadata = result.asset_materializations_for_node("instruction_sequences")[0].metadata
    assert metadata["items"].value == len(items) and metadata["malformed_items"].value == 0
    assert metadata["trained_tokens"].value == losses.trained_tokens
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert checks["instruction_sequences_shard_integrity"].passed


def test_finetuned_checkpoint_starts_from_the_checkpoint_and_keeps_its_lineage(graph):
    root, result, *_ = graph
    tuned = result.output_for_node("finetuned_checkpoint")
    pretrained = result.output_for_node("checkpoint")
    assert tuned.pretrained.checkpoint == pretrained.checkpoint and tuned.pretrained.version == pretrained.version
    assert tuned.pretrained.untrained_model_dir == pretrained.untrained_model_dir and tuned.step == 2
    assert tuned.shards.data_version == result.output_for_node("instruction_sequences").version
    assert Path(tuned.model_dir, "model.safetensors").is_file() and tuned.model_dir != pretrained.model_dir
    assert tuned.train_config["model"]["decoder"]["vae_config"] == json.loads(
        Path(pretrained.model_dir, "config.json").read_text())["decoder"]["vae_config"]  # the fitted VAE goes along
    metadata = result.asset_materializations_for_node("finetuned_checkpoint")[0].metadata
    assert metadata["step"].value == 2 and "data:image/png;base64," in metadata["loss_curve"].value


def test_report_compares_with_the_untrained_baseline(graph):
    root, result, *_ = graph
    manifest = result.output_for_node("evaluation_report")
    assert set(manifest.scores) == {TRAINED, FINETUNED, UNTRAINED}
    assert "clip_score" in manifest.scores[TRAINED]
    text = Path(manifest.report).read_text()
    checkpoint_manifest = result.output_for_node("checkpoint")
    tuned = result.output_for_node("finetuned_checkpoint")
    for needle in (checkpoint_manifest.shards.data_version, checkpoint_manifest.model_config_hash,
                   checkpoint_manifest.git_commit, "min_similarity", "sample_world_tiny_clip", "| text_to_image |",
                   tuned.shards.data_version, f"| task | metric | n | {TRAINED} | {FINETUNED} | {UNTRAINED} |"):
        assert needle in text, needle
    assert (Path(manifest.path) / "loss.png").is_file()
    metadata = result.asset_materializations_for_node("evaluation_report")[0].metadata
    assert "captioning/cider" in metadata and "untrained captioning/cider" in metadata
    assert "finetuned vqa/accuracy" in metadata and "finetuned vqa/accuracy low" in metadata
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    evaluation = checks["evaluation_report_beats_untrained"]
    trained, untrained = manifest.scores[TRAINED], manifest.scores[UNTRAINED]
    beats = all(trained[task][metric].low > untrained[task][metric].high for task, metric in BASELINE_METRICS)
    assert evaluation.passed == beats  # two training steps decide nothing: the check reports what the scores say
    assert f"trained {trained['captioning']['cider']}" in evaluation.metadata["scores"].value
    assert "captioning/cider low" in metadata and "captioning/cider high" in metadata
    finetuned_check = checks["evaluation_report_finetuned_beats_baselines"]
    vqa = manifest.scores[FINETUNED]["vqa"]["accuracy"]
    assert finetuned_check.passed == (vqa.above(trained["vqa"]["accuracy"]) and vqa.above(untrained["vqa"]["accuracy"]))
    assert f"finetuned {vqa}" in finetuned_check.metadata["scores"].value


def _report(trained: dict, untrained: dict, finetuned: dict | None = None) -> EvaluationReport:
    def estimates(scores):  # "value±half" -> an Estimate with that interval
        return {task: {m: Estimate(v, v - h, v + h, 40) for m, (v, h) in metrics.items()} for task, metrics in scores.items()}

    scores = {TRAINED: estimates(trained), FINETUNED: estimates(finetuned or {}), UNTRAINED: estimates(untrained)}
    return EvaluationReport("r", "r/report.md", scores, "c", 500, "sample_world_tiny_clip", EvaluationConfig())


def _tasks(cider, t2i, story):
    return {"captioning": {"cider": cider}, "text_to_image": {"strict_accuracy": t2i},
            "story_continuation": {"strict_accuracy": story}}


@pytest.mark.parametrize(("trained", "untrained", "passed"), [
    (_tasks((0.9, 0.1), (0.3, 0.05), (0.3, 0.05)), _tasks((0.0, 0.0), (0.1, 0.05), (0.1, 0.05)), True),
    (_tasks((0.9, 0.1), (0.3, 0.05), (0.3, 0.15)), _tasks((0.0, 0.0), (0.1, 0.05), (0.1, 0.1)), False),  # overlap
    (_tasks((0.9, 0.1), (0.1, 0.05), (0.3, 0.05)), _tasks((0.0, 0.0), (0.1, 0.05), (0.1, 0.05)), False),  # a tie
    (_tasks((0.0, 0.0), (0.5, 0.05), (0.5, 0.05)), _tasks((0.1, 0.0), (0.0, 0.0), (0.0, 0.0)), False),  # one loss
    ({"vqa": {"accuracy": (1.0, 0.0)}}, {"vqa": {"accuracy": (0.0, 0.0)}}, False),  # nothing it compares on: no pass
])
def test_beats_untrained_check_passes_only_when_every_compared_score_is_higher_outside_the_intervals(trained, untrained,
                                                                                                 passed):
    result = evaluation_report_beats_untrained(evaluation_report=_report(trained, untrained))
    assert result.passed is passed


def _vqa(value, half):
    return {"vqa": {"accuracy": (value, half)}}


@pytest.mark.parametrize(("finetuned", "trained", "untrained", "passed"), [
    (_vqa(0.6, 0.1), _vqa(0.1, 0.1), _vqa(0.0, 0.0), True),
    (_vqa(0.6, 0.1), _vqa(0.45, 0.1), _vqa(0.0, 0.0), False),  # no better than the pretrained checkpoint
    (_vqa(0.6, 0.1), _vqa(0.1, 0.1), _vqa(0.55, 0.1), False),  # no better than untrained
    ({"captioning": {"cider": (1.0, 0.0)}}, _tasks((0.0, 0.0), (0.0, 0.0), (0.0, 0.0)), _vqa(0.0, 0.0), False),
])
def test_finetuned_check_passes_only_when_vqa_beats_both_baselines_outside_the_intervals(finetuned, trained, untrained,
                                                                                         passed):
    result = evaluation_report_finetuned_beats_baselines(evaluation_report=_report(trained, untrained, finetuned))
    assert result.passed is passed


def test_materializing_the_checkpoint_again_resumes_without_new_steps(graph):
    root, first, assets, resources, run_config, instance = graph
    only_checkpoint = dg.RunConfig(ops={"checkpoint": run_config.ops["checkpoint"]})
    again = dg.materialize(assets, selection=[checkpoint], resources=resources, run_config=only_checkpoint,
                           instance=instance)
    manifest = again.output_for_node("checkpoint")
    assert manifest.checkpoint == first.output_for_node("checkpoint").checkpoint
    records = [json.loads(line) for line in Path(manifest.run_dir, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2]
