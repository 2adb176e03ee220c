"""Pictures a perceptual hash tells apart, and a corpus laid out as the filtering and download stages leave it, for
the dedup and decontamination tests."""

import hashlib
import io
import json
import tarfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.data.documents import IMAGE_STATUS_OK, image_element, make_pair, write_documents
from pipelines.data.downloaded_images import DownloadedShard, ShardFile
from pipelines.data.filtered_documents import FilteredShard


def photo(seed: int, size: int = 128) -> Image.Image:
    """A distinct picture: a random 6x6 colour grid, smoothly upsampled (pHash tells these apart by >= 12 bits)."""
    grid = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    return Image.fromarray(grid).resize((size, size), Image.BICUBIC)


def jpeg(image: Image.Image, quality: int = 95) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


class Corpus:
    """Documents per shard (``<source>/<file>``) as the download left them (each image with its key, ``ok`` status
    and the sha256 of its bytes), and every key's bytes."""

    def __init__(self, keys: list[str]):
        self.documents: dict[str, list[dict]] = {key: [] for key in keys}
        self.images: dict[str, bytes] = {}

    def image(self, key: str, data: bytes, url: str | None = None) -> dict:
        self.images[key] = data
        element = image_element(url or f"https://img.example.org/{key}.jpg", matched_text_index=0)
        element.update(key=key, status=IMAGE_STATUS_OK, sha256=hashlib.sha256(data).hexdigest())
        return element

    def pair(self, shard: str, doc_id: str, key: str, data: bytes, url: str | None = None,
             caption: str | None = None) -> None:
        document = make_pair(doc_id=doc_id, source=shard.split("/")[0], url="x", caption=caption or f"caption of {doc_id}")
        document["elements"][0] = self.image(key, data, url)
        self.documents[shard].append(document)

    def write(self, root: Path) -> tuple[dict[str, FilteredShard], dict[str, DownloadedShard]]:
        """Each shard's documents parquet and image tar under ``root``, and their filtering and download manifests
        (also written where the manifest IO manager keeps them)."""
        filtered, downloads = {}, {}
        for key, documents in self.documents.items():
            folder = root / "upstream" / key.replace("/", "_")
            write_documents(documents, folder / "documents.parquet")
            with tarfile.open(folder / "00000.tar", "w") as tar:
                for document in documents:
                    for e in document["elements"]:
                        if e["type"] == "image":
                            info = tarfile.TarInfo(f"{e['key']}.jpg")
                            info.size = len(self.images[e["key"]])
                            tar.addfile(info, io.BytesIO(self.images[e["key"]]))
            n_images = sum(e["type"] == "image" for d in documents for e in d["elements"])
            filtered[key] = FilteredShard(str(folder / "documents.parquet"), str(folder / "drops.parquet"),
                                          {"min_similarity": 0.24}, len(documents), len(documents), n_images, n_images)
            downloads[key] = DownloadedShard(
                str(folder), str(folder / "documents.parquet"), str(folder / "status.parquet"),
                [ShardFile(str(folder / "00000.tar"), (folder / "00000.tar").stat().st_size)], {"ok": n_images}, 0, 0,
                {"encode_format": "jpg"})
            for asset, manifest in (("filtered_documents", filtered[key]), ("downloaded_images", downloads[key])):
                path = root / "_manifests" / asset / f"{key}.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(asdict(manifest)))
        return filtered, downloads
