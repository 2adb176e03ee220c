"""The sample world's images over loopback HTTP, with the web's faults: the image source of the sample world.

The world's metadata names :data:`METADATA_BASE_URL`; :meth:`SampleWorldImages.download` points the documents at a
live :class:`~pipelines.sample_world.image_server.ImageServer` just before img2dataset fetches them, so the
downloaded documents carry the URLs actually fetched.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipelines.data.download import DownloadConfig, DownloadResult, download_documents
from pipelines.data.hosts import HostPolicy
from pipelines.sample_world.image_server import FaultConfig, ImageServer
from pipelines.sample_world.world import WorldConfig, generate_world

logger = logging.getLogger(__name__)

METADATA_BASE_URL = "http://sample-world.invalid"
"""The host written into the sample world's metadata; :class:`SampleWorldImages` maps it to its live server."""

WEB_FAULTS = FaultConfig(not_found=0.04, server_error=0.04, truncated=0.02, not_image=0.02, transient=0.5)
"""The faults the sample world's server injects by default: a few of each kind, half of them transient."""


@dataclass(frozen=True)
class SampleWorldImages:
    """The world's images served over loopback HTTP with ``faults`` while img2dataset fetches them."""

    world: WorldConfig
    faults: FaultConfig = WEB_FAULTS
    server_url: str = ""
    """An already running server of this world's routes to use; empty: one is started for each download."""

    @contextmanager
    def serving(self) -> Iterator[str]:
        """The live server's base URL for the duration of the block."""
        if self.server_url:
            yield self.server_url.rstrip("/")
            return
        with ImageServer(generate_world(self.world).routes(), self.faults) as server:
            yield server.base_url

    def download(self, documents: Iterable[dict[str, Any]], out_dir: Path, config: DownloadConfig) -> DownloadResult:
        with self.serving() as base_url:
            forget_other_server(out_dir, base_url)
            live = (_rebase(document, METADATA_BASE_URL, base_url) for document in documents)
            return download_documents(live, out_dir, config, HostPolicy.allowing(base_url))


def forget_other_server(out_dir: Path, base_url: str) -> None:
    """A download folder filled from an earlier server (another port) cannot be resumed: its URLs are
    not this server's. Start it again, and say so."""
    url_list = out_dir / "urls.parquet"
    if not url_list.exists():
        return
    urls = pq.read_table(url_list, columns=["url"]).column("url").to_pylist()
    if urls and not urls[0].startswith(base_url + "/"):
        logger.warning("%s was downloaded from another sample-world server (%s); downloading again from %s",
                       out_dir, urls[0].split("/images/")[0], base_url)
        shutil.rmtree(out_dir)


def _rebase(document: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    elements = [
        {**e, "url": new + e["url"][len(old):]} if e["type"] == "image" and (e["url"] or "").startswith(old) else e
        for e in document["elements"]
    ]
    return {**document, "elements": elements}
