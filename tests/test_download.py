"""Full download of a few hundred sample-world images over the loopback server, with faults."""

import io
import json
import multiprocessing
import signal
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.data.documents import image_elements, make_pair, read_documents
from pipelines.data.dedup import DedupConfig, DedupIndex, dedup_documents
from pipelines.data.download import (
    DownloadConfig, download_documents, download_urls, is_retryable, _terminable_workers,
)
from pipelines.data.errors import reraise
from pipelines.data.hosts import HostPolicy
from pipelines.data.readers import read_source
from pipelines.sample_world.formats import write_metadata
from pipelines.sample_world.image_server import FaultConfig, ImageServer
from pipelines.sample_world.parse import parse_image
from pipelines.sample_world.world import WorldConfig, generate_world

FAULTS = FaultConfig(not_found=0.10, timeout=0.05, truncated=0.03, not_image=0.02, transient=0.5, seed=1, delay_s=3.5)
CONFIG = DownloadConfig(image_size=64, resize_mode="no", timeout=2, thread_count=16, number_sample_per_shard=100)


def tar_samples(paths):
    samples = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                samples.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return samples


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("download")
    world = generate_world(WorldConfig(seed=11, n_pairs=240, n_stories=12))
    routes = world.routes()
    alias_of = sorted(routes)[0]
    routes["/images/alias.jpg"] = routes[alias_of]  # the same image under a second URL
    with ImageServer(routes, FAULTS) as server:
        written = write_metadata(world, root / "meta", server.base_url)
        docs = [d for k in ("mmc4", "laion", "cc12m") for p in written[k] for d in read_source(p, reraise)]
        docs.append(make_pair(doc_id="extra:repeat", source="extra", url=docs[-1]["elements"][0]["url"], caption="x"))
        docs.append(make_pair(doc_id="extra:alias", source="extra", url=server.url("/images/alias.jpg"), caption="y"))
        policy = HostPolicy.allowing(server.base_url)
        result = download_documents(docs, root / "out", CONFIG, policy)
        yield {"root": root, "world": world, "server": server, "docs": docs, "result": result, "policy": policy,
               "requests_after_first": server.request_count, "alias_of": server.url(alias_of)}


def plan(server, url):
    path = url.removeprefix(server.base_url)
    return server.faults.fault_for(path), server.faults.is_transient(path)


def test_every_url_has_a_final_status_and_counts_add_up(run):
    result, server = run["result"], run["server"]
    status = result.status_table().to_pylist()
    urls = list(dict.fromkeys(e["url"] for d in run["docs"] for e in d["elements"] if e["type"] == "image"))
    assert 280 <= len(urls) <= 320
    assert [r["url"] for r in status] == urls  # one row per distinct URL, first-seen order
    assert sum(result.counts.values()) == len(urls)
    samples = tar_samples(result.shards)
    ok = [r for r in status if r["status"] == "ok"]
    assert result.counts["ok"] == len(ok) == len(samples)
    assert {r["key"] for r in ok} == set(samples)
    assert len({r["key"] for r in status}) == len(urls)  # keys unique
    stats = [json.loads(p.read_text()) for p in sorted((run["root"] / "out" / "shards").glob("*_stats.json"))]
    assert sum(s["successes"] for s in stats) == len(ok)
    assert sum(s["count"] for s in stats) == len(urls)
    for r in status:
        fault, transient = plan(server, r["url"])
        retryable_fault = fault in ("timeout", "truncated")
        if fault is None or (transient and retryable_fault):
            assert r["status"] == "ok", r
            image = Image.open(io.BytesIO(samples[r["key"]]["jpg"]))
            assert image.size == (64, 64) and r["sha256"]
        elif fault == "not_found":
            assert (r["status"], r["error"]) == ("failed_to_download", "HTTP Error 404: Not Found"), r
        elif retryable_fault:
            assert r["status"] == "failed_to_download" and r["retries"] == 1, r
        elif fault == "not_image":
            assert r["status"] == "failed_to_resize", r
    faults = [plan(server, u)[0] for u in urls]
    assert faults.count("not_found") >= 15 and faults.count("timeout") >= 6 and faults.count("truncated") >= 3


def test_retry_pass_recovers_transient_faults_into_original_shards(run):
    result, server = run["result"], run["server"]
    status = result.status_table().to_pylist()
    transient = [r for r in status if plan(server, r["url"])[1] and plan(server, r["url"])[0] in ("timeout", "truncated")]
    assert len(transient) >= 3
    assert result.recovered_by_retry == len(transient)
    assert result.retried == sum(is_retryable("failed_to_download", "timed out")
                                 for r in status if plan(server, r["url"])[0] in ("timeout", "truncated"))
    samples = tar_samples(result.shards)
    shard_rows = {r["url"]: r for p in sorted((run["root"] / "out" / "shards").glob("*.parquet"))
                  for r in pq.read_table(p).to_pylist()}
    truth = run["world"].scenes()
    for r in transient:
        assert r["retries"] == 1 and server.requests_for(r["url"].removeprefix(server.base_url)) == 2
        meta = json.loads(samples[r["key"]]["json"])
        assert meta["key"] == r["key"] and meta["status"] == "success" and meta["url"] == r["url"]
        assert shard_rows[r["url"]]["status"] == "success" and shard_rows[r["url"]]["key"] == r["key"]
        image_id = r["url"].rsplit("/", 1)[1].split(".")[0]
        parsed = parse_image(Image.open(io.BytesIO(samples[r["key"]]["jpg"])))
        assert parsed.objects == truth[image_id].objects
    # a 404 is permanent: fetched exactly once
    not_found = [r for r in status if plan(server, r["url"])[0] == "not_found"]
    assert all(server.requests_for(r["url"].removeprefix(server.base_url)) == 1 for r in not_found)


def test_documents_carry_status_per_image(run):
    docs = list(read_documents(run["root"] / "out" / "documents.parquet"))
    assert len(docs) == len(run["docs"])
    status = {r["url"]: r for r in run["result"].status_table().to_pylist()}
    n_images = 0
    for doc in docs:
        for element in doc["elements"]:
            if element["type"] == "image":
                n_images += 1
                row = status[element["url"]]
                assert (element["status"], element["key"], element["error"]) == (row["status"], row["key"], row["error"])
    assert n_images == len(status) + 1  # the repeated URL is one download


EXACT = DedupConfig(phash_max_distance=None)  # the world's 64 px scenes of one small shape share perceptual hashes


def test_dedup_drops_repeated_urls_and_images_with_reasons(run):
    """On the download's own documents: the sha256 img2dataset gives of the fetched bytes finds the same image
    behind a second URL."""
    docs = list(read_documents(run["root"] / "out" / "documents.parquet"))
    drops = []
    kept = list(dedup_documents(docs, DedupIndex(EXACT), drops.append))
    reasons = {d.doc_id: f"{d.rule}: {d.reason}" for d in drops if d.url is not None}
    assert reasons["extra:repeat"].startswith("duplicate_url: first used by cc12m:")
    alias_row = next(d for d in docs if d["doc_id"] == "extra:alias")["elements"][0]
    if alias_row["status"] == "ok":
        assert reasons["extra:alias"].startswith(f"duplicate_image: same sha256 as {run['alias_of']}")
    by_id = {d["doc_id"]: d for d in docs}
    pair_drops = {d.doc_id for d in drops if d.url is None}
    assert "extra:repeat" in pair_drops and pair_drops == {i for i in reasons if by_id[i]["kind"] == "pair"}
    element_reasons = {(d.doc_id, d.url): f"{d.rule}: {d.reason}" for d in drops if d.url is not None}
    first_sha = {}
    for doc in docs:  # every duplicate_image drop really repeats bytes first seen under another URL
        for e in doc["elements"]:
            if e["type"] == "image" and e["sha256"]:
                reason = element_reasons.get((doc["doc_id"], e["url"]), "")
                if reason.startswith("duplicate_image"):
                    assert first_sha[e["sha256"]] != e["url"] and first_sha[e["sha256"]] in reason
                first_sha.setdefault(e["sha256"], e["url"])
    assert len(kept) == len(docs) - len({d.doc_id for d in drops if d.url is None})
    # cross-shard: the same index sees a second shard
    index = DedupIndex(EXACT)
    first = list(dedup_documents(docs[:100], index, drops.append))
    again = list(dedup_documents(docs[:100], index, drops.append))
    assert len(first) == 100 and all(not image_elements(d) for d in again)  # every image was seen: none kept


def test_rerun_does_not_refetch_finished_shards_and_keeps_keys(run):
    server, before = run["server"], run["result"].status_table().to_pylist()
    start = server.request_count
    assert start == run["requests_after_first"]
    again = download_documents(run["docs"], run["root"] / "out", DownloadConfig(**{**CONFIG.__dict__, "retry_passes": 0}),
                               run["policy"])
    assert server.request_count == start
    assert again.status_table().to_pylist() == before


def test_host_policy_refuses_loopback_when_not_allowed(run, tmp_path):
    server = run["server"]
    start = server.request_count
    url = server.url("/images/p000000.jpg")
    result = download_urls([url, "file:///etc/passwd"], tmp_path / "out", CONFIG)  # default policy
    rows = result.status_table().to_pylist()
    assert [r["status"] for r in rows] == ["refused", "refused"]
    assert rows[0]["error"].startswith("loopback address 127.0.0.1")
    assert rows[1]["error"] == "scheme 'file' not allowed"
    assert server.request_count == start


@pytest.mark.parametrize("url, reason", [
    ("http://127.0.0.1/x", "loopback"), ("http://localhost:8080/x", "local host name"),
    ("http://10.1.2.3/x", "private"), ("http://192.168.0.1/x", "private"), ("http://169.254.169.254/latest", "link-local"),
    ("http://[::1]/x", "loopback"), ("http://[::ffff:127.0.0.1]/x", "loopback"), ("http://2130706433/x", "loopback"),
    ("http://0x7f.1/x", "loopback"), ("http://0.0.0.0/x", "unspecified"), ("http://metadata.internal/x", "local host name"),
    ("gopher://example.com/x", "scheme"), ("http:///x", "no host"),
])
def test_host_policy_refusals(url, reason):
    refusal = HostPolicy().refusal(url)
    assert refusal is not None and reason in refusal


def test_host_policy_allows_public_and_explicit_hosts():
    policy = HostPolicy()
    assert policy.allows("https://images.example.com/a.jpg") and policy.allows("http://8.8.8.8/a.jpg")
    explicit = HostPolicy.allowing("http://127.0.0.1:8123")
    assert explicit.allows("http://127.0.0.1:8123/a.jpg")
    assert not explicit.allows("http://127.0.0.1:8124/a.jpg")
    assert HostPolicy(allow_private=True).allows("http://10.0.0.1/a.jpg")


def test_img2dataset_workers_start_terminable_when_sigterm_is_ignored():
    """img2dataset stops its pool with SIGTERM; workers that inherit an ignored SIGTERM outlive it and can hang
    the join forever. Inside ``_terminable_workers`` new processes get the default action; outside, it is as before."""
    previous = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with _terminable_workers():
            with multiprocessing.get_context("spawn").Pool(1) as pool:
                assert pool.apply(signal.getsignal, (signal.SIGTERM,)) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, previous)
