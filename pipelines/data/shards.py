"""WebDataset shard writing with an index, atomic shards and resume after a crash.

:func:`write_shards` streams samples (dicts with ``__key__``, as :class:`webdataset.TarWriter`
takes them) into ``{prefix}-NNNNNN.tar`` files through :class:`webdataset.ShardWriter`:

- every shard is written as ``….tar.tmp`` and renamed when it is closed, so a reader (or a crash)
  never sees a partial ``.tar``;
- after each rename the sidecar ``index.json`` (written atomically) gains the shard's sample
  count, bytes, sha256 and first/last key; ``complete`` becomes true when the input is exhausted;
- a re-run resumes: leftover ``.tmp`` files and shards missing from the index are deleted, the
  samples already in indexed shards are skipped (the input must be the same deterministic stream;
  the last skipped key is checked against the index) and writing continues at the next shard,
  so the set ends with every sample exactly once;
- keys may not contain dots (WebDataset splits file names at the first dot).

``index.json`` also carries ``meta`` (e.g. the packing config and filter thresholds) for lineage;
a re-run with different ``meta``, ``maxcount`` or ``maxsize`` refuses to resume into the same folder.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from tqdm.auto import tqdm

from pipelines.files import atomic_path, sha256, tar_keys

INDEX_NAME = "index.json"


@dataclass
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str
    first_key: str
    last_key: str


@dataclass
class ShardIndex:
    """The contents of ``index.json``."""

    prefix: str
    maxcount: int
    maxsize: int
    meta: dict[str, Any] = field(default_factory=dict)
    shards: list[ShardInfo] = field(default_factory=list)
    complete: bool = False

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.shards)

    def urls(self, root: str | os.PathLike) -> list[str]:
        return [str(Path(root) / s.name) for s in self.shards]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_samples": self.samples, "total_bytes": self.bytes}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShardIndex":
        return cls(prefix=data["prefix"], maxcount=data["maxcount"], maxsize=data["maxsize"], meta=data.get("meta", {}),
                   shards=[ShardInfo(**s) for s in data["shards"]], complete=data["complete"])


def read_index(out_dir: str | os.PathLike) -> ShardIndex:
    return ShardIndex.from_dict(json.loads((Path(out_dir) / INDEX_NAME).read_text()))


def _write_index(out_dir: Path, index: ShardIndex) -> None:
    with atomic_path(out_dir / INDEX_NAME) as tmp, open(tmp, "w") as f:
        json.dump(index.to_dict(), f, indent=1, sort_keys=True, default=str)
        f.flush()
        os.fsync(f.fileno())  # the index vouches for the shards: on disk before it replaces the old one


def _clean(out_dir: Path, index: ShardIndex) -> None:
    """Delete what a killed writer may have left: ``.tmp`` files and shards not in the index."""
    listed = {s.name for s in index.shards}
    for path in out_dir.glob(f"{index.prefix}-*.tar*"):
        if path.name not in listed:
            path.unlink()
    for shard in index.shards:
        path = out_dir / shard.name
        if not path.exists() or path.stat().st_size != shard.bytes:
            raise RuntimeError(f"indexed shard {path} is missing or has the wrong size; delete {out_dir} and rewrite")


class _IndexedWriter:
    """ShardWriter around ``….tar.tmp`` names whose ``post`` hook renames and indexes each shard."""

    def __init__(self, out_dir: Path, index: ShardIndex) -> None:
        self.out_dir = out_dir
        self.index = index
        self.keys: list[str] = []
        self.writer = wds.ShardWriter(str(out_dir / f"{index.prefix}-%06d.tar.tmp"), maxcount=index.maxcount,
                                      maxsize=index.maxsize, post=self._finished, start_shard=len(index.shards),
                                      verbose=0)

    def write(self, sample: dict[str, Any]) -> None:
        self.writer.write(sample)  # may close (and index) the previous shard before writing this one
        self.keys.append(sample["__key__"])

    def _finished(self, fname: str) -> None:
        tmp = Path(fname)
        if not self.keys:  # ShardWriter opens a shard before the first sample: never index an empty one
            tmp.unlink()
            return
        final = tmp.with_name(tmp.name[: -len(".tmp")])
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        self.index.shards.append(ShardInfo(final.name, len(self.keys), final.stat().st_size, sha256(final),
                                           self.keys[0], self.keys[-1]))
        _write_index(self.out_dir, self.index)
        self.keys = []

    def close(self) -> None:
        self.writer.close()

    def abort(self) -> None:
        """Drop the open shard (its samples are rewritten by the next run)."""
        if self.writer.tarstream is not None:
            self.writer.tarstream.close()
            self.writer.tarstream = None
            Path(self.writer.fname).unlink(missing_ok=True)


def _checked(samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for sample in samples:
        key = sample.get("__key__")
        if not isinstance(key, str) or not key or "." in key:
            raise ValueError(f"sample key {key!r} must be a non-empty string without dots")
        yield sample


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | os.PathLike,
    *,
    maxcount: int = 1000,
    maxsize: int = 1 << 30,
    prefix: str = "shard",
    meta: dict[str, Any] | None = None,
    progress: bool = False,
) -> ShardIndex:
    """Write (or finish writing) a shard set; returns its index. See the module docstring."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = json.loads(json.dumps(meta or {}, sort_keys=True, default=str))
    index = ShardIndex(prefix, maxcount, maxsize, meta)
    if (out / INDEX_NAME).exists():
        found = read_index(out)
        if (found.prefix, found.maxcount, found.maxsize, found.meta) != (prefix, maxcount, maxsize, meta):
            raise ValueError(f"{out} holds a shard set written with other settings (prefix/maxcount/maxsize/meta); "
                             "use a new folder")
        index = found
    _clean(out, index)
    if index.complete:
        return index
    stream = _checked(samples)
    skip = index.samples
    last = None
    for _ in range(skip):
        sample = next(stream, None)
        if sample is None:
            raise ValueError(f"the input has fewer samples than the {skip} already written to {out}")
        last = sample["__key__"]
    if skip and last != index.shards[-1].last_key:
        raise ValueError(f"the input is not the stream that was written: sample {skip} is {last!r}, "
                         f"the index says {index.shards[-1].last_key!r}")
    writer = _IndexedWriter(out, index)
    try:
        for sample in tqdm(stream, desc=f"shards {out.name}", unit="sample", initial=skip, disable=not progress):
            writer.write(sample)
    except BaseException:
        writer.abort()  # the finished shards stay indexed; a re-run resumes after them
        raise
    writer.close()
    index.complete = True
    _write_index(out, index)
    return index


def verify_shards(out_dir: str | os.PathLike) -> list[str]:
    """Problems found in a shard set (empty list: intact): missing/extra files, size, sha256, sample counts."""
    out = Path(out_dir)
    problems: list[str] = []
    try:
        index = read_index(out)
    except FileNotFoundError:
        return [f"{out / INDEX_NAME} is missing"]
    if not index.complete:
        problems.append("index is not complete (the writer did not finish)")
    listed = {s.name for s in index.shards}
    problems += [f"{p.name} is not in the index" for p in out.glob(f"{index.prefix}-*.tar*") if p.name not in listed]
    for shard in index.shards:
        path = out / shard.name
        if not path.exists():
            problems.append(f"{shard.name} is missing")
            continue
        if path.stat().st_size != shard.bytes or sha256(path) != shard.sha256:
            problems.append(f"{shard.name}: size or sha256 differs from the index")
            continue
        keys = tar_keys(path)
        if len(keys) != shard.samples or len(set(keys)) != len(keys):
            problems.append(f"{shard.name}: {len(keys)} keys ({len(set(keys))} distinct), index says {shard.samples}")
    return problems
