"""The downloaded_images stage: each raw shard's image URLs fetched with img2dataset (:mod:`pipelines.data.download`),
every image's outcome attached to its document, per partition.

Settings that change the stored images (size, resize mode, format, quality) name the output folder: a re-run
with them downloads again, any other re-run resumes (img2dataset's incremental mode skips finished shards).
A shard's ``content`` digests what was fetched (every URL's key, status and image sha256, and those settings), not
where it lies or which server served it: the data version two clones of the same data agree on.
"""

from __future__ import annotations

import logging
import tarfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow.parquet as pq

from pipelines.data.documents import IMAGE_STATUS_OK, read_documents
from pipelines.data.download import DownloadConfig, DownloadResult, download_documents
from pipelines.data.hosts import HostPolicy
from pipelines.data.layout import DataLayout
from pipelines.data.raw_documents import RawShard
from pipelines.files import fingerprint, read_tar, tar_keys

logger = logging.getLogger(__name__)


class ImageSource(Protocol):
    """Where a download fetches from: the web as written, or the sample world's loopback server."""

    def download(self, documents: Iterable[dict[str, Any]], out_dir: Path, config: DownloadConfig) -> DownloadResult:
        ...


@dataclass(frozen=True)
class WebImages:
    """Image URLs fetched as written in the metadata, under ``policy`` (public hosts only by default)."""

    policy: HostPolicy = HostPolicy()

    def download(self, documents: Iterable[dict[str, Any]], out_dir: Path, config: DownloadConfig) -> DownloadResult:
        return download_documents(documents, out_dir, config, self.policy)


@dataclass(frozen=True)
class ShardFile:
    path: str
    bytes: int


@dataclass(frozen=True)
class DownloadedShard:
    """One raw shard's download: img2dataset's tars, the status of every URL and the documents carrying them."""

    output_dir: str
    documents: str
    """``documents.parquet``: the shard's documents, every image element with its ``status``, ``key``, ``sha256``."""
    status: str
    """``status.parquet``: one row per distinct URL (:data:`pipelines.data.download.STATUS_SCHEMA`)."""
    shards: list[ShardFile]
    counts: dict[str, int]
    """Final status -> distinct URLs."""
    retried: int
    recovered_by_retry: int
    image_settings: dict[str, Any]
    """The settings that name the folder (size, resize mode, format, quality)."""
    content: str = ""
    """Digest of the outcome (:func:`download_content`): the shard's data version."""

    @property
    def image_extension(self) -> str:
        return self.image_settings["encode_format"]

    def image_bytes(self) -> dict[str, bytes]:
        """Encoded image of every downloaded key (keys are unique within one download)."""
        images: dict[str, bytes] = {}
        for shard in self.shards:
            images.update({key: files[self.image_extension]
                           for key, files in read_tar(shard.path, {self.image_extension}).items()})
        return images


@dataclass
class DownloadedImages:
    """A run of the stage: per partition key its :class:`DownloadedShard`, and the run's totals."""

    shards: dict[str, DownloadedShard]
    error_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def version(self) -> str:
        return fingerprint({k: m.content for k, m in self.shards.items()})

    @property
    def counts(self) -> dict[str, int]:
        return status_counts(self.shards)


def image_settings(config: DownloadConfig) -> dict[str, Any]:
    """The download settings that change the stored images."""
    return {"image_size": config.image_size, "resize_mode": config.resize_mode, "encode_format": config.encode_format,
            "encode_quality": config.encode_quality}


def download_content(status_path: str | Path, settings: dict[str, Any]) -> str:
    """Digest of a download's outcome: each URL's key, status and image sha256 in order, and the image settings (not
    URLs, errors or paths, which name the server and the machine rather than the data)."""
    rows = pq.read_table(status_path, columns=["key", "status", "sha256"]).to_pylist()
    return fingerprint(settings, [(r["key"], r["status"], r["sha256"]) for r in rows])


def download_shards(raw: Mapping[str, RawShard], source: ImageSource, config: DownloadConfig, layout: DataLayout,
                    log: Callable[[str], None] = logger.info) -> DownloadedImages:
    """Fetch the image URLs of every raw shard in ``raw`` (partition key -> its documents) from ``source`` into
    ``images/<source>/<shard>.<settings>/`` (img2dataset: exact URL dedup, host policy, retry pass) and write
    each shard's documents with their images' outcomes. Re-running a finished shard fetches nothing."""
    settings = image_settings(config)
    variant = fingerprint(settings)[:8]
    result = DownloadedImages({})
    start = time.perf_counter()
    for key, shard in raw.items():
        out = layout.partition_path("images", key, f".{variant}")
        done = source.download(read_documents(shard.path), out, config)
        result.shards[key] = DownloadedShard(
            output_dir=str(out), documents=str(out / "documents.parquet"), status=str(done.status_path),
            shards=[ShardFile(str(p), p.stat().st_size) for p in done.shards], counts=done.counts,
            retried=done.retried, recovered_by_retry=done.recovered_by_retry, image_settings=settings,
            content=download_content(done.status_path, settings))
        for error, n in done.error_counts.items():
            result.error_counts[error] = result.error_counts.get(error, 0) + n
        log(f"{key}: {done.counts}")
    result.seconds = time.perf_counter() - start
    return result


def status_counts(shards: Mapping[str, DownloadedShard]) -> dict[str, int]:
    """Final status -> distinct URLs, over all the shards."""
    counts: dict[str, int] = {}
    for shard in shards.values():
        for status, n in shard.counts.items():
            counts[status] = counts.get(status, 0) + n
    return counts


def success_rate(shards: Mapping[str, DownloadedShard]) -> float:
    """Share of the shards' distinct URLs downloaded."""
    counts = status_counts(shards)
    return counts.get(IMAGE_STATUS_OK, 0) / max(1, sum(counts.values()))


def shard_problems(shards: Mapping[str, DownloadedShard]) -> tuple[int, list[str]]:
    """``(tars read, problems)``: every tar must read to the end, have the size its manifest says and hold exactly
    the keys its status rows mark ok, each once."""
    problems, checked = [], 0
    for key, manifest in shards.items():
        status = pq.read_table(manifest.status).to_pylist()
        for shard in manifest.shards:
            path = Path(shard.path)
            expected = {r["key"] for r in status if r["status"] == IMAGE_STATUS_OK and r["shard"] == path.stem}
            try:
                found = tar_keys(path)
            except (OSError, tarfile.TarError) as err:
                problems.append(f"{key} {path.name}: unreadable ({err})")
                continue
            checked += 1
            if path.stat().st_size != shard.bytes:
                problems.append(f"{key} {path.name}: {path.stat().st_size} bytes, manifest says {shard.bytes}")
            if set(found) != expected or len(found) != len(set(found)):
                problems.append(f"{key} {path.name}: {len(found)} samples in the tar, {len(expected)} ok in the status")
    return checked, problems


def preview(shards: Mapping[str, DownloadedShard], limit: int = 4) -> list[tuple[bytes, str]]:
    """The first ``limit`` downloaded images with their document's first text; unreadable tars are skipped (the
    integrity check reports them)."""
    wanted: dict[str, str] = {}
    for manifest in shards.values():
        for document in read_documents(manifest.documents):
            texts = [e["text"] for e in document["elements"] if e["type"] == "text"]
            for element in document["elements"]:
                if element["type"] == "image" and element["status"] == IMAGE_STATUS_OK and len(wanted) < limit:
                    wanted[element["key"]] = f"{document['doc_id']}: {texts[0] if texts else ''}"
            if len(wanted) >= limit:
                break
        if len(wanted) >= limit:
            break
    found: dict[str, bytes] = {}
    for manifest in shards.values():
        for shard in manifest.shards:
            try:
                samples = read_tar(shard.path, {manifest.image_extension})
            except (OSError, tarfile.TarError) as err:
                logger.warning("preview skips unreadable shard %s: %s", shard.path, err)
                continue
            found.update({k: v[manifest.image_extension] for k, v in samples.items() if k in wanted})
    return [(found[k], text) for k, text in wanted.items() if k in found]
