"""The shared file mechanics: atomic writes of files and folders, digests, tar reading."""

import hashlib
import io
import tarfile

import pytest

from pipelines.files import atomic_path, fingerprint, iter_tar, read_tar, sha256, tar_keys, write_json, write_text


def test_a_failed_write_leaves_the_old_content_and_no_temporary(tmp_path):
    target = write_text(tmp_path / "out.txt", "old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("boom")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]
    write_json(target, {"b": 1, "a": [2]})
    assert target.read_text() == '{\n "a": [\n  2\n ],\n "b": 1\n}'


def test_a_folder_is_replaced_whole(tmp_path):
    folder = tmp_path / "nested" / "model"
    for content in ("first", "second"):
        with atomic_path(folder) as tmp:
            tmp.mkdir()
            (tmp / content).write_text(content)
    assert [p.name for p in folder.iterdir()] == ["second"]
    assert [p.name for p in folder.parent.iterdir()] == ["model"]


def test_digests(tmp_path):
    a, b = write_text(tmp_path / "a", "x" * 3_000_000), write_text(tmp_path / "b", "y")
    assert sha256(a) == hashlib.sha256(b"x" * 3_000_000).hexdigest()  # read in chunks, same digest
    assert sha256(a, b, root=tmp_path) == hashlib.sha256(b"a\0" + b"x" * 3_000_000 + b"b\0y").hexdigest()
    assert fingerprint({"a": 1, "b": [2]}) == fingerprint({"b": [2], "a": 1}) != fingerprint({"a": 2, "b": [2]})
    assert len(fingerprint("x")) == 16


def test_tar_reading_in_webdataset_convention(tmp_path):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in (("k1.jpg", b"J1"), ("k1.json", b"{}"), ("k2.jpg", b"J2"), ("k1.txt", b"again")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert read_tar(path) == {"k1": {"jpg": b"J1", "json": b"{}", "txt": b"again"}, "k2": {"jpg": b"J2"}}
    assert read_tar(path, {"jpg"}) == {"k1": {"jpg": b"J1"}, "k2": {"jpg": b"J2"}}
    assert [(k, e, d) for k, e, d in iter_tar(path, ())] == [("k1", "jpg", None), ("k1", "json", None),
                                                             ("k2", "jpg", None), ("k1", "txt", None)]
    assert tar_keys(path) == ["k1", "k2", "k1"]  # a sample split in two shows twice
