"""Downloads against a hostile loopback web: bounded by construction, and SSRF closed on every hop.

The bomb and the endless body are fetched by a separate Python process, so that its peak memory (its own and
that of every img2dataset worker it reaped) is measured for that download alone.
"""

import ipaddress
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from assets.resources import WebImages
from hostile_server import HostileServer
from pipelines.data.download import DownloadConfig, download_urls, is_retryable
from pipelines.data.fetch_guard import REFUSED
from pipelines.data.hosts import HostPolicy

ROOT = Path(__file__).resolve().parents[1]
CONFIG = DownloadConfig(image_size=64, resize_mode="no", timeout=5, thread_count=4, number_sample_per_shard=100)
HOSTILE_EXTRA_RSS_MB = 512
"""How much more one download process and its workers may reach with the bomb and the endless body among its URLs
than fetching one small PNG alone (measured side by side in the same test: the baseline is 0.9-1.7 GB, since an
img2dataset worker imports torch through webdataset, and it grows with what the package imports). The bomb
decoded would add 1.2 GB (OpenCV peaked at 2.3 GB), the endless body grows until the server's 3 GB stop."""

PROBE = """
import json, resource, sys
from pipelines.data.download import DownloadConfig, download_urls
from pipelines.data.hosts import HostPolicy
base, out, names = sys.argv[1], sys.argv[2], sys.argv[3:]
config = DownloadConfig(image_size=64, resize_mode="no", timeout=5, thread_count=4, number_sample_per_shard=100)
result = download_urls([base + "/" + name for name in names], out, config, HostPolicy.allowing(base))
peak = max(resource.getrusage(who).ru_maxrss for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)) / 1024
print(json.dumps({"rows": result.status_table().to_pylist(), "peak_rss_mb": peak}))
"""


@pytest.fixture(scope="module")
def bounded(tmp_path_factory):
    out = tmp_path_factory.mktemp("bounded")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with HostileServer() as server:
        def probe(folder: str, *names: str) -> dict:
            done = subprocess.run([sys.executable, "-c", PROBE, server.url(""), str(out / folder), *names], env=env,
                                  cwd=ROOT, capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, done.stderr[-3000:]
            return json.loads(done.stdout.strip().splitlines()[-1])

        baseline = probe("baseline", "ok.png")
        hostile = probe("out", "ok.png", "bomb.png", "endless")
        yield {"rows": {r["url"].rsplit("/", 1)[1]: r for r in hostile["rows"]}, "peak_rss_mb": hostile["peak_rss_mb"],
               "baseline_rss_mb": baseline["peak_rss_mb"], "server": server, "out": out / "out"}


def test_download_config_bounds_by_default():
    config = DownloadConfig()
    assert config.max_image_area == 25_000_000 and config.max_body_bytes == 16 * 2**20
    assert config.img2dataset_kwargs()["max_image_area"] == 25_000_000


def test_decompression_bomb_is_refused_from_its_header_within_memory_bound(bounded):
    row = bounded["rows"]["bomb.png"]
    assert row["status"] == "refused" and row["key"] is not None, row
    assert row["error"] == "image area 20000x20000 = 400000000 px over max_image_area 25000000", row
    assert bounded["rows"]["ok.png"]["status"] == "ok"
    assert bounded["peak_rss_mb"] < bounded["baseline_rss_mb"] + HOSTILE_EXTRA_RSS_MB, bounded


def test_endless_body_is_refused_at_the_cap_within_memory_bound(bounded):
    row = bounded["rows"]["endless"]
    assert row["status"] == "refused", row
    assert row["error"].startswith(f"body over max_body_bytes {16 * 2**20}"), row
    assert bounded["server"].endless_bytes_sent < 64 * 2**20  # the client stopped reading, the server noticed
    assert bounded["peak_rss_mb"] < bounded["baseline_rss_mb"] + HOSTILE_EXTRA_RSS_MB, bounded


def test_refusals_are_not_retried(bounded):
    assert bounded["server"].requests["/endless"] == 1 and bounded["server"].requests["/bomb.png"] == 1
    assert not is_retryable("failed_to_download", REFUSED + "body over max_body_bytes 1")
    assert is_retryable("failed_to_download", "timed out")


def _loopback_names() -> list[str]:
    """Host names of this machine that resolve to a loopback address and that the policy does not refuse by name
    (the machine's own name, names in /etc/hosts): what a hostile DNS answer looks like, without a DNS server."""
    try:
        listed = [name for line in Path("/etc/hosts").read_text().splitlines()
                  for name in line.split("#")[0].split()[1:]]
    except OSError:
        listed = []
    found = []
    for name in dict.fromkeys([socket.gethostname(), *listed]):
        try:
            addresses = {info[4][0] for info in socket.getaddrinfo(name, 80, type=socket.SOCK_STREAM)}
        except OSError:
            continue
        if HostPolicy().allows(f"http://{name}/") and addresses and all(
                ipaddress.ip_address(a).is_loopback for a in addresses):
            found.append(name)
    return found


@pytest.fixture(scope="module")
def loopback_names() -> list[str]:
    names = _loopback_names()
    if not names:
        pytest.skip("no host name of this machine resolves to loopback (besides localhost, refused by name)")
    return names


@pytest.fixture(scope="module")
def redirected(tmp_path_factory, loopback_names):
    """The real-data policy (``WebImages``), with one allowed host: a server that redirects elsewhere."""
    name, other = loopback_names[0], loopback_names[-1]
    with HostileServer() as allowed, HostileServer() as private:
        policy = WebImages(allowed_hosts=[f"127.0.0.1:{allowed.port}"]).get().policy
        urls = {
            "direct_ok": allowed.url("/ok.png"),
            "to_private_literal": allowed.url("/redirect?to=" + private.url("/ok.png")),
            "to_name_of_loopback": allowed.url("/redirect?to=" + private.url("/ok.png", host=name)),
            "to_allowed": allowed.url("/redirect?to=" + allowed.url("/ok.png")),
            "name_of_loopback": private.url("/ok.png", host=name),
            "other_name_of_loopback": allowed.url("/ok.png", host=other),
        }
        result = download_urls(list(urls.values()), tmp_path_factory.mktemp("redirects") / "out", CONFIG, policy)
        rows = {r["url"]: r for r in result.status_table().to_pylist()}
        yield {key: rows[url] for key, url in urls.items()}, private


def test_real_data_policy_resolves_dns_by_default():
    assert WebImages().get().policy.resolve_dns and HostPolicy().resolve_dns


def test_redirect_to_a_private_address_is_refused_on_the_hop(redirected, loopback_names):
    rows, private = redirected
    assert rows["direct_ok"]["status"] == "ok" and rows["to_allowed"]["status"] == "ok"
    row = rows["to_private_literal"]
    assert row["status"] == "refused" and row["error"].startswith(f"redirect to 127.0.0.1:{private.port}: loopback"), row
    row = rows["to_name_of_loopback"]  # the name passes as written; its address does not when connecting
    assert row["status"] == "refused" and row["error"].startswith(f"'{loopback_names[0]}' resolves to loopback"), row
    assert private.requests["/ok.png"] == 0


def test_host_name_resolving_to_loopback_is_refused_when_connecting(redirected, loopback_names):
    rows, private = redirected
    for key, host in (("name_of_loopback", loopback_names[0]), ("other_name_of_loopback", loopback_names[-1])):
        assert rows[key]["status"] == "refused", rows[key]
        assert rows[key]["error"].startswith(f"'{host}' resolves to loopback address "), rows[key]
    assert private.requests["/ok.png"] == 0


def test_policy_judges_addresses_after_dns():
    policy = HostPolicy()
    assert policy.allows("http://vm:8080/x")  # as written: a name; the address is judged when connecting
    assert policy.checks_addresses("vm", 8080)
    assert policy.address_refusal("vm", "127.0.0.1") == "'vm' resolves to loopback address 127.0.0.1"
    assert policy.address_refusal("example.com", "10.0.0.8") == "'example.com' resolves to private address 10.0.0.8"
    assert policy.address_refusal("example.com", "93.184.215.14") is None
    assert not HostPolicy.allowing("http://127.0.0.1:9").checks_addresses("127.0.0.1", 9)
    assert not HostPolicy(resolve_dns=False).checks_addresses("vm", 80)
