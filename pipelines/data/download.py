"""Image download: img2dataset with webdataset output, plus what it lacks.

img2dataset does the fetching, resizing and shard writing. Around it this stage adds:

- exact URL dedup (each distinct URL is fetched once, however many documents use it);
- a host policy (:class:`pipelines.data.hosts.HostPolicy`) applied to every URL before anything is fetched, and
  in the workers to every redirect hop and to the address each connection goes to; a cap on the body bytes of a
  response and on the pixels of an image, checked before the whole body is read or the image decoded
  (:mod:`pipelines.data.fetch_guard`);
- a retry pass that re-fetches only the retryable failures of *finished* shards and merges the
  recovered images into those shards under their original keys;
- a status table with one final row per URL, joined back onto documents so every image element
  carries ``status`` (``ok`` or the reason), ``error``, ``key`` and ``sha256`` (the dedup stage,
  :mod:`pipelines.data.deduplicated_documents`, drops repeated URLs and images across shards).

Output layout of :func:`download_urls` under ``output_dir``::

    urls.parquet        the allowed, distinct URLs in first-seen order (url, url_id); img2dataset's input
    shards/NNNNN.tar    img2dataset webdataset shards: KEY.jpg, KEY.txt? , KEY.json
    shards/NNNNN.parquet    one row per URL of the shard (status, error_message, sha256, ...)
    shards/NNNNN_stats.json img2dataset's marker that the shard is finished (incremental mode)
    status.parquet      one row per distinct URL, refused ones included (see STATUS_SCHEMA)
    retries.json        how many retry passes each url_id went through

Keys are img2dataset's (shard id and row, zero padded) and stay the same on a re-run of the same
input, also for images recovered by the retry pass.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import signal
import tarfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Iterator, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from annotated_types import Ge, Gt, Interval

from pipelines.data.documents import IMAGE_STATUS_OK, image_elements, write_documents
from pipelines.data.fetch_guard import FetchGuard, refusal_reason
from pipelines.data.hosts import HostPolicy
from pipelines.fields import check_fields
from pipelines.files import atomic_path, read_tar, write_json

STATUS_SCHEMA = pa.schema([
    pa.field("url", pa.string(), nullable=False),
    pa.field("url_id", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),  # ok | refused | failed_to_download | failed_to_resize
    # error: the reason (refused: the host policy's, or the body / pixel bound that was over)
    pa.field("error", pa.string()),
    pa.field("key", pa.string()),
    pa.field("shard", pa.string()),
    pa.field("sha256", pa.string()),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("original_width", pa.int32()),
    pa.field("original_height", pa.int32()),
    pa.field("retries", pa.int32()),
])

_HTTP_CODE = re.compile(r"HTTP Error (\d{3})")
PERMANENT_HTTP_CODES = frozenset({400, 401, 403, 404, 405, 410, 414, 451})


def is_retryable(status: str, error: str | None) -> bool:
    """Default retry rule: download failures except permanent HTTP answers (404, 403, 410, ...).

    Timeouts, 5xx, resets and truncated bodies are retried; images that arrived but could not be
    decoded or resized (``failed_to_resize``) are not: the server sent what it has. Neither are refusals
    (a host the policy refuses, a body or an image over its bound): they would be refused again.
    """
    if status != "failed_to_download" or refusal_reason(error) is not None:
        return False
    match = _HTTP_CODE.search(error or "")
    return not (match and int(match.group(1)) in PERMANENT_HTTP_CODES)


@dataclass(frozen=True)
class DownloadConfig:
    """img2dataset's knobs (same names) and weft's retry pass."""

    image_size: Annotated[int, Ge(1)] = 256
    resize_mode: Literal["no", "border", "keep_ratio", "keep_ratio_largest", "center_crop"] = "border"
    encode_format: Literal["jpg", "png", "webp"] = "jpg"
    encode_quality: Annotated[int, Interval(ge=0, le=100)] = 95
    processes_count: Annotated[int, Ge(1)] = 1
    thread_count: Annotated[int, Ge(1)] = 32
    number_sample_per_shard: Annotated[int, Ge(1)] = 10_000
    timeout: Annotated[float, Gt(0)] = 10
    retries: Annotated[int, Ge(0)] = 0
    """img2dataset's immediate per-URL retries (inside a shard)."""
    min_image_size: Annotated[int, Ge(0)] = 0
    max_image_area: Annotated[int, Ge(1)] = 25_000_000
    """Pixels (width x height) an image may have; larger ones are refused from their header, before decoding
    (25 MP: a 5000 x 5000 photo; decoded RGB ~75 MB per worker)."""
    max_body_bytes: Annotated[int, Ge(1)] = 16 * 2**20
    """Bytes a response body may have; a longer one is refused while streaming (a larger Content-Length before)."""
    max_aspect_ratio: Annotated[float, Gt(0)] = float("inf")
    distributor: Literal["multiprocessing", "pyspark", "ray"] = "multiprocessing"
    incremental_mode: Literal["incremental", "overwrite", "extend"] = "incremental"
    retry_passes: Annotated[int, Ge(0)] = 1
    """Passes over the failed URLs of finished shards (0 disables)."""
    retryable: Callable[[str, str | None], bool] = is_retryable
    disallowed_header_directives: tuple[str, ...] | None = None
    """None keeps img2dataset's default (noai, noimageai, noindex, noimageindex)."""

    def __post_init__(self) -> None:
        check_fields(self)  # types, choices and ranges, from the annotations: before anything is fetched or made

    def img2dataset_kwargs(self) -> dict[str, Any]:
        kwargs = {
            "image_size": self.image_size, "resize_mode": self.resize_mode, "encode_format": self.encode_format,
            "encode_quality": self.encode_quality, "processes_count": self.processes_count,
            "thread_count": self.thread_count, "number_sample_per_shard": self.number_sample_per_shard,
            "timeout": self.timeout, "retries": self.retries, "min_image_size": self.min_image_size,
            "max_image_area": self.max_image_area, "max_aspect_ratio": self.max_aspect_ratio,
            "distributor": self.distributor,
        }
        if self.disallowed_header_directives is not None:
            kwargs["disallowed_header_directives"] = list(self.disallowed_header_directives)
        return kwargs


@dataclass
class DownloadResult:
    output_dir: Path
    status_path: Path
    shards: list[Path]
    counts: dict[str, int]
    """Final status → number of distinct URLs (``ok``, ``refused``, ``failed_to_download``, ...)."""
    recovered_by_retry: int = 0
    retried: int = 0
    error_counts: dict[str, int] = field(default_factory=dict)

    def status_table(self) -> pa.Table:
        return pq.read_table(self.status_path)


def url_id(url: str) -> str:
    return hashlib.sha1(url.encode()).hexdigest()[:20]


def distinct_urls(documents: Iterable[dict[str, Any]]) -> list[str]:
    """Image URLs of all documents, each once, in first-seen order (exact URL dedup)."""
    seen: dict[str, None] = {}
    for document in documents:
        for element in image_elements(document):
            seen.setdefault(element["url"], None)
    return list(seen)


def run_img2dataset(url_list: Path, output_folder: Path, config: DownloadConfig, policy: HostPolicy, *,
                    incremental_mode: str) -> None:
    """Call ``img2dataset.download`` on a parquet url list (columns url, url_id), webdataset output, its workers
    fetching under ``policy`` and the config's body and pixel bounds."""
    from pipelines.data.img2dataset_guard import guarded_img2dataset  # first: it keeps albumentations offline

    from img2dataset import download

    guard = FetchGuard(policy, config.max_body_bytes, config.max_image_area)
    with _terminable_workers(), guarded_img2dataset(guard):
        download(
            url_list=str(url_list), output_folder=str(output_folder), output_format="webdataset",
            input_format="parquet", url_col="url", save_additional_columns=["url_id"], compute_hash="sha256",
            enable_wandb=False, incremental_mode=incremental_mode, **config.img2dataset_kwargs(),
        )


@contextmanager
def _terminable_workers() -> Iterator[None]:
    """Start img2dataset's pool workers with SIGTERM at its default action.

    img2dataset ends its pool with ``Pool.terminate`` (SIGTERM to every worker). A process that ignores
    SIGTERM (inherited from whatever launched it: nohup, some CI runners and job shells) passes the ignore on to
    its workers; a worker then left blocked on the pool's queue lock survives the terminate and the join waits
    forever (seen in ``test_download`` on 2026-11-29). Signal dispositions can only change on the main thread."""
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_IGN or threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _write_url_list(urls: list[str], path: Path) -> None:
    _write_parquet(pa.table({"url": urls, "url_id": [url_id(u) for u in urls]}), path)


def _shard_parquets(shards_dir: Path) -> list[Path]:
    return sorted(p for p in shards_dir.glob("*.parquet") if p.stem.isdigit())


def download_urls(
    urls: Iterable[str],
    output_dir: str | os.PathLike,
    config: DownloadConfig = DownloadConfig(),
    host_policy: HostPolicy = HostPolicy(),
) -> DownloadResult:
    """Fetch distinct ``urls`` into webdataset shards under ``output_dir`` (layout: module doc)."""
    output_dir = Path(output_dir)
    shards_dir = output_dir / "shards"
    output_dir.mkdir(parents=True, exist_ok=True)
    urls = list(dict.fromkeys(urls))
    refused = {u: host_policy.refusal(u) for u in urls}
    allowed = [u for u in urls if refused[u] is None]

    url_list = output_dir / "urls.parquet"
    _write_url_list(allowed, url_list)
    if allowed:
        run_img2dataset(url_list, shards_dir, config, host_policy, incremental_mode=config.incremental_mode)

    retried = recovered = 0
    retry_counts = _load_retries(output_dir)
    for attempt in range(1, config.retry_passes + 1):
        n_retried, n_recovered = retry_pass(output_dir, config, host_policy, attempt, retry_counts)
        retried += n_retried
        recovered += n_recovered
        if n_retried == 0:
            break

    rows = _status_rows(shards_dir, allowed, retry_counts)
    for u in urls:
        if refused[u] is not None:
            rows.append({"url": u, "url_id": url_id(u), "status": "refused", "error": refused[u], "retries": 0})
    order = {u: i for i, u in enumerate(urls)}
    rows.sort(key=lambda r: order[r["url"]])
    table = pa.Table.from_pylist(rows, schema=STATUS_SCHEMA)
    status_path = output_dir / "status.parquet"
    _write_parquet(table, status_path)

    counts: dict[str, int] = {}
    errors: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
        if row["status"] != IMAGE_STATUS_OK:
            errors[row["error"] or ""] = errors.get(row["error"] or "", 0) + 1
    return DownloadResult(output_dir, status_path, sorted(shards_dir.glob("*.tar")), counts, recovered, retried, errors)


def _status_rows(shards_dir: Path, allowed: list[str], retry_counts: dict[str, int]) -> list[dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for path in _shard_parquets(shards_dir):
        for row in pq.read_table(path).to_pylist():
            refused = refusal_reason(row["error_message"])
            found[row["url"]] = {
                "url": row["url"], "url_id": row["url_id"],
                "status": IMAGE_STATUS_OK if row["status"] == "success" else "refused" if refused else row["status"],
                "error": refused or row["error_message"], "key": row["key"], "shard": path.stem,
                "sha256": row.get("sha256"),
                "width": row["width"], "height": row["height"], "original_width": row["original_width"],
                "original_height": row["original_height"], "retries": retry_counts.get(row["url_id"], 0),
            }
    missing = [u for u in allowed if u not in found]
    if missing:
        raise RuntimeError(
            f"{len(missing)} URLs have no row in any finished shard under {shards_dir} (first: {missing[0]}): "
            "img2dataset gave up on a shard (its error is printed above as 'shard N failed with error ...'); "
            "finished shards are kept, so once that cause is fixed a re-run fetches only the rest"
        )
    return [found[u] for u in allowed]


# ------------------------------------------------------------------------------ retry pass


def _load_retries(output_dir: Path) -> dict[str, int]:
    path = output_dir / "retries.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _save_retries(output_dir: Path, counts: dict[str, int]) -> None:
    write_json(output_dir / "retries.json", counts)


def retry_pass(output_dir: Path, config: DownloadConfig, policy: HostPolicy, attempt: int,
               retry_counts: dict[str, int]) -> tuple[int, int]:
    """Re-fetch the retryable failures of finished shards and merge successes into those shards.

    Returns ``(retried, recovered)``. Recovered images keep their original keys.
    """
    shards_dir = output_dir / "shards"
    failed: dict[str, list[dict[str, Any]]] = {}
    for path in _shard_parquets(shards_dir):
        if not (shards_dir / f"{path.stem}_stats.json").exists():
            continue  # unfinished shard: img2dataset's own resume will redo it
        rows = [r for r in pq.read_table(path).to_pylist() if config.retryable(r["status"], r["error_message"])]
        if rows:
            failed[path.stem] = rows
    if not failed:
        return 0, 0
    retry_dir = output_dir / "_retry" / f"pass_{attempt}"
    if retry_dir.exists():
        shutil.rmtree(retry_dir)
    retry_dir.mkdir(parents=True)
    urls = [r["url"] for rows in failed.values() for r in rows]
    _write_url_list(urls, retry_dir / "urls.parquet")
    # A fresh folder each pass ("overwrite" would delete img2dataset's own _tmp folder on a new output).
    run_img2dataset(retry_dir / "urls.parquet", retry_dir / "shards", config, policy, incremental_mode="incremental")

    fetched: dict[str, dict[str, Any]] = {}
    samples: dict[str, dict[str, bytes]] = {}
    for path in _shard_parquets(retry_dir / "shards"):
        for row in pq.read_table(path).to_pylist():
            if row["status"] == "success":
                fetched[row["url_id"]] = row
        samples.update(read_tar(path.with_suffix(".tar")))
    recovered = 0
    for shard, rows in failed.items():
        updates = {r["url_id"]: (r["key"], fetched[r["url_id"]]) for r in rows if r["url_id"] in fetched}
        for r in rows:
            retry_counts[r["url_id"]] = retry_counts.get(r["url_id"], 0) + 1
        if updates:
            _merge_into_shard(shards_dir, shard, updates, samples)
            recovered += len(updates)
    _save_retries(output_dir, retry_counts)
    shutil.rmtree(retry_dir)
    if not any(retry_dir.parent.iterdir()):
        retry_dir.parent.rmdir()
    return len(urls), recovered


def _write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with atomic_path(path) as tmp, tarfile.open(tmp, "w") as tar:
        for key in sorted(samples):
            for extension in sorted(samples[key]):
                data = samples[key][extension]
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                info.mode = 0o444
                tar.addfile(info, io.BytesIO(data))


_RESULT_COLUMNS = ("status", "error_message", "width", "height", "original_width", "original_height", "exif",
                   "sha256")


def _merge_into_shard(shards_dir: Path, shard: str, updates: dict[str, tuple[str, dict[str, Any]]],
                      retry_samples: dict[str, dict[str, bytes]]) -> None:
    """Put recovered samples into shard ``shard`` under their original keys; update its parquet and stats."""
    tar_path = shards_dir / f"{shard}.tar"
    samples = read_tar(tar_path)
    for original_key, row in updates.values():
        sample = dict(retry_samples[row["key"]])
        meta = json.loads(sample["json"])
        meta["key"] = original_key
        sample["json"] = json.dumps(meta, indent=4).encode()
        samples[original_key] = sample
    _write_tar(tar_path, samples)

    parquet_path = shards_dir / f"{shard}.parquet"
    table = pq.read_table(parquet_path)
    rows = table.to_pylist()
    for row in rows:
        if row["url_id"] in updates:
            _, new = updates[row["url_id"]]
            row.update({c: new.get(c) for c in _RESULT_COLUMNS if c in row})
    _write_parquet(pa.Table.from_pylist(rows, schema=table.schema), parquet_path)

    stats_path = shards_dir / f"{shard}_stats.json"
    stats = json.loads(stats_path.read_text())
    stats["successes"] = sum(r["status"] == "success" for r in rows)
    stats["failed_to_download"] = sum(r["status"] == "failed_to_download" for r in rows)
    stats["failed_to_resize"] = sum(r["status"] == "failed_to_resize" for r in rows)
    stats["recovered_by_retry"] = stats.get("recovered_by_retry", 0) + len(updates)
    write_json(stats_path, stats)


# ------------------------------------------------------------------------------ documents


def load_status(status_path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    return {row["url"]: row for row in pq.read_table(status_path).to_pylist()}


def attach_status(documents: Iterable[dict[str, Any]], status: dict[str, dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Give every image element its download outcome (``status``, ``error``, ``key``, ``sha256``)."""
    for document in documents:
        elements = []
        for element in document["elements"]:
            if element["type"] == "image":
                row = status.get(element["url"])
                if row is None:
                    element = {**element, "status": "not_downloaded", "error": "url not in the download's status table"}
                else:
                    element = {**element, "status": row["status"], "error": row["error"], "key": row["key"],
                               "sha256": row["sha256"]}
            elements.append(element)
        yield {**document, "elements": elements}


def download_documents(
    documents: Iterable[dict[str, Any]],
    output_dir: str | os.PathLike,
    config: DownloadConfig = DownloadConfig(),
    host_policy: HostPolicy = HostPolicy(),
) -> DownloadResult:
    """Download the images of ``documents`` and write ``documents.parquet`` with their statuses."""
    documents = list(documents)
    result = download_urls(distinct_urls(documents), output_dir, config, host_policy)
    write_documents(attach_status(documents, load_status(result.status_path)), Path(output_dir) / "documents.parquet")
    return result
