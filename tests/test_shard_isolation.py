"""One bad raw shard fails only its own partition: a raw folder with a truncated parquet and a ``.jsonl.zip`` that is
not a zip among good shards materializes the good partitions through reading and downloading, names both failed
files with their cause, quarantines their partitions in the later stage and leaves no temporary file."""

import json

import dagster as dg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from assets.resources import SampleWorld, SampleWorldImages
from orchestration.definitions import build_definitions, sample_world_resources
from orchestration.jobs import partition_range_tags, preset_run_config
from pipelines.sample_world import write_metadata
from pipelines.sample_world.image_server import ImageServer
from pipelines.sample_world.images import METADATA_BASE_URL

pytestmark = pytest.mark.filterwarnings("ignore::dagster.BetaWarning")

NO_FAULTS = {"not_found": 0.0, "server_error": 0.0, "truncated": 0.0, "not_image": 0.0, "transient": 0.0}
BAD = {"laion/part-00001.parquet": "part-00001.parquet: not a readable parquet file",
       "mmc4/docs_shard_1_v2.jsonl.zip": "docs_shard_1_v2.jsonl.zip: not a zip archive"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("isolation")
    world = SampleWorld(n_pairs=4, n_stories=2, n_eval=1, docs_per_shard=2)
    written = write_metadata(world.generate(), root / "raw", METADATA_BASE_URL, docs_per_shard=2)
    good = [f"{source}/{written[source][0].name}" for source in ("mmc4", "laion")]
    table = pa.table({"URL": [f"{METADATA_BASE_URL}/images/p{i:06d}.jpg" for i in range(40)], "TEXT": ["x"] * 40})
    pq.write_table(table, root / "raw" / "laion" / "part-00001.parquet")
    truncated = (root / "raw" / "laion" / "part-00001.parquet").read_bytes()
    (root / "raw" / "laion" / "part-00001.parquet").write_bytes(truncated[: len(truncated) // 2])
    (root / "raw" / "mmc4" / "docs_shard_1_v2.jsonl.zip").write_text('{"text_list": [], "image_info": []}\n')
    keys = [*good, *BAD]
    with ImageServer(world.generate().routes(), SampleWorldImages(world=world, faults=NO_FAULTS).get().faults) as server, \
            dg.instance_for_test(temp_dir=str(tmp_path_factory.mktemp("dagster_home"))) as instance:
        resources = {**sample_world_resources(str(root), world),
                     "images": SampleWorldImages(world=world, server_url=server.base_url, faults=NO_FAULTS)}
        defs = build_definitions("sample_world", resources)
        instance.add_dynamic_partitions("source_shards", keys)
        ordered = instance.get_dynamic_partitions("source_shards")
        result = defs.resolve_job_def("ingest").execute_in_process(
            instance=instance, tags=partition_range_tags(ordered), raise_on_error=False,
            run_config=preset_run_config("sample_world", ("downloaded_images",)))
        only_bad = defs.resolve_job_def("ingest").execute_in_process(
            instance=instance, partition_key="mmc4/docs_shard_1_v2.jsonl.zip", raise_on_error=False,
            run_config=preset_run_config("sample_world", ("downloaded_images",)))
        yield {"root": root, "good": good, "result": result, "only_bad": only_bad, "instance": instance}


def manifest(root, asset, key):
    return json.loads((root / "_manifests" / asset / f"{key}.json").read_text())


def test_good_partitions_materialize_through_download(run):
    assert run["result"].success
    for key in run["good"]:
        raw, downloaded = manifest(run["root"], "raw_documents", key), manifest(run["root"], "downloaded_images", key)
        assert raw["documents"] > 0 and downloaded["counts"]["ok"] > 0, key


def test_each_failure_names_its_file_and_cause_and_quarantines_its_partition(run):
    result = run["result"]
    failed = {e.partition: e.materialization.metadata["failed"].value
              for e in result.get_asset_materialization_events()
              if e.asset_key == dg.AssetKey("raw_documents") and "failed" in e.materialization.metadata}
    assert set(failed) == set(BAD) and all(failed[k].startswith(v) for k, v in BAD.items()), failed
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == "raw_documents_shards_readable"]
    assert not check.passed and all(v in check.metadata["failed_shards"].value for v in BAD.values())
    for key, reason in BAD.items():  # the next stage left the partition out and carries why
        for asset in ("raw_documents", "downloaded_images"):
            record = manifest(run["root"], asset, key)["failed"]
            assert f"{record['file']}: {record['cause']}".startswith(reason) and record["stage"] == "raw_documents"
    for stage in ("raw_documents", "images"):  # no output of a failed shard
        assert not list((run["root"] / stage).rglob("part-00001*")) + list((run["root"] / stage).rglob("docs_shard_1*"))


def test_nothing_partial_is_left(run):
    leftovers = [p for p in run["root"].rglob("*") if ".tmp" in p.name or p.name.startswith(".")]
    assert leftovers == []


def test_a_run_of_only_bad_shards_fails_naming_the_file(run):
    only_bad = run["only_bad"]
    assert not only_bad.success
    (failure,) = [e for e in only_bad.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert ("mmc4/docs_shard_1_v2.jsonl.zip: docs_shard_1_v2.jsonl.zip: not a zip archive"
            in failure.step_failure_data.user_failure_data.description)
