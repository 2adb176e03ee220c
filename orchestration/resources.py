"""Resources: where data lives, where images come from, and which tokenizer the packer uses.

Each resource has the real implementation and the sample world's small one, both real code:

- :class:`Storage`: the storage root (large data is written there by the stages themselves, atomically)
  and the watched folder of raw metadata shards.
- :class:`SampleWorld`: the embedded sample world's size and seed.
- Image sources, used by the download asset: :class:`WebImages` fetches the URLs as written (public
  hosts only), :class:`SampleWorldImages` serves the sample world over loopback HTTP with
  configurable faults and fetches from there.
- CLIP scorers, used by the ``clip_scorer`` and ``clip_scores`` assets: :class:`SampleWorldClipScorer`
  trains the tiny open_clip scorer on the world's clean pairs, :class:`PretrainedClipScorer` loads an
  open_clip model (ViT-L/14 in the paper) from a local checkpoint.
- Tokenizer sources: :class:`SampleWorldTokenizer` trains the tiny BPE on the world's texts,
  :class:`PretrainedTokenizer` loads an LLM's tokenizer from a local directory.
- Captioners, used by the ``captioner`` and ``recaptions`` assets: :class:`SampleWorldCaptioner` trains
  the tiny BLIP-2 on the clean pairs of a world of another seed, :class:`PretrainedCaptioner` loads a
  BLIP-2 directory (OPT-2.7B in the paper) from local disk.
"""

import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import dagster as dg
import pyarrow.parquet as pq
import torch
from pydantic import Field

from pipelines.clip_score import ClipScorer, ScorerTraining, evaluate_scorer, train_world_scorer
from pipelines.download import DownloadConfig, DownloadResult, download_documents
from pipelines.hosts import HostPolicy
from pipelines.image_server import FaultConfig, ImageServer
from pipelines.recaption import (
    Captioner, CaptionerTraining, captioner_training_world, evaluate_recaptioning, model_digest, train_world_captioner,
)
from pipelines.sample_world import WorldConfig, generate_world
from pipelines.sample_world.world import SampleWorld as World
from pipelines.tokenizer import TINY_BOI_TOKEN, TINY_IMAGE_TOKEN, load_tokenizer, train_tokenizer, world_texts
from pipelines.torch_threads import cpu_threads

SOURCE_SUFFIXES = {"mmc4": (".jsonl", ".jsonl.zip"), "laion": (".parquet",), "cc12m": (".tsv",)}
"""Sub-folders of the watched raw folder and the file names a reader exists for."""

SAMPLE_WORLD_BASE_URL = "http://sample-world.invalid"
"""The host written into the sample world's metadata; the image source maps it to its live server."""


class Storage(dg.ConfigurableResource):
    """The storage root and the watched folder of raw metadata shards.

    ``root`` is a local path or a ``file://`` URL. The stages in ``pipelines/`` write local files
    (img2dataset, parquet and tar writers with atomic renames), so an object store is mounted as a
    path (fsspec's FUSE, s3fs, gcsfuse) rather than named by URL here.
    """

    root: str = Field(default="data", description="Storage root for every stage's output.")
    raw_dir: str = Field(
        default="", description="Watched folder of raw metadata shards (<source>/<file>); default <root>/raw."
    )

    def _local(self, value: str) -> Path:
        if value.startswith("file://"):
            value = value[len("file://"):]
        elif "://" in value:
            raise ValueError(
                f"storage path {value!r}: only local paths and file:// URLs are written by the stages; "
                "mount object storage as a path"
            )
        return Path(value).expanduser().absolute()

    @property
    def root_path(self) -> Path:
        return self._local(self.root)

    @property
    def raw_path(self) -> Path:
        return self._local(self.raw_dir) if self.raw_dir else self.root_path / "raw"

    def path(self, *parts: str) -> Path:
        """A path under the root (parent folders created)."""
        path = self.root_path.joinpath(*parts)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def partition_path(self, stage: str, partition_key: str, suffix: str = "") -> Path:
        """``<root>/<stage>/<source>/<file name with dots as underscores><suffix>`` (parents created)."""
        source, name = self.raw_file(partition_key).relative_to(self.raw_path).parts
        return self.path(stage, source, name.replace(".", "_") + suffix)

    def raw_file(self, partition_key: str) -> Path:
        """The raw metadata shard of a ``<source>/<file>`` partition key."""
        source, _, name = partition_key.partition("/")
        if source not in SOURCE_SUFFIXES or not name or "/" in name:
            raise ValueError(f"partition key {partition_key!r} is not <source>/<file> with source in {list(SOURCE_SUFFIXES)}")
        return self.raw_path / source / name

    def raw_partition_keys(self) -> list[str]:
        """``<source>/<file>`` of every raw shard in the watched folder (sorted; temporary files skipped)."""
        keys = []
        for source, suffixes in SOURCE_SUFFIXES.items():
            folder = self.raw_path / source
            if folder.is_dir():
                keys += [f"{source}/{p.name}" for p in folder.iterdir() if p.is_file() and p.name.endswith(suffixes)]
        return sorted(keys)


class SampleWorld(dg.ConfigurableResource):
    """Seed and size of the embedded sample world (see ``pipelines.sample_world``)."""

    seed: int = 0
    image_size: int = 64
    n_pairs: int = 48
    n_stories: int = 24
    mismatch_rate: float = 0.1
    alt_text_rate: float = 0.7
    n_eval: int = 8
    docs_per_shard: int = Field(default=12, description="MMC4 documents per jsonl.zip shard.")
    rows_per_shard: int = Field(default=100, description="Pairs per LAION parquet / CC-12M tsv shard.")

    def config(self) -> WorldConfig:
        return WorldConfig(seed=self.seed, image_size=self.image_size, n_pairs=self.n_pairs, n_stories=self.n_stories,
                           mismatch_rate=self.mismatch_rate, alt_text_rate=self.alt_text_rate, n_eval=self.n_eval)

    def generate(self) -> World:
        return generate_world(self.config())


class WebImages(dg.ConfigurableResource):
    """Fetch image URLs as written in the metadata; only public hosts (plus ``allowed_hosts``)."""

    allowed_hosts: list[str] = Field(default_factory=list, description="host or host:port allowed even when private.")

    def download(self, documents: Iterable[dict[str, Any]], out_dir: Path, config: DownloadConfig) -> DownloadResult:
        policy = HostPolicy(allowed_hosts=frozenset(self.allowed_hosts))
        return download_documents(documents, out_dir, config, policy)


class SampleWorldImages(dg.ConfigurableResource):
    """The sample world's images over loopback HTTP, with the web's faults.

    With ``server_url`` empty a server is started for the duration of the download; with it set,
    an already running server (which must serve this world's routes) is used. The metadata names
    :data:`SAMPLE_WORLD_BASE_URL`; documents are pointed at the live server just before download,
    so the downloaded documents carry the URLs actually fetched.
    """

    world: SampleWorld
    server_url: str = Field(default="", description="Use this running server instead of starting one.")
    not_found: float = 0.04
    server_error: float = 0.04
    timeout: float = 0.0
    truncated: float = 0.02
    not_image: float = 0.02
    transient: float = 0.5
    fault_seed: int = 0

    def faults(self) -> FaultConfig:
        return FaultConfig(not_found=self.not_found, server_error=self.server_error, timeout=self.timeout,
                           truncated=self.truncated, not_image=self.not_image, transient=self.transient,
                           seed=self.fault_seed)

    @contextmanager
    def serving(self) -> Iterator[str]:
        """The live server's base URL for the duration of the block."""
        if self.server_url:
            yield self.server_url.rstrip("/")
            return
        with ImageServer(self.world.generate().routes(), self.faults()) as server:
            yield server.base_url

    def download(self, documents: Iterable[dict[str, Any]], out_dir: Path, config: DownloadConfig) -> DownloadResult:
        with self.serving() as base_url:
            _forget_other_server(out_dir, base_url)
            live = (_rebase(document, SAMPLE_WORLD_BASE_URL, base_url) for document in documents)
            return download_documents(live, out_dir, config, HostPolicy.allowing(base_url))


def _forget_other_server(out_dir: Path, base_url: str) -> None:
    """A download folder filled from an earlier server (another port) cannot be resumed: its URLs are
    not this server's. Start it again, and say so."""
    url_list = out_dir / "urls.parquet"
    if not url_list.exists():
        return
    urls = pq.read_table(url_list, columns=["url"]).column("url").to_pylist()
    if urls and not urls[0].startswith(base_url + "/"):
        dg.get_dagster_logger().warning(
            f"{out_dir} was downloaded from another sample-world server ({urls[0].split('/images/')[0]}); "
            f"downloading again from {base_url}")
        shutil.rmtree(out_dir)


def _rebase(document: dict[str, Any], old: str, new: str) -> dict[str, Any]:
    elements = [
        {**e, "url": new + e["url"][len(old):]} if e["type"] == "image" and (e["url"] or "").startswith(old) else e
        for e in document["elements"]
    ]
    return {**document, "elements": elements}


class SampleWorldTokenizer(dg.ConfigurableResource):
    """The tiny preset's tokenizer: a byte-level BPE trained on the sample world's texts."""

    world: SampleWorld
    vocab_size: int = 510
    boi_token: str = TINY_BOI_TOKEN
    image_token: str = TINY_IMAGE_TOKEN

    def build(self):
        return train_tokenizer(world_texts(self.world.generate()), vocab_size=self.vocab_size,
                               boi_token=self.boi_token, image_token=self.image_token)

    def describe(self) -> dict[str, Any]:
        return {"kind": "sample_world_bpe", "vocab_size": self.vocab_size, "world_seed": self.world.seed,
                "boi_token": self.boi_token, "image_token": self.image_token}


class PretrainedTokenizer(dg.ConfigurableResource):
    """An LLM's tokenizer from a local directory (no hub access), with the model's image tokens added."""

    path: str
    boi_token: str = TINY_BOI_TOKEN
    image_token: str = TINY_IMAGE_TOKEN

    def build(self):
        if not os.path.isdir(self.path):
            raise FileNotFoundError(f"tokenizer directory {self.path!r} does not exist")
        return load_tokenizer(self.path, boi_token=self.boi_token, image_token=self.image_token)

    def describe(self) -> dict[str, Any]:
        return {"kind": "pretrained", "path": self.path, "boi_token": self.boi_token, "image_token": self.image_token}


class QualityBounds(dg.ConfigurableResource):
    """Bounds the asset checks hold the data to."""

    min_parse_rate: float = Field(default=0.9, description="Raw records that parse, per run.")
    min_download_success_rate: float = Field(default=0.5, description="Image URLs downloaded.")
    min_filter_pass_rate: float = Field(default=0.05, description="Documents kept by filtering.")
    max_filter_pass_rate: float = Field(default=1.0, description="Documents kept by filtering.")
    max_sequence_tokens: int = Field(default=2048, description="Tokens in any packed sequence.")


class SampleWorldClipScorer(dg.ConfigurableResource):
    """The sample world's scorer: a tiny open_clip model trained on the world's clean pairs, its
    threshold calibrated on held-out clean pairs, evaluated (ROC-AUC) on a world of another seed."""

    world: SampleWorld
    steps: int = 300
    """Training steps (~0.2 s each on one CPU core)."""
    batch_size: int = 96
    image_size: int = 48
    """Scorer input size in pixels (the world's images are resized to it)."""
    training_pairs: int = 400
    training_stories: int = 400
    """Size of the scorer's own training world (another seed than the world it filters, as CLIP is
    trained on other data than it scores); a few hundred stories are what lets it reject mismatched
    story images while keeping >= 90% of true ones."""
    seed: int = 0
    device: str = "cpu"
    torch_threads: int = Field(default=0, description=(
        "CPU threads while training; 0 keeps torch's setting (all cores: right for the in-process demo, "
        "~1.25x faster than 1 on 2 cores). Set 1 when several steps share a small machine: the tiny model "
        "is several times slower when threads oversubscribe it."))

    def build(self, out_dir: Path) -> dict[str, Any]:
        training = ScorerTraining(steps=self.steps, batch_size=self.batch_size, seed=self.seed,
                                  image_size=self.image_size)
        training_world = generate_world(replace(self.world.config(), seed=self.world.seed + 1000,
                                                n_pairs=self.training_pairs, n_stories=self.training_stories))
        with cpu_threads(self.torch_threads):
            scorer, report = train_world_scorer(training_world, out_dir, training)
        held_out = generate_world(replace(self.world.config(), seed=self.world.seed + 1))
        return {"kind": "sample_world_tiny_clip", "directory": str(out_dir), "threshold": scorer.threshold,
                "training": report, "evaluation": evaluate_scorer(scorer, held_out)}

    def load(self, manifest: dict[str, Any]) -> ClipScorer:
        return ClipScorer.load(manifest["directory"], device=self.device)


class PretrainedClipScorer(dg.ConfigurableResource):
    """An open_clip model by name with weights from a local file (never downloaded)."""

    model_name: str = "ViT-L-14"
    checkpoint: str
    device: str = "cpu"
    batch_size: int = 64

    def build(self, out_dir: Path) -> dict[str, Any]:
        checkpoint = Path(self.checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"CLIP checkpoint {checkpoint} not found (weft never downloads weights)")
        stat = checkpoint.stat()
        return {"kind": "pretrained", "model_name": self.model_name, "checkpoint": str(checkpoint),
                "checkpoint_bytes": stat.st_size, "checkpoint_mtime": stat.st_mtime, "threshold": None}

    def load(self, manifest: dict[str, Any]) -> ClipScorer:
        return ClipScorer.from_pretrained(manifest["model_name"], manifest["checkpoint"], device=self.device,
                                          batch_size=self.batch_size)


class SampleWorldCaptioner(dg.ConfigurableResource):
    """The sample world's captioner: a tiny BLIP-2 trained on a world of another seed whose pairs all
    carry their true caption, evaluated on the noisy alt-text pairs of the world it recaptions."""

    world: SampleWorld
    steps: int = CaptionerTraining.steps
    train_batch_size: int = CaptionerTraining.batch_size
    lr: float = CaptionerTraining.lr
    image_size: int = Field(default=CaptionerTraining.image_size, description="Model input size in pixels.")
    training_pairs: int = 12_000
    """Pairs of the captioner's own training world (another seed than the world it recaptions, no alt-texts,
    no mismatches). Fresh scenes, not more steps, are what make it generalise: on ~2k pairs the tiny model
    memorises its training images and recaptions new ones no better than chance."""
    seed: int = 0
    device: str = "cpu"
    batch_size: int = Field(default=32, description="Images per generate call when captioning.")
    max_new_tokens: int = 64
    torch_threads: int = Field(default=0, description=(
        "CPU threads while training and evaluating (see SampleWorldClipScorer); 0 keeps torch's setting."))

    def build(self, out_dir: Path) -> dict[str, Any]:
        training = CaptionerTraining(steps=self.steps, batch_size=self.train_batch_size, lr=self.lr,
                                     image_size=self.image_size, seed=self.seed)
        training_world = captioner_training_world(replace(self.world.config(), seed=self.world.seed + 2000),
                                                  self.training_pairs)
        with cpu_threads(self.torch_threads):
            _, report = train_world_captioner(training_world, out_dir, training)
            manifest = {"kind": "sample_world_tiny_blip2", "directory": str(out_dir), "version": model_digest(out_dir),
                        "training": report}
            manifest["evaluation"] = evaluate_recaptioning(self.load(manifest), self.world.generate())
        return manifest

    def load(self, manifest: dict[str, Any]) -> Captioner:
        return Captioner.from_pretrained(manifest["directory"], device=self.device, batch_size=self.batch_size,
                                         max_new_tokens=self.max_new_tokens)


class PretrainedCaptioner(dg.ConfigurableResource):
    """A BLIP-2 directory (``save_pretrained`` layout: processor + model) on local disk, never downloaded."""

    path: str
    device: str = "cpu"
    dtype: str = Field(default="float32", description="torch dtype name, e.g. float16 on a GPU.")
    batch_size: int = 32
    max_new_tokens: int = 30

    def build(self, out_dir: Path) -> dict[str, Any]:
        """The directory as it is: its files' sizes and modification times identify the version (hashing
        the ~15 GB of BLIP-2 OPT-2.7B on every run would cost minutes). ``out_dir`` is not written."""
        directory = Path(self.path)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"BLIP-2 directory {directory} has no config.json (weft never downloads weights)")
        files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(directory.iterdir()) if p.is_file()}
        version = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
        return {"kind": "pretrained", "directory": str(directory), "version": version, "files": files}

    def load(self, manifest: dict[str, Any]) -> Captioner:
        return Captioner.from_pretrained(manifest["directory"], device=self.device, dtype=getattr(torch, self.dtype),
                                         batch_size=self.batch_size, max_new_tokens=self.max_new_tokens)
