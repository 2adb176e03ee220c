"""Dagster beyond one process: the cluster instance (``orchestration/presets/dagster_cluster.yaml``) on a real
Postgres, with Dagster's default run launcher in place of the k8s one (whose config is checked against dagster-k8s's
schema); runs made by Dagster's own CLI and daemon in their own processes, steps in the multiprocess executor.

One module-scoped platform: a Postgres server, the small world's loopback image server, a ``DAGSTER_HOME`` whose
``dagster.yaml`` is the cluster file, and the data job run on it once: the world written, its three raw shards
ingested by three runs at once, then the data graph over them."""

import contextlib
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import yaml

from assets.resources import SampleWorldImages
from orchestration.jobs import PRESETS_DIR, partition_range_tags, preset_run_config
from pipelines.sample_world import write_metadata
from pipelines.sample_world.image_server import ImageServer
from pipelines.sample_world.images import METADATA_BASE_URL
from postgres_server import Postgres, running_postgres
from sessions import stop_session
from small_platform import FAULTS, WORLD

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LOCATION = ["-f", str(ROOT / "tests" / "small_location.py")]
CLUSTER = PRESETS_DIR / "dagster_cluster.yaml"
DATA_OPS = ("downloaded_images", "filtered_documents", "recaptions", "deduplicated_documents",
            "decontaminated_documents", "packed_sequences")
SERVER_FAULTS = SampleWorldImages(world=WORLD, faults=FAULTS).get().faults
# The shards' runs run at once, each in one process; the data job's steps in parallel processes (a process each).
IN_PROCESS, MULTIPROCESS = {"in_process": {}}, {"multiprocess": {"max_concurrent": 3}}
SHARDS = ["mmc4/docs_shard_0_v2.jsonl.zip", "laion/part-00000.parquet", "cc12m/cc12m-00000.tsv"]


def local_instance_config() -> dict:
    """The cluster's instance config with Dagster's default run launcher (a process per run) in place of k8s."""
    config = yaml.safe_load(CLUSTER.read_text())
    del config["run_launcher"]
    return config


def test_cluster_k8s_run_launcher_config_matches_dagster_k8s_schema():
    launcher = yaml.safe_load(CLUSTER.read_text())["run_launcher"]
    launcher_class = getattr(importlib.import_module(launcher["module"]), launcher["class"])

    @dg.op(name="run_launcher", config_schema=launcher_class.config_type())
    def run_launcher_config():
        """Holds the launcher's config schema, so Dagster's own config validation checks the file's values."""

    @dg.job
    def cluster_config():
        run_launcher_config()

    def validate(config: dict) -> None:
        dg.validate_run_config(cluster_config, {"ops": {"run_launcher": {"config": config}}})

    validate(launcher["config"])
    with pytest.raises(dg.DagsterInvalidConfigError, match="job_namespaces"):  # a typo is named, not ignored
        validate({**launcher["config"], "job_namespaces": "weft"})
    assert local_instance_config()["telemetry"] == {"enabled": False}


def test_local_instance_preset_loads_with_telemetry_off(tmp_path):
    shutil.copy(PRESETS_DIR / "dagster.yaml", tmp_path / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(tmp_path))
    assert instance.telemetry_enabled is False
    assert type(instance.run_storage).__name__ == "SqliteRunStorage"


@dataclass
class Platform:
    postgres: Postgres
    server: ImageServer
    root: Path
    env: dict

    def dagster(self, *args: str) -> None:
        _finish(_start(args, self.env))

    def runs(self, job: str) -> list[dict]:
        """The job's runs as Postgres holds them: id, status, tags, start and end times."""
        rows = self.postgres.query("SELECT run_id, status, run_body, start_time, end_time FROM runs "
                                   "WHERE pipeline_name = %s ORDER BY create_timestamp", (job,))
        return [{"id": r[0], "status": r[1], "tags": json.loads(r[2])["tags"], "start": r[3], "end": r[4]} for r in rows]

    def ticks(self, name: str) -> list[str]:
        """Statuses of the finished ticks of schedule or sensor ``name``, oldest first."""
        rows = self.postgres.query("SELECT status, tick_body FROM job_ticks WHERE status != 'STARTED' "
                                   "ORDER BY timestamp")
        return [status for status, body in rows if json.loads(body)["job_name"] == name]

    def failures(self, run_id: str) -> str:
        """The run's step and run failure events, for an assertion's message."""
        rows = self.postgres.query("SELECT event FROM event_logs WHERE run_id = %s AND dagster_event_type IN "
                                   "('STEP_FAILURE', 'RUN_FAILURE')", (run_id,))
        return "\n".join(row[0][-2000:] for row in rows)

    def materialized(self, run_id: str, asset: str) -> set[str | None]:
        """Partitions of ``asset`` that run ``run_id`` materialized, from its events in Postgres."""
        rows = self.postgres.query("SELECT partition FROM event_logs WHERE run_id = %s AND asset_key = %s AND "
                                   "dagster_event_type = 'ASSET_MATERIALIZATION'", (run_id, json.dumps([asset])))
        return {r[0] for r in rows}

    def observed(self, asset: str) -> set[str | None]:
        """Partitions of ``asset`` with an observation in Postgres (a sensor's are reported outside any run)."""
        rows = self.postgres.query("SELECT partition FROM event_logs WHERE asset_key = %s AND "
                                   "dagster_event_type = 'ASSET_OBSERVATION'", (json.dumps([asset]),))
        return {r[0] for r in rows}


def _start(args: tuple[str, ...] | list[str], env: dict) -> subprocess.Popen:
    """``dagster <args>`` in a session of its own."""
    return subprocess.Popen([str(BIN / "dagster"), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(process: subprocess.Popen, timeout: float = 900) -> None:
    """Wait for a command of :func:`_start`, then stop what it left in its session (a code server it spawned can
    outlive it): only processes this test started."""
    try:
        output = process.communicate(timeout=timeout)[0]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, f"{' '.join(process.args[1:])}: {output[-4000:]}"


def _tags(tags: dict) -> str:
    return json.dumps(tags)


def _run_config(folder: Path, ops: tuple[str, ...], executor: dict) -> str:
    """A run-config file: the sample-world preset's config of ``ops`` with ``executor``."""
    path = folder / f"run_config_{'_'.join(ops)}.yaml"
    config = {**preset_run_config("sample_world", ops), "execution": {"config": executor}}
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    home, root = tmp_path_factory.mktemp("dagster_home"), tmp_path_factory.mktemp("weft_data")
    (home / "dagster.yaml").write_text(yaml.safe_dump(local_instance_config()))
    with running_postgres() as postgres, ImageServer(WORLD.generate().routes(), SERVER_FAULTS) as server:
        env = {**os.environ, **postgres.env(), "DAGSTER_HOME": str(home), "WEFT_DATA_ROOT": str(root),
               "WEFT_IMAGE_SERVER_URL": server.base_url, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}",
               "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
        p = Platform(postgres, server, root, env)
        p.dagster("asset", "materialize", *LOCATION, "--select", "sample_world")
        ingest_config = _run_config(home, ("downloaded_images",), IN_PROCESS)
        ingest = [_start(["job", "execute", *LOCATION, "-j", "ingest", "-c", ingest_config,
                          "--tags", _tags({"dagster/partition": k})], env) for k in SHARDS]
        for process in ingest:
            _finish(process)
        p.dagster("job", "execute", *LOCATION, "-j", "sample_world_data", "-c",
                  _run_config(home, DATA_OPS, MULTIPROCESS),
                  "--tags", _tags(partition_range_tags(SHARDS)))
        yield p


@pytest.mark.slow
def test_data_job_on_postgres_runs_partitions_in_parallel_and_steps_in_processes(platform):
    ingest = platform.runs("ingest")
    assert [r["status"] for r in ingest] == ["SUCCESS"] * 3
    assert sorted(r["tags"]["dagster/partition"] for r in ingest) == sorted(SHARDS)
    assert max(r["start"] for r in ingest) < min(r["end"] for r in ingest)  # the three shards' runs overlapped
    for run in ingest:
        assert platform.materialized(run["id"], "downloaded_images") == {run["tags"]["dagster/partition"]}

    (data,) = platform.runs("sample_world_data")
    assert data["status"] == "SUCCESS"
    assert platform.materialized(data["id"], "filtered_documents") == set(SHARDS)
    assert platform.materialized(data["id"], "packed_sequences") == {None}
    steps = {}
    for step, kind, timestamp in platform.postgres.query(
            "SELECT step_key, dagster_event_type, timestamp FROM event_logs WHERE run_id = %s AND "
            "dagster_event_type IN ('STEP_START', 'STEP_SUCCESS')", (data["id"],)):
        steps.setdefault(step, {})[kind] = timestamp
    spans = sorted((s["STEP_START"], s["STEP_SUCCESS"], k) for k, s in steps.items())
    overlapping = [(a[2], b[2]) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]
    assert overlapping, spans  # independent steps ran at once, in separate processes
    engine = platform.postgres.query("SELECT event FROM event_logs WHERE run_id = %s AND dagster_event_type = "
                                     "'ENGINE_EVENT'", (data["id"],))
    assert any("multiprocess executor" in row[0] for row in engine)
    assert platform.server.request_count > 0


@contextlib.contextmanager
def running_daemon(env: dict, log: Path):
    """``dagster-daemon run`` on the location, in a session of its own: the daemon, its code server and the runs it
    launches are stopped together at the end (only the processes this test started)."""
    with open(log, "w") as out:
        process = subprocess.Popen([str(BIN / "dagster-daemon"), "run", *LOCATION], cwd=ROOT, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process
    finally:
        stop_session(process)


def _wait_for(found, what: str, daemon: subprocess.Popen, log: Path, timeout: float = 420):
    deadline = time.monotonic() + timeout
    while not (result := found()):
        assert daemon.poll() is None, f"the daemon exited with {daemon.returncode}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s; {log}: {log.read_text()[-3000:]}"
        time.sleep(2)
    return result


def _ended(runs: list[dict], **tags) -> list[dict]:
    return [r for r in runs if r["status"] in ("SUCCESS", "FAILURE") and tags.items() <= r["tags"].items()]


@pytest.mark.slow
def test_daemon_ingests_a_dropped_shard_by_the_sensor_and_refilters_on_a_schedule_tick(platform, tmp_path):
    release = write_metadata(WORLD.generate(), tmp_path / "release", METADATA_BASE_URL, docs_per_shard=4)
    new = "mmc4/docs_shard_1_v2.jsonl.zip"  # the world's stories cut finer: a shard the platform has not seen
    (source,) = [path for path in release["mmc4"] if path.name == "docs_shard_1_v2.jsonl.zip"]
    log = tmp_path / "daemon.log"
    with running_daemon(platform.env, log) as daemon:
        platform.dagster("sensor", "start", "raw_shard_sensor", *LOCATION)
        assert _wait_for(lambda: platform.ticks("raw_shard_sensor"), "sensor tick", daemon, log) == ["SKIPPED"]

        partial = platform.root / "raw" / f"{new}.tmp"  # written, then renamed into place: as a release lands
        shutil.copy(source, partial)
        partial.rename(platform.root / "raw" / new)
        (ingest,) = _wait_for(lambda: _ended(platform.runs("ingest"), **{"dagster/partition": new}),
                              "ingest run of the dropped shard", daemon, log)
        assert ingest["status"] == "SUCCESS", platform.failures(ingest["id"])
        assert ingest["tags"]["dagster/sensor_name"] == "raw_shard_sensor"
        assert platform.materialized(ingest["id"], "downloaded_images") == {new}
        assert platform.observed("raw_shards") == {new}  # the sensor's observation of the file it saw

        # Re-filtering reads every shard's scores: the schedule skips until the new shard has them.
        platform.dagster("schedule", "start", "refilter_every_minute", *LOCATION)
        platform.dagster("asset", "materialize", *LOCATION, "--select", "recaptions,clip_scores", "--partition", new,
                         "-c", _run_config(tmp_path, ("recaptions",), IN_PROCESS))
        requests = platform.server.request_count
        (refilter,) = _wait_for(lambda: _ended(platform.runs("refilter")), "refilter run", daemon, log)
        assert refilter["status"] == "SUCCESS", platform.failures(refilter["id"])
        assert refilter["tags"]["dagster/schedule_name"] == "refilter_every_minute"
        assert "SUCCESS" in platform.ticks("refilter_every_minute")
    assert platform.materialized(refilter["id"], "filtered_documents") == {*SHARDS, new}
    assert platform.materialized(refilter["id"], "packed_sequences") == {None}
    assert platform.server.request_count == requests  # re-filtering fetched no image
