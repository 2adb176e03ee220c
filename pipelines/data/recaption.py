"""BLIP-2 recaptioning.

:class:`Captioner` wraps a ``Blip2Processor`` + ``Blip2ForConditionalGeneration`` loaded from a
local directory (BLIP-2 OPT-2.7B in the paper; never a download): batched, ``no_grad``, greedy
decoding, CPU or GPU. The sample world's tiny captioner (:mod:`pipelines.training.captioner`) is
saved in the same layout and loads the same way.

:func:`recaption_documents` yields one row per downloaded image of the pair documents —
``doc_id``, ``element_index``, ``key``, ``caption`` (the source text) and ``caption_blip2`` — and
:func:`recaptions_mapping` turns those rows into the ``recaptions`` (``doc_id -> caption``) that
:func:`pipelines.data.packing.pack_documents` packs instead of the pairs' source texts. An image
that is missing or cannot be decoded is reported to ``handler`` with its key and skipped.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import (
    Blip2ForConditionalGeneration,
    Blip2Processor,
)

from pipelines.compute import Compute
from pipelines.data.documents import IMAGE_STATUS_OK
from pipelines.data.errors import BadRecord, Handler, warn_and_continue
from pipelines.files import atomic_path, fingerprint, sha256

CAPTION_FIELD = "caption_blip2"
PRETRAINED_KIND = "pretrained"


@dataclass(frozen=True)
class Captioning:
    """How a loaded captioner captions."""

    batch_size: int = 32
    """Images per ``generate`` call."""
    max_new_tokens: int = 64
    """Caption length at most, in tokens."""


class Captioner:
    """Captions images with a BLIP-2 model (eval mode, ``no_grad``, greedy decoding)."""

    def __init__(self, model: Blip2ForConditionalGeneration, processor: Blip2Processor, *,
                 device: str | torch.device = "cpu", batch_size: int = Captioning.batch_size,
                 max_new_tokens: int = Captioning.max_new_tokens) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.processor = processor
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, **kwargs: Any) -> "Captioner":
        """Processor and model from a local directory (``save_pretrained`` layout); no hub access."""
        processor = Blip2Processor.from_pretrained(str(path), local_files_only=True)
        model = Blip2ForConditionalGeneration.from_pretrained(str(path), local_files_only=True, dtype=dtype)
        return cls(model, processor, device=device, **kwargs)

    def save_pretrained(self, out_dir: str | os.PathLike) -> Path:
        """Model + processor, written atomically (:func:`pipelines.files.atomic_path`)."""
        with atomic_path(out_dir) as tmp:
            self.model.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
        return Path(out_dir)

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(B, 3, H, W)`` on the model's device and dtype."""
        pixels = self.processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.model.dtype)

    @torch.no_grad()
    def caption(self, images: Sequence[Image.Image | bytes]) -> list[str]:
        """One caption per image, in order (batches of ``batch_size``)."""
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            batch = [as_rgb_image(x) for x in images[start: start + self.batch_size]]
            tokenizer = self.processor.tokenizer
            out = self.model.generate(pixel_values=self.pixel_values(batch), max_new_tokens=self.max_new_tokens,
                                      do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id)
            # 'out' repeats the prompt (image placeholders + <s>) for decoder-only LMs; both are special tokens
            captions.extend(text.strip() for text in tokenizer.batch_decode(out, skip_special_tokens=True))
        return captions


@dataclass(frozen=True)
class CaptionerManifest:
    """A captioner ready to load: a ``save_pretrained`` folder (the sample world's tiny BLIP-2 or a real one)."""

    kind: str
    """``sample_world_tiny_blip2`` (trained by :mod:`pipelines.training.captioner`) or ``pretrained``."""
    directory: str
    version: str
    """Identifies the weights; names the recaptions the captioner makes."""
    captioning: Captioning = Captioning()
    dtype: str = "float32"
    """torch dtype name the model loads in (e.g. ``float16`` on a GPU)."""
    files: dict[str, list[int]] | None = None
    """A pretrained folder's files: name -> [bytes, mtime_ns]."""
    training: dict[str, Any] | None = None
    """The training report of a trained captioner."""
    evaluation: dict[str, Any] | None = None
    """Caption accuracy before/after recaptioning on held-out alt-text pairs (a trained captioner)."""

    def load(self, compute: Compute = Compute()) -> Captioner:
        return Captioner.from_pretrained(self.directory, device=compute.device, dtype=getattr(torch, self.dtype),
                                         batch_size=self.captioning.batch_size,
                                         max_new_tokens=self.captioning.max_new_tokens)


@dataclass(frozen=True)
class PretrainedBlip2:
    """A BLIP-2 folder (``save_pretrained`` layout: processor + model; OPT-2.7B in the paper) on local disk."""

    path: str
    dtype: str = "float32"
    """torch dtype name, e.g. ``float16`` on a GPU."""
    captioning: Captioning = Captioning(max_new_tokens=30)
    """BLIP-2's captions are short: 30 tokens is room for every one."""

    def describe(self) -> CaptionerManifest:
        """The folder as it is: its files' sizes and modification times identify the version (hashing the ~15 GB
        of BLIP-2 OPT-2.7B on every run would cost minutes). Never downloads."""
        directory = Path(self.path)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"BLIP-2 directory {directory} has no config.json (weft never downloads weights)")
        files = {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(directory.iterdir()) if p.is_file()}
        return CaptionerManifest(kind=PRETRAINED_KIND, directory=str(directory), version=fingerprint(files),
                                 captioning=self.captioning, dtype=self.dtype, files=files)


def model_digest(directory: str | os.PathLike) -> str:
    """sha256 over a saved captioner's weights (``*.safetensors``) and ``tokenizer.json``: its version,
    which names the recaptions it made. A retrained model with identical weights keeps its version;
    ``config.json`` is left out because a load → save round trip rewrites it with the same meaning."""
    root = Path(directory)
    weights, tokenizer = sorted(root.glob("*.safetensors")), root / "tokenizer.json"
    if not weights or not tokenizer.is_file():
        raise FileNotFoundError(f"{root}: need *.safetensors and tokenizer.json (Captioner.save_pretrained layout)")
    return sha256(*weights, tokenizer, root=root)


def as_rgb_image(data: Image.Image | bytes) -> Image.Image:
    image = data if isinstance(data, Image.Image) else Image.open(io.BytesIO(data))
    return image.convert("RGB")


# recaptioning documents --------------------------------------------------------------------------
def recaption_documents(
    documents: Iterable[dict[str, Any]],
    captioner: Captioner,
    images: Mapping[str, bytes],
    *,
    kinds: Sequence[str] = ("pair",),
    handler: Handler = warn_and_continue,
    progress: bool = False,
) -> Iterator[dict[str, Any]]:
    """One row per downloaded image of the documents whose ``kind`` is in ``kinds``: ``doc_id``,
    ``element_index``, ``key``, ``caption`` (the document's own text) and ``caption_blip2``.

    ``images`` maps an element's ``key`` to encoded bytes. An image with a failed status, without
    bytes, or whose bytes do not decode is reported to ``handler`` (``BadRecord(doc_id,
    element_index, reason with the key)``) and skipped. Images are captioned in batches of
    ``captioner.batch_size``, across documents."""
    pending: list[tuple[dict[str, Any], Image.Image]] = []
    for document in tqdm(documents, desc="recaptions", unit="doc", disable=not progress):
        if document["kind"] not in kinds:
            continue
        text = " ".join(e["text"] or "" for e in document["elements"] if e["type"] == "text")
        for index, element in enumerate(document["elements"]):
            if element["type"] != "image":
                continue
            key = element.get("key")
            row = {"doc_id": document["doc_id"], "element_index": index, "key": key, "caption": text}
            if element.get("status") not in (None, IMAGE_STATUS_OK) or key not in images:
                handler(BadRecord(document["doc_id"], index, f"image not available (status={element.get('status')}, key={key})"))
                continue
            try:
                image = as_rgb_image(images[key])
            except Exception as exc:  # PIL raises several types for bad bytes
                handler(BadRecord(document["doc_id"], index, f"undecodable image (key={key}): {type(exc).__name__}: {exc}"))
                continue
            pending.append((row, image))
            if len(pending) >= captioner.batch_size:
                yield from _caption_rows(pending, captioner)
                pending = []
    if pending:
        yield from _caption_rows(pending, captioner)


def _caption_rows(pending: list[tuple[dict[str, Any], Image.Image]], captioner: Captioner) -> Iterator[dict[str, Any]]:
    for (row, _), text in zip(pending, captioner.caption([image for _, image in pending])):
        yield {**row, CAPTION_FIELD: text}


def recaptions_mapping(rows: Iterable[dict[str, Any]]) -> dict[str, str]:
    """``doc_id -> caption_blip2`` (a pair's first image) for ``pack_documents(..., recaptions=...)``."""
    out: dict[str, str] = {}
    for row in rows:
        out.setdefault(row["doc_id"], row[CAPTION_FIELD])
    return out
