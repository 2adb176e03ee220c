"""The Dagster code location loads as the workspace describes it, in both presets."""

import os
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
import yaml

from orchestration.definitions import defs
from orchestration.io_managers import ManifestIOManager
from orchestration.jobs import PRESETS_DIR, preset_run_config
from orchestration.resources import Storage

ROOT = Path(__file__).parents[1]


def test_workspace_points_at_the_definitions():
    with open(ROOT / "workspace.yaml") as f:
        workspace = yaml.safe_load(f)
    modules = [entry["python_module"]["module_name"] for entry in workspace["load_from"]]
    assert modules == ["orchestration.definitions"]


def test_definitions_load():
    assert isinstance(defs, dg.Definitions)
    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"sample_world", "raw_documents", "downloaded_images", "clip_scorer", "clip_scores",
                    "filtered_documents", "captioner", "recaptions", "tokenizer", "packed_sequences", "checkpoint",
                    "evaluation_report", "mmfs_ablation_report"}
    assert {c.name for c in graph.asset_check_keys} >= {"downloaded_images_shard_integrity",
                                                        "packed_sequences_shard_integrity",
                                                        "evaluation_report_beats_untrained"}

    def job_assets(name: str) -> set[str]:
        return {k.to_user_string() for k in defs.resolve_job_def(name).asset_layer.executable_asset_keys}

    data = {"raw_documents", "downloaded_images", "clip_scorer", "clip_scores", "filtered_documents", "captioner",
            "recaptions", "tokenizer", "packed_sequences"}
    assert job_assets("sample_world_data") == data
    assert job_assets("sample_world_main") == data | {"checkpoint", "evaluation_report"}
    assert job_assets("mmfs_ablation") == {"mmfs_ablation_report"}
    assert job_assets("ingest") == {"raw_documents", "downloaded_images"}
    assert job_assets("refilter") == {"filtered_documents", "packed_sequences"}  # recaptions come before filtering


def test_real_data_preset_loads_with_its_environment(tmp_path):
    env = {**os.environ, "WEFT_PRESET": "real_data", "WEFT_DATA_ROOT": str(tmp_path), "WEFT_RAW_DIR": str(tmp_path),
           "WEFT_TOKENIZER_DIR": str(tmp_path), "WEFT_CLIP_CHECKPOINT": str(tmp_path / "clip.pt"),
           "WEFT_BLIP2_DIR": str(tmp_path / "blip2")}
    code = ("import dagster as dg; from orchestration.definitions import defs; dg.Definitions.validate_loadable(defs);"
            "print(sorted(k.to_user_string() for k in defs.resolve_asset_graph().get_all_asset_keys()))")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True).stdout
    assert "sample_world" not in out and "evaluation_report" not in out
    assert "packed_sequences" in out and "recaptions" in out and "checkpoint" in out
    env["WEFT_PRESET"] = "nonsense"
    failed = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "WEFT_PRESET must be" in failed.stderr


@pytest.mark.parametrize("preset", ["sample_world", "real_data"])
def test_run_config_presets_validate_against_the_jobs(preset):
    ops = ("downloaded_images", "filtered_documents", "recaptions", "packed_sequences", "checkpoint")
    if preset == "sample_world":
        ops += ("evaluation_report",)
    config = preset_run_config(preset, ops)
    assert set(config["ops"]) == set(ops)
    assert config["ops"]["packed_sequences"]["config"]["pair_caption"] == "blip2"
    assert config["ops"]["filtered_documents"]["config"]["pair_caption"] == "blip2"  # judged by what it is trained on
    job = defs.resolve_job_def("sample_world_main")
    assert job.run_config_schema.config_type is not None
    from dagster._config import process_config

    assert process_config(job.run_config_schema.config_type, config).success
    assert (PRESETS_DIR / f"{preset}.yaml").is_file()


def test_storage_refuses_urls_the_stages_cannot_write(tmp_path):
    assert Storage(root=f"file://{tmp_path}").root_path == tmp_path
    with pytest.raises(ValueError, match="mount object storage"):
        Storage(root="s3://bucket/weft").root_path
    with pytest.raises(ValueError, match="<source>/<file>"):
        Storage(root=str(tmp_path)).raw_file("../etc/passwd")


def test_manifest_io_manager_refuses_a_partitioned_output_without_its_keys(tmp_path):
    manager = ManifestIOManager(storage=Storage(root=str(tmp_path)))
    partitions = dg.StaticPartitionsDefinition(["a", "b"])
    context = dg.build_output_context(asset_key=dg.AssetKey("x"), partition_key="a",
                                      asset_partitions_def=partitions)
    with pytest.raises(TypeError, match="partition_key"):
        manager.handle_output(context, {"b": {}})
    manager.handle_output(context, {"a": {"n": 1}})
    loaded = manager.load_input(dg.build_input_context(asset_key=dg.AssetKey("x"), partition_key="a",
                                                       asset_partitions_def=partitions))
    assert loaded == {"a": {"n": 1}}
