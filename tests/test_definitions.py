"""The Dagster code location loads as the workspace describes it, in both presets."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from assets.io_manager import ManifestIOManager, with_failures
from assets.resources import Storage
from orchestration.definitions import defs
from orchestration.jobs import PRESETS_DIR, preset_run_config
from pipelines.data.errors import ShardFailure
from pipelines.data.layout import DataLayout
from pipelines.data.raw_documents import RawShard

ROOT = Path(__file__).parents[1]


def test_workspace_points_at_the_definitions():
    with open(ROOT / "workspace.yaml") as f:
        workspace = yaml.safe_load(f)
    modules = [entry["python_module"]["module_name"] for entry in workspace["load_from"]]
    assert modules == ["orchestration.definitions"]


def test_definitions_load():
    loaded = defs()
    assert isinstance(loaded, dg.Definitions)
    dg.Definitions.validate_loadable(loaded)
    graph = loaded.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"sample_world", "raw_shards", "raw_documents", "downloaded_images", "clip_scorer", "clip_scores",
                    "filtered_documents", "captioner", "recaptions", "deduplicated_documents",
                    "decontaminated_documents", "tokenizer", "packed_sequences", "checkpoint", "instruction_sequences",
                    "finetuned_checkpoint", "evaluation_report", "ablation_sequences", "ablation_checkpoints",
                    "ablation_instruction_sequences", "ablation_finetuned_checkpoints", "mmfs_ablation_report"}
    # the lineage: the sample world writes the raw shards that raw_documents reads; Dagster never makes them
    assert graph.get(dg.AssetKey("raw_shards")).parent_keys == {dg.AssetKey("sample_world")}
    assert dg.AssetKey("raw_shards") in graph.get(dg.AssetKey("raw_documents")).parent_keys
    assert not graph.get(dg.AssetKey("raw_shards")).is_materializable
    assert {c.name for c in graph.asset_check_keys} >= {"downloaded_images_shard_integrity",
                                                        "packed_sequences_shard_integrity",
                                                        "instruction_sequences_shard_integrity",
                                                        "evaluation_report_beats_untrained",
                                                        "evaluation_report_finetuned_beats_baselines"}

    def job_assets(name: str) -> set[str]:
        return {k.to_user_string() for k in loaded.resolve_job_def(name).asset_layer.executable_asset_keys}

    data = {"raw_documents", "downloaded_images", "clip_scorer", "clip_scores", "filtered_documents", "captioner",
            "recaptions", "deduplicated_documents", "decontaminated_documents", "tokenizer", "packed_sequences"}
    assert job_assets("sample_world_data") == data
    assert job_assets("sample_world_main") == data | {"checkpoint", "instruction_sequences", "finetuned_checkpoint",
                                                      "evaluation_report"}
    assert job_assets("mmfs_ablation") == {"ablation_sequences", "ablation_checkpoints", "ablation_instruction_sequences",
                                           "ablation_finetuned_checkpoints", "mmfs_ablation_report"}
    assert loaded.resolve_job_def("mmfs_ablation").partitions_def.get_partition_keys() == [
        "mmfs", "no_mmfs", "many_tokens_no_mmfs"]
    assert job_assets("ingest") == {"raw_documents", "downloaded_images"}
    assert job_assets("refilter") == {"filtered_documents", "deduplicated_documents", "decontaminated_documents",
                                      "packed_sequences"}  # recaptions come before filtering


def test_real_data_preset_loads_with_its_environment(tmp_path):
    env = {**os.environ, "WEFT_PRESET": "real_data", "WEFT_DATA_ROOT": str(tmp_path), "WEFT_RAW_DIR": str(tmp_path),
           "WEFT_TOKENIZER_DIR": str(tmp_path), "WEFT_CLIP_CHECKPOINT": str(tmp_path / "clip.pt"),
           "WEFT_BLIP2_DIR": str(tmp_path / "blip2")}
    code = ("import dagster as dg; from orchestration.definitions import defs; d = defs(); dg.Definitions.validate_loadable(d);"
            "print(sorted(k.to_user_string() for k in d.resolve_asset_graph().get_all_asset_keys()))")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "sample_world" not in out and "evaluation_report" not in out and "raw_shards" in out
    assert "packed_sequences" in out and "recaptions" in out and "checkpoint" in out
    assert "instruction_sequences" in out and "finetuned_checkpoint" in out  # real users fine-tune on LLaVA-style files
    env["WEFT_PRESET"] = "nonsense"
    failed = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "WEFT_PRESET must be" in failed.stderr


def test_quality_preset_loads_its_larger_world_and_job_and_its_run_config_validates(tmp_path):
    """``WEFT_PRESET=sample_world_quality`` (make quality): the same graph on a larger world with 200 held-out items a
    task, its own job in place of the main one, and a run config that trains the ``tiny`` model."""
    env = {**os.environ, "WEFT_PRESET": "sample_world_quality", "WEFT_DATA_ROOT": str(tmp_path)}
    code = ("import dagster as dg, json, yaml; from orchestration.definitions import defs; d = defs(); "
            "dg.Definitions.validate_loadable(d); job = d.resolve_job_def('sample_world_quality'); "
            "config = yaml.safe_load(open('orchestration/presets/sample_world_quality.yaml')); "
            "assert dg.validate_run_config(job, config); "
            "world = d.resources['world']; "
            "print(json.dumps({'jobs': sorted(j.name for j in d.resolve_all_job_defs() if not j.name.startswith('__')), "
            "'pairs': world.n_pairs, 'stories': world.n_stories, 'eval': world.n_eval, "
            "'preset': config['ops']['checkpoint']['config']['preset']}))")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, check=True).stdout
    loaded = yaml.safe_load(out.strip().splitlines()[-1])
    assert "sample_world_quality" in loaded["jobs"] and "sample_world_main" not in loaded["jobs"]
    assert loaded["pairs"] >= 1000 and loaded["stories"] >= 200 and loaded["eval"] >= 200
    assert loaded["preset"] == "tiny"


@pytest.mark.parametrize("preset", ["sample_world", "real_data"])
def test_run_config_presets_validate_against_the_jobs(preset):
    ops = ("downloaded_images", "filtered_documents", "recaptions", "deduplicated_documents", "decontaminated_documents",
           "packed_sequences", "checkpoint", "instruction_sequences", "finetuned_checkpoint")
    if preset == "sample_world":
        ops += ("evaluation_report",)
    config = preset_run_config(preset, ops)
    assert set(config["ops"]) == set(ops)
    # real data: CC-12M pairs filtered and trained on their BLIP-2 recaption; the sample world's tiny captioner is
    # too often wrong for that (sample_world.yaml)
    assert config["ops"]["recaptions"]["config"]["sources"] == (["cc12m"] if preset == "real_data" else [])
    loaded = defs()
    assert dg.validate_run_config(loaded.resolve_job_def("sample_world_main"), config)
    assert (PRESETS_DIR / f"{preset}.yaml").is_file()


def test_ablation_preset_validates_against_its_job(capsys):
    """make ablation's run config: the demo's stages under the ablation's ops with ablation.yaml's overrides on top."""
    from orchestration.ablation_config import main

    assert main([str(PRESETS_DIR / "sample_world.yaml"), str(PRESETS_DIR / "ablation.yaml")]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert set(config["ops"]) == {"ablation_sequences", "ablation_checkpoints", "ablation_instruction_sequences",
                                  "ablation_finetuned_checkpoints", "mmfs_ablation_report"}
    assert dg.validate_run_config(defs().resolve_job_def("mmfs_ablation"), config)
    with open(PRESETS_DIR / "sample_world.yaml") as f:
        demo = yaml.safe_load(f)["ops"]
    packing = config["ops"]["ablation_sequences"]["config"]
    assert (packing["max_length"], packing["num_image_tokens"], packing["many_image_tokens"]) == (640, 32, 256)
    assert packing["samples_per_shard"] == demo["packed_sequences"]["config"]["samples_per_shard"]
    assert config["ops"]["ablation_finetuned_checkpoints"]["config"] == demo["finetuned_checkpoint"]["config"]


def test_quality_ablation_config_is_the_quality_recipe_per_variant(monkeypatch):
    """make quality-ablation's run config: the quality preset's stages under the ablation's ops, valid for the
    quality definitions' job; every variant pretrains and fine-tunes as the recipe does."""
    from orchestration.ablation_config import STAGES, ablation_run_config

    with open(PRESETS_DIR / "sample_world_quality.yaml") as f:
        preset = yaml.safe_load(f)
    preset["ops"]["checkpoint"]["config"]["mmfs"] = False  # the variant decides, not the preset
    config = ablation_run_config(preset, many_image_tokens=64)
    assert set(config["ops"]) == set(STAGES.values())
    tuned = config["ops"]["ablation_finetuned_checkpoints"]["config"]
    assert tuned == preset["ops"]["finetuned_checkpoint"]["config"]
    trained = config["ops"]["ablation_checkpoints"]["config"]
    assert "mmfs" not in trained and trained["train_vit"] is True
    assert config["ops"]["ablation_sequences"]["config"]["many_image_tokens"] == 64
    assert config["ops"]["ablation_sequences"]["config"]["num_image_tokens"] == 16
    monkeypatch.setenv("WEFT_PRESET", "sample_world_quality")
    assert dg.validate_run_config(defs().resolve_job_def("mmfs_ablation"), config)


def test_a_pair_caption_setting_no_longer_exists_to_disagree_with_another():
    """One setting (recaptions' sources) decides a pair's text for filtering and packing alike: the run config that
    used to set filtering and packing apart is refused before a run starts."""
    config = preset_run_config("sample_world", ("filtered_documents", "packed_sequences"))
    config["ops"]["filtered_documents"]["config"]["pair_caption"] = "original"
    with pytest.raises(dg.DagsterInvalidConfigError, match="pair_caption"):
        dg.validate_run_config(defs().resolve_job_def("refilter"), config)


def test_storage_refuses_urls_the_stages_cannot_write(tmp_path):
    assert Storage(root=f"file://{tmp_path}").layout == DataLayout(tmp_path, tmp_path / "raw")
    with pytest.raises(ValueError, match="mount object storage"):
        Storage(root="s3://bucket/weft").layout
    with pytest.raises(ValueError, match="<source>/<file>"):
        Storage(root=str(tmp_path)).layout.raw_file("../etc/passwd")


def test_manifest_io_manager_round_trips_typed_manifests_and_refuses_a_partitioned_output_without_its_keys(tmp_path):
    manager = ManifestIOManager(storage=Storage(root=str(tmp_path)))
    partitions = dg.StaticPartitionsDefinition(["a", "b"])
    manifests = dg.DagsterType(type_check_fn=lambda _, value: isinstance(value, dict), name="RawShards",
                               typing_type=dict[str, RawShard])
    context = dg.build_output_context(asset_key=dg.AssetKey("x"), partition_key="a", asset_partitions_def=partitions,
                                      dagster_type=manifests)
    shard = RawShard(path="a.parquet", source_file="a.tsv", source_sha256="0" * 64, documents=3, bad_records=1,
                     images=3, kinds={"pair": 3})
    with pytest.raises(TypeError, match="partition_key"):
        manager.handle_output(context, {"b": shard})
    manager.handle_output(context, {"a": shard})
    loaded = manager.load_input(dg.build_input_context(asset_key=dg.AssetKey("x"), partition_key="a",
                                                       asset_partitions_def=partitions, dagster_type=manifests))
    assert loaded == {"a": shard} and isinstance(loaded["a"], RawShard)
    with pytest.raises(TypeError, match="left out partition 'a', which no stage quarantined"):
        manager.handle_output(context, {})
    (tmp_path / "_manifests" / "x" / "a.json").write_text('{"path": "a.parquet"}')
    with pytest.raises(ValueError, match="a.json does not hold"):
        manager.load_input(dg.build_input_context(asset_key=dg.AssetKey("x"), partition_key="a",
                                                  asset_partitions_def=partitions, dagster_type=manifests))


def test_manifest_io_manager_quarantines_a_failed_partition_in_every_later_asset(tmp_path):
    """A ShardFailure is the partition's record: a consumer that admits failures gets it, the others get the dict
    without it, and an asset that leaves the partition out passes the failure on."""
    manager = ManifestIOManager(storage=Storage(root=str(tmp_path)))
    partitions = dg.StaticPartitionsDefinition(["a", "b"])
    shard = RawShard(path="b.parquet", source_file="b.tsv", source_sha256="0" * 64, documents=3, bad_records=0,
                     images=3, kinds={"pair": 3})
    failure = ShardFailure("a.zip", "not a zip archive", "raw_documents")
    raw = with_failures(RawShard)
    both = dg.PartitionKeyRange("a", "b")  # a run over both partitions

    def output(asset, kind):
        return dg.build_output_context(asset_key=dg.AssetKey(asset), asset_partitions_def=partitions, dagster_type=kind,
                                       asset_partition_key_range=both)

    def load(asset, kind):
        return manager.load_input(dg.build_input_context(asset_key=dg.AssetKey(asset), asset_partitions_def=partitions,
                                                         dagster_type=kind, asset_partition_key_range=both))

    manager.handle_output(output("raw", raw), {"a": failure, "b": shard})
    plain = dg.DagsterType(type_check_fn=lambda _, v: True, name="Raw", typing_type=dict[str, RawShard])
    assert load("raw", raw) == {"a": failure, "b": shard} and load("raw", plain) == {"b": shard}
    manager.handle_output(output("later", plain), {"b": shard})  # it got no "a": the raw failure is passed on
    assert load("later", raw) == {"a": failure, "b": shard}
