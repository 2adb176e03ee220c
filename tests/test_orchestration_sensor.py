"""The raw-shard sensor: a new file in the watched folder yields a run for exactly its partition."""

import shutil

import dagster as dg
import pytest

from assets.resources import SampleWorld, Storage
from orchestration.jobs import raw_shard_sensor
from pipelines.sample_world import write_metadata
from pipelines.sample_world.images import METADATA_BASE_URL


@pytest.fixture
def metadata(tmp_path):
    world = SampleWorld(n_pairs=4, n_stories=2, n_eval=1, docs_per_shard=1)
    return write_metadata(world.generate(), tmp_path / "release", METADATA_BASE_URL, docs_per_shard=1)


def _evaluate(instance, storage):
    context = dg.build_sensor_context(instance=instance, resources={"storage": storage})
    return raw_shard_sensor(context)


def test_new_raw_shard_yields_a_run_for_exactly_that_partition(tmp_path, metadata):
    storage = Storage(root=str(tmp_path / "data"), raw_dir=str(tmp_path / "watched"))
    with dg.instance_for_test() as instance:
        assert isinstance(_evaluate(instance, storage), dg.SkipReason)  # the folder does not even exist yet

        (tmp_path / "watched" / "laion").mkdir(parents=True)
        shutil.copy(metadata["laion"][0], tmp_path / "watched" / "laion" / "part-00000.parquet.tmp")
        assert isinstance(_evaluate(instance, storage), dg.SkipReason)  # a file still being written is ignored

        (tmp_path / "watched" / "laion" / "part-00000.parquet.tmp").rename(
            tmp_path / "watched" / "laion" / "part-00000.parquet")
        result = _evaluate(instance, storage)
        assert [r.partition_key for r in result.run_requests] == ["laion/part-00000.parquet"]
        assert result.run_requests[0].run_config["ops"]["downloaded_images"]["config"]["image_size"] == 64
        (observed,) = result.asset_events  # the external raw_shards asset: what the sensor saw, where and how large
        assert (observed.asset_key, observed.partition) == (dg.AssetKey("raw_shards"), "laion/part-00000.parquet")
        assert observed.metadata["bytes"].value == (tmp_path / "watched" / "laion" / "part-00000.parquet").stat().st_size
        (request,) = result.dynamic_partitions_requests
        assert request.partition_keys == ["laion/part-00000.parquet"]
        instance.add_dynamic_partitions(request.partitions_def_name, list(request.partition_keys))

        assert isinstance(_evaluate(instance, storage), dg.SkipReason)  # nothing new: no second run

        (tmp_path / "watched" / "laion" / "part-00001.csv").write_text("url,caption\n")
        skipped = _evaluate(instance, storage)  # a file no reader takes is named, not silently skipped
        assert isinstance(skipped, dg.SkipReason) and "1 files ignored: laion/part-00001.csv" in skipped.skip_message

        (tmp_path / "watched" / "mmc4").mkdir()
        shutil.copy(metadata["mmc4"][1], tmp_path / "watched" / "mmc4" / metadata["mmc4"][1].name)
        result = _evaluate(instance, storage)
        assert [r.partition_key for r in result.run_requests] == [f"mmc4/{metadata['mmc4'][1].name}"]


def test_sensor_run_targets_the_ingest_job_for_one_partition():
    assert raw_shard_sensor.job_name == "ingest"
    from orchestration.definitions import defs

    job = defs().resolve_job_def("ingest")
    assert job.partitions_def.name == "source_shards"
    assert {k.to_user_string() for k in job.asset_layer.executable_asset_keys} == {"raw_documents", "downloaded_images"}
