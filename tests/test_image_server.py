"""The loopback image server: serving, counting, deterministic and transient faults, clean stop."""

import http.client
import threading
import time
import urllib.error
import urllib.request

import pytest

from pipelines.sample_world.image_server import FAULTS, FaultConfig, ImageServer

ROUTES = {f"/images/{i}.jpg": bytes([i % 256]) * (200 + i) for i in range(400)}


def fetch(url, timeout=5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read()


def test_serves_routes_and_counts_requests():
    with ImageServer(ROUTES) as server:
        assert server.base_url.startswith("http://127.0.0.1:") and server.port > 0
        assert server.request_count == 0
        assert fetch(server.url("/images/3.jpg")) == (200, ROUTES["/images/3.jpg"])
        with pytest.raises(urllib.error.HTTPError) as err:
            fetch(server.url("/missing.jpg"))
        assert err.value.code == 404
        fetch(server.url("/images/3.jpg"))
        assert server.request_count == 3 and server.requests_for("/images/3.jpg") == 2
        assert server.outcome_counts() == {"ok": 2, "not_found": 1}
    with pytest.raises(RuntimeError):
        server.port


def test_binds_loopback_only():
    with pytest.raises(ValueError, match="loopback"):
        ImageServer(ROUTES, host="0.0.0.0")


def test_fault_plan_is_deterministic_and_follows_rates():
    faults = FaultConfig(not_found=0.1, server_error=0.05, timeout=0.05, truncated=0.05, not_image=0.05,
                         oversized=0.02, transient=0.5, seed=7)
    plan = {p: faults.fault_for(p) for p in ROUTES}
    assert plan == {p: FaultConfig(**{**faults.__dict__}).fault_for(p) for p in ROUTES}
    assert plan != {p: FaultConfig(not_found=0.1, seed=8).fault_for(p) for p in ROUTES}
    counts = {name: sum(v == name for v in plan.values()) for name in FAULTS}
    assert 20 <= counts["not_found"] <= 60 and 8 <= counts["timeout"] <= 35 and counts["oversized"] >= 2
    transient = [p for p in ROUTES if faults.is_transient(p)]
    assert all(plan[p] is not None for p in transient)
    assert 0.3 < len(transient) / sum(v is not None for v in plan.values()) < 0.7
    with pytest.raises(ValueError):
        FaultConfig(not_found=0.8, timeout=0.3)


def test_each_fault_behaves_and_transient_ones_recover():
    faults = FaultConfig(not_found=0.2, server_error=0.1, timeout=0.1, truncated=0.1, not_image=0.1, oversized=0.1,
                         transient=0.5, delay_s=1.0)
    by_fault = {}
    for path in ROUTES:
        by_fault.setdefault((faults.fault_for(path), faults.is_transient(path)), path)
    with ImageServer(ROUTES, faults) as server:
        def first_then_second(path, timeout=0.3):
            results = []
            for _ in range(2):
                try:
                    results.append(fetch(server.url(path), timeout=timeout))
                except urllib.error.HTTPError as err:
                    results.append(err.code)
                except (TimeoutError, http.client.IncompleteRead, urllib.error.URLError) as err:
                    results.append(type(err).__name__)
            return results

        path = by_fault[("not_found", False)]
        assert first_then_second(path) == [404, 404]
        assert first_then_second(by_fault[("server_error", False)]) == [500, 500]
        path = by_fault[("server_error", True)]
        assert first_then_second(path) == [500, (200, ROUTES[path])]
        assert first_then_second(by_fault[("timeout", False)]) in (["TimeoutError"] * 2, ["URLError"] * 2)
        assert first_then_second(by_fault[("truncated", False)]) == ["IncompleteRead"] * 2
        status, body = fetch(server.url(by_fault[("not_image", False)]))
        assert status == 200 and body.startswith(b"<html>")
        status, body = fetch(server.url(by_fault[("oversized", False)]))
        assert status == 200 and body[:2] == b"\xff\xd8" and len(body) > 1000


def test_stop_does_not_wait_for_slow_responses():
    faults = FaultConfig(timeout=1.0, delay_s=30)
    server = ImageServer(ROUTES, faults, max_threads=4).start()
    errors = []

    def slow_client():
        try:
            fetch(server.url("/images/1.jpg"), 0.5)
        except OSError as error:  # the client gives up on the stalled response
            errors.append(error)

    clients = [threading.Thread(target=slow_client) for _ in range(3)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    assert len(errors) == 3, "every client should time out on the stalled response"
    start = time.monotonic()
    server.stop()
    assert time.monotonic() - start < 5


def test_bounded_threads_still_serve_many_concurrent_clients():
    results = []
    with ImageServer(ROUTES, max_threads=4) as server:
        def worker(i):
            results.append(fetch(server.url(f"/images/{i}.jpg"))[1] == ROUTES[f"/images/{i}.jpg"])
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(40)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert server.request_count == 40
    assert results == [True] * 40
