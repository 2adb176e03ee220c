"""The download stage on img2dataset's ``pyspark`` distributor (a local Spark: a JVM and Spark's Python workers)
gives the same images, and the same status for every URL, as on its ``multiprocessing`` one."""

import json
import sys

import pytest

from pipelines.data.download import DownloadConfig, download_urls, load_status
from pipelines.data.hosts import HostPolicy
from pipelines.sample_world.image_server import FaultConfig, ImageServer
from pipelines.sample_world.world import WorldConfig, generate_world
from test_download import tar_samples

pytestmark = pytest.mark.slow

# Permanent faults only: which URLs fail is the server's decision, never the timing of one distributor's workers.
FAULTS = FaultConfig(not_found=0.10, truncated=0.05, not_image=0.05, seed=3)


def test_pyspark_distributor_downloads_the_same_images_as_multiprocessing(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARK_LOCAL_IP", "127.0.0.1")  # Spark binds to loopback, never to a public interface
    monkeypatch.setenv("PYSPARK_PYTHON", sys.executable)  # Spark's Python workers run this environment
    world = generate_world(WorldConfig(seed=5, n_pairs=60, n_stories=4))
    with ImageServer(world.routes(), FAULTS) as server:
        urls = [server.url(path) for path in sorted(world.routes())]
        results = {}
        for distributor in ("multiprocessing", "pyspark"):
            config = DownloadConfig(image_size=64, resize_mode="no", timeout=5, processes_count=2, thread_count=8,
                                    number_sample_per_shard=20, distributor=distributor)
            results[distributor] = download_urls(urls, tmp_path / distributor, config, HostPolicy.allowing(server.base_url))
    by_process, by_spark = results["multiprocessing"], results["pyspark"]
    assert by_spark.counts == by_process.counts and 0 < by_spark.counts["ok"] < len(urls)
    status = {d: {u: row["status"] for u, row in load_status(r.status_path).items()} for d, r in results.items()}
    assert status["pyspark"] == status["multiprocessing"]
    images = {d: {json.loads(s["json"])["url"]: s["jpg"] for s in tar_samples(r.shards).values()}
              for d, r in results.items()}
    assert images["pyspark"] == images["multiprocessing"] and len(images["pyspark"]) == by_spark.counts["ok"]
