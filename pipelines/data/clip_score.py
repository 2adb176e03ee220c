"""CLIP scoring with open_clip.

:class:`ClipScorer` wraps an open_clip ``CLIP`` (image and text towers, batched, ``no_grad``, CPU or
GPU). It is built from a model name + local checkpoint (ViT-L/14 in the paper; never a download)
or loaded from a directory written by :meth:`ClipScorer.save` (the sample world's tiny scorer,
:mod:`pipelines.training.clip_scorer`).

:func:`score_documents` gives, per downloaded image element, the similarity to its matched
sentence (MMC4) or caption (pairs), for interleaved documents the full image × sentence row, and for
recaptioned pairs the similarity to the recaption too; :func:`scores_mapping` turns those rows into
the ``scores`` that :func:`pipelines.data.filtering.filter_documents` takes (a recaptioned pair judged by its
recaption, the text it will be trained on, if asked).
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pipelines.compute import Compute
from pipelines.data.documents import IMAGE_STATUS_OK
from pipelines.files import atomic_path, fingerprint, sha256

SCORER_CONFIG = "weft_scorer.json"
SCORER_WEIGHTS = "open_clip_model.safetensors"
WORLD_SCORER_KIND = "sample_world_tiny_clip"
PRETRAINED_KIND = "pretrained"


class ClipScorer:
    """Cosine similarities from an open_clip model (eval mode, no_grad)."""

    def __init__(self, model: open_clip.CLIP, model_config: dict[str, Any] | str, *, device: str | torch.device = "cpu",
                 threshold: float | None = None, batch_size: int = 64) -> None:
        self.model = model.to(device).eval()
        self.model_config = model_config
        self.device = torch.device(device)
        self.threshold = threshold
        self.batch_size = batch_size
        visual = model.visual
        size = visual.image_size if isinstance(visual.image_size, int) else visual.image_size[0]
        self.image_size = int(size)
        self.tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
        self._mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(3, 1, 1)
        self._std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(3, 1, 1)

    # construction ------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any], **kwargs: Any) -> "ClipScorer":
        """A randomly initialised model from an open_clip config dict (to be trained)."""
        model = open_clip.CLIP(**{k: v for k, v in config.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")})
        return cls(model, config, **kwargs)

    @classmethod
    def from_pretrained(cls, model_name: str, checkpoint: str | os.PathLike, **kwargs: Any) -> "ClipScorer":
        """An open_clip model by name (e.g. ``ViT-L-14``) with weights from a local file."""
        if not Path(checkpoint).exists():
            raise FileNotFoundError(f"CLIP checkpoint {checkpoint} not found (weft never downloads weights)")
        model, _, _ = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
        return cls(model, model_name, **kwargs)

    @classmethod
    def load(cls, directory: str | os.PathLike, **kwargs: Any) -> "ClipScorer":
        """A scorer saved by :meth:`save` (config dict + safetensors + threshold)."""
        directory = Path(directory)
        meta = json.loads((directory / SCORER_CONFIG).read_text())
        scorer = cls.from_config(meta["model_config"], threshold=meta.get("threshold"), **kwargs)
        scorer.model.load_state_dict(load_file(directory / SCORER_WEIGHTS))
        scorer.model.eval()
        return scorer

    def save(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        if not isinstance(self.model_config, dict):
            raise ValueError("only scorers built from a config dict can be saved this way")
        with atomic_path(directory) as tmp:
            tmp.mkdir()
            save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, tmp / SCORER_WEIGHTS)
            (tmp / SCORER_CONFIG).write_text(json.dumps(
                {"model_config": self.model_config, "threshold": self.threshold, **(extra or {})}, indent=1))
        return Path(directory)

    # encoding ----------------------------------------------------------------------------------
    def image_tensor(self, image: Image.Image | bytes) -> torch.Tensor:
        if isinstance(image, (bytes, bytearray)):
            image = Image.open(io.BytesIO(image))
        image = image.convert("RGB").resize((self.image_size, self.image_size), Image.BICUBIC)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        return (pixels - self._mean) / self._std

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image | bytes]) -> torch.Tensor:
        """``(n, embed_dim)`` L2-normalised image features."""
        out = [self.model.encode_image(torch.stack([self.image_tensor(i) for i in images[s: s + self.batch_size]]).to(self.device), normalize=True)
               for s in range(0, len(images), self.batch_size)]
        return torch.cat(out).float().cpu() if out else torch.zeros((0, self.model.text_projection.shape[1]))

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """``(n, embed_dim)`` L2-normalised text features."""
        out = [self.model.encode_text(self.tokenizer(list(texts[s: s + self.batch_size])).to(self.device), normalize=True)
               for s in range(0, len(texts), self.batch_size)]
        return torch.cat(out).float().cpu() if out else torch.zeros((0, self.model.text_projection.shape[1]))

    def similarity(self, images: Sequence[Image.Image | bytes], texts: Sequence[str]) -> torch.Tensor:
        """``(len(images), len(texts))`` cosine similarities."""
        return self.encode_images(images) @ self.encode_texts(texts).T

    def pair_scores(self, images: Sequence[Image.Image | bytes], texts: Sequence[str]) -> torch.Tensor:
        """``(n,)`` similarity of each image with its own text."""
        return (self.encode_images(images) * self.encode_texts(texts)).sum(-1)


@dataclass(frozen=True)
class PretrainedClip:
    """An open_clip model by name with weights from a local file (never downloaded)."""

    checkpoint: str
    model_name: str = "ViT-L-14"
    batch_size: int = 64
    """Images or texts per forward pass."""

    def describe(self) -> "ClipScorerManifest":
        """The checkpoint as it is (its size and modification time identify it); missing: an error naming it."""
        checkpoint = Path(self.checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"CLIP checkpoint {checkpoint} not found (weft never downloads weights)")
        stat = checkpoint.stat()
        return ClipScorerManifest(kind=PRETRAINED_KIND, threshold=None, model_name=self.model_name,
                                  checkpoint=str(checkpoint), batch_size=self.batch_size,
                                  identity={"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})


@dataclass(frozen=True)
class ClipScorerManifest:
    """A CLIP scorer ready to load: a folder saved by :meth:`ClipScorer.save` or a pretrained checkpoint."""

    kind: str
    """``sample_world_tiny_clip`` (trained by :mod:`pipelines.training.clip_scorer`) or ``pretrained``."""
    threshold: float | None
    """Its calibrated filtering threshold; None for a pretrained model (use the paper's numbers)."""
    directory: str | None = None
    model_name: str | None = None
    checkpoint: str | None = None
    batch_size: int = 64
    identity: dict[str, int] | None = None
    """A pretrained checkpoint's size and modification time."""
    training: dict[str, Any] | None = None
    """The training report of a trained scorer."""
    evaluation: dict[str, Any] | None = None
    """ROC-AUC of true vs mismatched pairs on a held-out world (a trained scorer)."""

    @property
    def version(self) -> str:
        """What scores, never where it lies: a trained scorer's weights (sha256) and threshold; a pretrained one's
        name and checkpoint identity (size, modification time)."""
        if self.kind == PRETRAINED_KIND:
            return fingerprint(self.kind, self.model_name, self.identity)
        return fingerprint(self.kind, sha256(Path(self.directory) / SCORER_WEIGHTS), self.threshold)

    @property
    def location(self) -> str:
        return str(self.directory or self.checkpoint)

    def load(self, compute: Compute = Compute()) -> ClipScorer:
        """The scorer on ``compute.device``."""
        if self.kind == PRETRAINED_KIND:
            return ClipScorer.from_pretrained(self.model_name, self.checkpoint, device=compute.device,
                                              batch_size=self.batch_size)
        return ClipScorer.load(self.directory, device=compute.device, batch_size=self.batch_size)


# scoring documents -------------------------------------------------------------------------------
def score_documents(
    documents: Iterable[dict[str, Any]],
    scorer: ClipScorer,
    images: Mapping[str, bytes],
    *,
    recaptions: Mapping[str, str] | None = None,
    chunk_documents: int = 64,
    progress: bool = False,
) -> Iterator[dict[str, Any]]:
    """One row per downloaded image element: ``doc_id``, ``element_index``, ``key``,
    ``matched_text_index``, ``similarity`` (to the matched sentence / the caption),
    ``similarities`` (to every sentence of the document, in sentence order) and
    ``similarity_recaption``: for a pair whose ``doc_id`` is in ``recaptions`` (``doc_id -> caption``,
    :func:`pipelines.data.recaption.recaptions_mapping`) the similarity to that caption, else None."""
    chunk: list[dict[str, Any]] = []
    for document in tqdm(documents, desc="clip scores", unit="doc", disable=not progress):
        chunk.append(document)
        if len(chunk) >= chunk_documents:
            yield from _score_chunk(chunk, scorer, images, recaptions or {})
            chunk = []
    if chunk:
        yield from _score_chunk(chunk, scorer, images, recaptions or {})


def _score_chunk(documents: list[dict[str, Any]], scorer: ClipScorer, images: Mapping[str, bytes],
                 recaptions: Mapping[str, str]) -> Iterator[dict[str, Any]]:
    wanted: list[tuple[dict, int, dict]] = []
    texts: list[str] = []
    sentence_rows: dict[str, tuple[int, list[int]]] = {}
    recaption_rows: dict[str, int] = {}
    for document in documents:
        sentences = [e for e in document["elements"] if e["type"] == "text"]
        sentence_rows[document["doc_id"]] = (len(texts), [e.get("sentence_index") or 0 for e in sentences])
        texts.extend(e["text"] or "" for e in sentences)
        if document["kind"] == "pair" and document["doc_id"] in recaptions:
            recaption_rows[document["doc_id"]] = len(texts)
            texts.append(recaptions[document["doc_id"]])
        for index, element in enumerate(document["elements"]):
            if element["type"] == "image" and element.get("status") == IMAGE_STATUS_OK and element.get("key") in images:
                wanted.append((document, index, element))
    if not wanted:
        return
    image_features = scorer.encode_images([images[e["key"]] for _, _, e in wanted])
    text_features = scorer.encode_texts(texts)
    for row, (document, index, element) in enumerate(wanted):
        start, sentence_index = sentence_rows[document["doc_id"]]
        sims = (image_features[row] @ text_features[start: start + len(sentence_index)].T).tolist()
        matched = element.get("matched_text_index")
        matched = 0 if matched is None else matched
        position = sentence_index.index(matched) if matched in sentence_index else None
        recaption = recaption_rows.get(document["doc_id"])
        yield {"doc_id": document["doc_id"], "element_index": index, "key": element["key"],
               "matched_text_index": matched, "similarity": None if position is None else float(sims[position]),
               "similarities": [float(s) for s in sims],
               "similarity_recaption": None if recaption is None else float(image_features[row] @ text_features[recaption])}


def scores_mapping(rows: Iterable[dict[str, Any]], *, prefer_recaption: bool = False) -> dict[tuple[str, int], float]:
    """``(doc_id, element_index) -> similarity`` for :func:`pipelines.data.filtering.filter_documents`; with
    ``prefer_recaption`` a recaptioned pair's similarity is the one to its recaption."""
    out = {}
    for r in rows:
        value = r.get("similarity_recaption") if prefer_recaption else None
        value = r["similarity"] if value is None else value
        if value is not None:
            out[(r["doc_id"], r["element_index"])] = value
    return out
