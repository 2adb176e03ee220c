"""Where the stages read and write: the storage root, its per-stage folders, and the watched folder of raw shards.

Raw metadata shards lie in ``<raw>/<source>/<file>`` (``mmc4/``, ``laion/``, ``cc12m/``, ``obelics/``, ``omnicorpus/``,
``mint1t/``: the folder names the reader, :data:`pipelines.data.readers.READERS`); each is one partition,
keyed ``<source>/<file>`` (e.g. ``laion/part-00000.parquet``). A stage writes a partition's output to
``<root>/<stage>/<source>/<file name with dots as underscores><suffix>`` and whole-run outputs under
``<root>/<stage>/...``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SOURCE_SUFFIXES = {"mmc4": (".jsonl", ".zip"), "laion": (".parquet",), "cc12m": (".tsv",), "obelics": (".parquet",),
                   "omnicorpus": (".parquet",), "mint1t": (".parquet",)}
"""Sub-folders of the watched raw folder and the file names a reader exists for (MMC4: ``docs_shard_{i}_v2.jsonl.zip``
as released, ``shard_{i}.zip`` as download scripts save them, ``.jsonl``)."""
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".download", ".incomplete")
"""Names of files still being written (by a downloader, or an atomic writer's temporary), which are not shards yet."""


def local_path(value: str) -> Path:
    """A local path or ``file://`` URL as an absolute path. The stages write local files (img2dataset, parquet and
    tar writers with atomic renames), so object storage is mounted as a path (s3fs, gcsfuse), not named by URL."""
    if value.startswith("file://"):
        value = value[len("file://"):]
    elif "://" in value:
        raise ValueError(f"storage path {value!r}: only local paths and file:// URLs are written by the stages; "
                         "mount object storage as a path")
    return Path(value).expanduser().absolute()


@dataclass(frozen=True)
class DataLayout:
    """The storage root and the watched folder of raw metadata shards (absolute paths)."""

    root: Path
    raw: Path

    @classmethod
    def at(cls, root: str, raw_dir: str = "") -> "DataLayout":
        """The layout under ``root`` (a path or ``file://`` URL); raw shards in ``raw_dir`` (default ``<root>/raw``)."""
        root_path = local_path(root)
        return cls(root_path, local_path(raw_dir) if raw_dir else root_path / "raw")

    def path(self, *parts: str) -> Path:
        """A path under the root (parent folders created)."""
        path = self.root.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def partition_path(self, stage: str, partition_key: str, suffix: str = "") -> Path:
        """``<root>/<stage>/<source>/<file name with dots as underscores><suffix>`` (parents created)."""
        source, name = self.raw_file(partition_key).relative_to(self.raw).parts
        return self.path(stage, source, name.replace(".", "_") + suffix)

    def raw_file(self, partition_key: str) -> Path:
        """The raw metadata shard of a ``<source>/<file>`` partition key."""
        source, _, name = partition_key.partition("/")
        if source not in SOURCE_SUFFIXES or not name or "/" in name:
            raise ValueError(f"partition key {partition_key!r} is not <source>/<file> with source in {list(SOURCE_SUFFIXES)}")
        return self.raw / source / name

    def raw_partition_keys(self) -> list[str]:
        """``<source>/<file>`` of every raw shard in the watched folder (sorted; files still being written, whose
        names end otherwise, are skipped, and so is any other file: :meth:`unrecognised_raw_files` names those)."""
        return sorted(f"{source}/{p.name}" for source, p in self._raw_files()
                      if p.name.endswith(SOURCE_SUFFIXES[source]))

    def unrecognised_raw_files(self) -> list[str]:
        """``<source>/<file>`` of the files in the source folders that no reader takes (not a shard, and not a hidden
        file or one still being written): what the raw-shard listing leaves out, for the sensor to say so."""
        return sorted(f"{source}/{p.name}" for source, p in self._raw_files()
                      if not p.name.endswith(SOURCE_SUFFIXES[source]) and not p.name.startswith(".")
                      and not p.name.endswith(PARTIAL_SUFFIXES))

    def _raw_files(self) -> list[tuple[str, Path]]:
        return [(source, p) for source in SOURCE_SUFFIXES if (self.raw / source).is_dir()
                for p in (self.raw / source).iterdir() if p.is_file()]
