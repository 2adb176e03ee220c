"""A run killed with kill -9 is marked failed when the next run starts (instead of STARTED for ever)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from assets.io_manager import ManifestIOManager
from assets.resources import Storage
from assets.runs import RUN_WORKER_TAG

ROOT = Path(__file__).resolve().parents[1]

DEFINITIONS = '''
import time
from pathlib import Path
import dagster as dg
from assets.io_manager import ManifestIOManager
from assets.resources import Storage

@dg.asset
def slow() -> int:
    Path({started!r}).touch()
    time.sleep(120)
    return 1

defs = dg.Definitions(assets=[slow], resources={{"io_manager": ManifestIOManager(storage=Storage(root={root!r}))}})
'''


@dg.asset
def quick() -> int:
    return 2


def test_killed_run_is_marked_failed_when_the_next_run_starts(tmp_path, monkeypatch):
    home, started = tmp_path / "dagster_home", tmp_path / "started"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    definitions = tmp_path / "slow_defs.py"
    definitions.write_text(DEFINITIONS.format(started=str(started), root=str(tmp_path / "data")))
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen([str(Path(sys.executable).parent / "dagster"), "asset", "materialize", "-f",
                                str(definitions), "--select", "slow"], cwd=ROOT, env=env, start_new_session=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not started.exists():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)  # the run worker and its step process, as kill -9 of make demo would
    process.wait()

    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        (killed,) = instance.get_runs()
        assert killed.status == dg.DagsterRunStatus.STARTED and RUN_WORKER_TAG in killed.tags
        result = dg.materialize([quick], instance=instance,
                                resources={"io_manager": ManifestIOManager(storage=Storage(root=str(tmp_path / "data")))})
        assert result.success
        assert instance.get_run_by_id(killed.run_id).status == dg.DagsterRunStatus.FAILURE
        assert instance.get_run_by_id(result.run_id).status == dg.DagsterRunStatus.SUCCESS
        failure = instance.all_logs(killed.run_id, of_type=dg.DagsterEventType.RUN_FAILURE)
        assert "is gone (killed?)" in failure[-1].message
