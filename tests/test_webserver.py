"""The real webserver loads the code location: asset graph, checks, jobs, schedule and sensor via GraphQL."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

QUERY = """
{
  repositoriesOrError {
    ... on RepositoryConnection {
      nodes {
        name
        location { name }
        jobs { name }
        schedules { name cronSchedule }
        sensors { name }
        assetNodes {
          assetKey { path }
          groupName
          isPartitioned
          assetChecksOrError { ... on AssetChecks { checks { name blocking } } }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: bytes | None = None, timeout: float = 5.0) -> bytes:
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"} if data else {})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


@pytest.fixture
def webserver(tmp_path):
    port = _free_port()
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home), "WEFT_DATA_ROOT": str(tmp_path / "data"),
           "HF_HUB_OFFLINE": "1", "NO_ALBUMENTATIONS_UPDATE": "1"}
    executable = Path(sys.executable).with_name("dagster-webserver")
    process = subprocess.Popen(
        [str(executable), "-h", "127.0.0.1", "-p", str(port), "-w", str(ROOT / "workspace.yaml")],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"webserver exited with {process.returncode}: {process.stdout.read().decode()[-3000:]}")
            try:
                _get(base + "/server_info", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("webserver did not answer /server_info within 120 s")
                time.sleep(0.5)
        yield base
    finally:
        process.terminate()  # only the process this test started
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        process.stdout.close()


def test_webserver_serves_the_asset_graph_checks_schedule_and_sensor(webserver):
    deadline = time.monotonic() + 90
    while True:  # the code location loads in the background after the server answers
        answer = json.loads(_get(webserver + "/graphql", json.dumps({"query": QUERY}).encode(), timeout=30))
        nodes = answer.get("data", {}).get("repositoriesOrError", {}).get("nodes")
        if nodes or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert nodes, answer
    (repo,) = nodes
    assets = {"/".join(a["assetKey"]["path"]): a for a in repo["assetNodes"]}
    assert set(assets) == {"sample_world", "raw_shards", "raw_documents", "downloaded_images", "clip_scorer", "clip_scores",
                           "filtered_documents", "captioner", "recaptions", "deduplicated_documents",
                           "decontaminated_documents", "tokenizer", "packed_sequences", "checkpoint",
                           "instruction_sequences", "finetuned_checkpoint", "evaluation_report", "ablation_sequences",
                           "ablation_checkpoints", "ablation_instruction_sequences", "ablation_finetuned_checkpoints",
                           "mmfs_ablation_report"}
    assert assets["downloaded_images"]["isPartitioned"] and not assets["packed_sequences"]["isPartitioned"]
    assert assets["raw_shards"]["isPartitioned"]  # the files, one partition per shard
    assert assets["recaptions"]["isPartitioned"] and not assets["captioner"]["isPartitioned"]
    assert assets["ablation_checkpoints"]["isPartitioned"] and not assets["mmfs_ablation_report"]["isPartitioned"]
    checks = {c["name"]: c["blocking"] for a in assets.values() for c in a["assetChecksOrError"]["checks"]}
    assert checks == {
        "raw_documents_shards_readable": False, "raw_documents_parse_rate": False,
        "downloaded_images_shard_integrity": True,
        "downloaded_images_success_rate": False, "filtered_documents_pass_rate": False,
        "deduplicated_documents_rate": False,
        "packed_sequences_shard_integrity": True, "packed_sequences_max_tokens": False,
        "instruction_sequences_shard_integrity": True, "evaluation_report_beats_untrained": False,
        "evaluation_report_finetuned_beats_baselines": False,
    }
    assert {"sample_world_main", "sample_world_data", "mmfs_ablation", "refilter", "ingest"} <= {j["name"] for j in repo["jobs"]}
    assert repo["schedules"] == [{"name": "weekly_refilter", "cronSchedule": "0 3 * * 1"}]
    assert repo["sensors"] == [{"name": "raw_shard_sensor"}]
