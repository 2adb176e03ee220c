import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from pipelines.data.shards import read_index, verify_shards, write_shards
from pipelines.files import tar_keys

ROOT = Path(__file__).resolve().parents[1]

WRITER = """
import sys, time
import numpy as np
from pipelines.data.shards import write_shards

out, n, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])

def samples():
    for i in range(n):
        time.sleep(delay)
        yield {"__key__": f"s{i:05d}", "input_ids.npy": np.arange(i % 50, dtype=np.int32), "json": {"i": i}}

write_shards(samples(), out, maxcount=7, meta={"run": "kill-test"})
"""


def _run_writer(out, n, delay):
    return subprocess.Popen([sys.executable, "-c", WRITER, str(out), str(n), str(delay)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _all_keys(out):
    index = read_index(out)
    return [k for shard in index.shards for k in tar_keys(out / shard.name)]


def test_kill_mid_shard_then_resume_gives_every_sample_once(tmp_path):
    out = tmp_path / "shards"
    n = 60
    writer = _run_writer(out, n, 0.02)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait until a few shards are indexed, then kill mid-shard
        if (out / "index.json").exists() and len(json.loads((out / "index.json").read_text())["shards"]) >= 2:
            break
        time.sleep(0.02)
    time.sleep(0.05)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    index = read_index(out)
    assert not index.complete and 2 <= len(index.shards) < 9
    # no partial shard is visible: every .tar is indexed; the open shard only exists as .tmp
    assert {p.name for p in out.glob("*.tar")} == {s.name for s in index.shards}
    assert any(p.name.endswith(".tar.tmp") for p in out.iterdir())
    problems = verify_shards(out)
    assert problems[0] == "index is not complete (the writer did not finish)"
    assert all(p.endswith(".tar.tmp is not in the index") for p in problems[1:])

    rerun = _run_writer(out, n, 0.0)
    assert rerun.wait(timeout=60) == 0, rerun.stderr.read().decode()
    assert verify_shards(out) == []
    keys = _all_keys(out)
    assert keys == [f"s{i:05d}" for i in range(n)]
    index = read_index(out)
    assert index.complete and index.samples == n and [s.samples for s in index.shards] == [7] * 8 + [4]
    assert not any(p.name.endswith(".tmp") for p in out.iterdir())


def test_roundtrip_through_webdataset_and_rerun_is_a_noop(tmp_path):
    samples = [{"__key__": f"k{i}", "input_ids.npy": np.arange(i, dtype=np.int32), "json": {"i": i}, "000.jpg": b"\xff\xd8"}
               for i in range(10)]
    index = write_shards(samples, tmp_path, maxcount=4, meta={"a": 1})
    assert [s.samples for s in index.shards] == [4, 4, 2] and index.complete
    read = list(wds.WebDataset(index.urls(tmp_path), shardshuffle=False).decode())
    assert [r["__key__"] for r in read] == [f"k{i}" for i in range(10)]
    assert read[3]["input_ids.npy"].tolist() == [0, 1, 2] and read[3]["json"] == {"i": 3}
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    again = write_shards(iter(()), tmp_path, maxcount=4, meta={"a": 1})  # complete: nothing is read or written
    assert again.to_dict() == index.to_dict()
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes


def test_refuses_dotted_keys_other_settings_and_a_different_stream(tmp_path):
    with pytest.raises(ValueError, match="without dots"):
        write_shards([{"__key__": "a.b", "json": {}}], tmp_path / "a")
    write_shards([{"__key__": "x", "json": {}}], tmp_path / "b", meta={"t": 1})
    with pytest.raises(ValueError, match="other settings"):
        write_shards([{"__key__": "x", "json": {}}], tmp_path / "b", meta={"t": 2})
    # a killed run resumed with another input stream is detected, not silently mixed
    out = tmp_path / "c"

    def crashing():
        for i in range(5):
            yield {"__key__": f"a{i}", "json": {}}
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_shards(crashing(), out, maxcount=2)
    assert read_index(out).samples == 4  # the two full shards; the open one is not indexed
    with pytest.raises(ValueError, match="not the stream"):
        write_shards(({"__key__": f"b{i}", "json": {}} for i in range(9)), out, maxcount=2)


def test_empty_input_leaves_no_empty_tar(tmp_path):
    index = write_shards(iter(()), tmp_path)
    assert index.complete and index.shards == []
    assert [p.name for p in tmp_path.iterdir()] == ["index.json"]
