"""The file mechanics every stage shares: writes that land whole or not at all, digests, and tar archives.

- :func:`atomic_path`: the one way a stage writes a file or a folder: into a temporary sibling, renamed
  onto the target when complete, so a reader (or a crash) never sees a partial output.
- :func:`sha256` and :func:`fingerprint`: digests of files (chunked) and of JSON-able content.
- :func:`iter_tar`, :func:`read_tar` and :func:`tar_keys`: tar archives read in WebDataset's convention
  (a sample's key is a file name up to its first dot).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from collections.abc import Container, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CHUNK_BYTES = 1 << 20


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A fresh path to write ``path``'s new content to (a file, or a folder the block creates).

    The path lies in a private temporary folder beside ``path`` (same filesystem). When the block ends
    without error it is renamed onto ``path`` (an existing file or folder there is replaced); on error it is
    removed and ``path`` is left as it was. Parent folders are created."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield scratch / path.name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        os.replace(scratch / path.name, path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` as ``path``'s whole content, atomically (:func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """``data`` as indented, key-sorted JSON, atomically (:func:`atomic_path`)."""
    return write_text(path, json.dumps(data, indent=1, sort_keys=True, default=str))


def sha256(*paths: str | os.PathLike, root: str | os.PathLike | None = None) -> str:
    """Hex sha256 of the files' bytes, in order, read in 1 MiB chunks. With ``root``, each file's path
    relative to ``root`` and a NUL byte go before its bytes (so renaming a file changes the digest)."""
    digest = hashlib.sha256()
    for path in map(Path, paths):
        if root is not None:
            digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
                digest.update(chunk)
    return digest.hexdigest()


def fingerprint(*parts: Any) -> str:
    """16 hex digits of the sha256 of JSON-serialisable content (settings, manifests, digests): names the
    folders that content produces and versions the outputs."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def iter_tar(path: str | os.PathLike, extensions: Container[str] | None = None) -> Iterator[tuple[str, str, bytes | None]]:
    """``(key, extension, data)`` of every regular file of a tar, in archive order. ``data`` is the file's bytes
    when ``extensions`` is None or holds its extension, else None (the file is not read)."""
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, _, extension = member.name.partition(".")
            wanted = extensions is None or extension in extensions
            yield key, extension, tar.extractfile(member).read() if wanted else None


def read_tar(path: str | os.PathLike, extensions: Container[str] | None = None) -> dict[str, dict[str, bytes]]:
    """``key -> {extension: bytes}`` of a tar's samples (only ``extensions``, when given)."""
    samples: dict[str, dict[str, bytes]] = {}
    for key, extension, data in iter_tar(path, extensions):
        if data is not None:
            samples.setdefault(key, {})[extension] = data
    return samples


def tar_keys(path: str | os.PathLike) -> list[str]:
    """Sample keys of a tar in order, one per run of files with the same key (a key that comes back after
    another one is listed twice: a sample split in two)."""
    keys: list[str] = []
    for key, _, _ in iter_tar(path, extensions=()):
        if not keys or keys[-1] != key:
            keys.append(key)
    return keys
