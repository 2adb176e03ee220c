"""CLIP scoring with open_clip, and the sample world's own tiny scorer.

:class:`ClipScorer` wraps an open_clip ``CLIP`` (image and text towers, batched, ``no_grad``, CPU or
GPU). It is built from a model name + local checkpoint (ViT-L/14 in the paper; never a download)
or loaded from a directory written by :meth:`ClipScorer.save` (the tiny scorer).

:func:`score_documents` gives, per downloaded image element, the similarity to its matched
sentence (MMC4) or caption (pairs), for interleaved documents the full image × sentence row, and for
recaptioned pairs the similarity to the recaption too; :func:`scores_mapping` turns those rows into
the ``scores`` that :func:`pipelines.filtering.filter_documents` takes (a recaptioned pair judged by its
recaption, the text it will be trained on, if asked).

:func:`train_world_scorer` trains a tiny open_clip model contrastively on the sample world's clean
pairs (true captions of pair images, story frames with their sentences and full captions), with
images prepared exactly as the filter sees them (the world's JPEG bytes, resized), picks its
filtering threshold from clean pairs held out of training alone (the ``threshold_quantile`` of
their scores, so ~95% of true pairs pass), and saves it. How well it separates true from
mismatched story images depends mostly on how many story sentences it saw: train it on a world
with a few hundred stories (the world is cheap; training time depends on ``steps`` only). :func:`evaluate_scorer` reports ROC-AUC of true vs the world's
deliberately mismatched pairs on any world (use a different seed than training).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from pipelines.documents import IMAGE_STATUS_OK
from pipelines.sample_world.scenes import encode, render
from pipelines.sample_world.world import SampleWorld, caption

SCORER_CONFIG = "weft_scorer.json"
SCORER_WEIGHTS = "open_clip_model.safetensors"


def tiny_clip_config(image_size: int = 64, context_length: int = 64) -> dict[str, Any]:
    """An open_clip CLIP config of ~2 M parameters (most in the 49408-token text embedding)."""
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


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
        out = Path(directory)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}, tmp / SCORER_WEIGHTS)
            (tmp / SCORER_CONFIG).write_text(json.dumps(
                {"model_config": self.model_config, "threshold": self.threshold, **(extra or {})}, indent=1))
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

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
    :func:`pipelines.recaption.recaptions_mapping`) the similarity to that caption, else None."""
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
    """``(doc_id, element_index) -> similarity`` for :func:`pipelines.filtering.filter_documents`; with
    ``prefer_recaption`` a recaptioned pair's similarity is the one to its recaption."""
    out = {}
    for r in rows:
        value = r.get("similarity_recaption") if prefer_recaption else None
        value = r["similarity"] if value is None else value
        if value is not None:
            out[(r["doc_id"], r["element_index"])] = value
    return out


# the sample world's scorer -----------------------------------------------------------------------
def world_clean_pairs(world: SampleWorld) -> list[tuple[Any, str, bool]]:
    """(scene, text, as_in_metadata) pairs that are true: every pair image with its true caption,
    every story frame with its story sentence (``as_in_metadata``: the kind of text the filter
    sees) and, as extra training signal, with its full caption. Mismatched images are never used."""
    pairs = [(p.scene, p.caption, True) for p in world.pairs if not p.mismatched]
    for story in world.stories:
        for image in story.images:
            if not image.mismatched:
                pairs.append((image.scene, story.sentences[image.matched_text_index], True))
                pairs.append((image.scene, caption(image.scene), False))
    return pairs


def world_eval_pairs(world: SampleWorld) -> list[tuple[Any, str, bool, str]]:
    """(scene, text as written in the metadata, is_true, kind) for every image of the world."""
    out = [(p.scene, p.text, not p.mismatched, p.text_kind) for p in world.pairs]
    for story in world.stories:
        for image in story.images:
            out.append((image.scene, story.sentences[image.matched_text_index], not image.mismatched,
                        "mismatched" if image.mismatched else "story_sentence"))
    return out


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """Probability that a random positive scores above a random negative (ties count ½)."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if not len(pos) or not len(neg):
        raise ValueError("ROC-AUC needs positives and negatives")
    scores = np.concatenate([pos, neg])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i: j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


@dataclass(frozen=True)
class ScorerTraining:
    steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 20
    seed: int = 0
    image_size: int = 64
    context_length: int = 48
    """Text tower context (SimpleTokenizer tokens); the world's longest caption needs 39."""
    clause_probability: float = 0.0
    """Text augmentation: with this probability a training caption is replaced by one of its clauses
    (split at commas and "and", e.g. "a small red circle at the top left"), a true statement about
    the image that looks like the short sentences an MMC4 image is matched to."""
    threshold_quantile: float = 0.05
    """The threshold is this quantile of held-out clean pairs' scores (so ~95% of true pairs pass)."""
    calibration_fraction: float = 0.2
    """Clean pairs held out of training to pick the threshold (training scores are optimistic)."""


_CLAUSE_SPLIT = re.compile(r",\s+|\s+and\s+")


def caption_clauses(text: str) -> list[str]:
    """The clauses of a caption that lists several things (none for a single-clause text)."""
    parts = [p.strip().rstrip(".").strip() for p in _CLAUSE_SPLIT.split(text)]
    parts = [p for p in parts if p]
    return [p[0].upper() + p[1:] + "." for p in parts] if len(parts) > 1 else []


def _as_filtered(scene: Any, world_size: int, scorer: ClipScorer, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """The scene's pixels as the filter sees them: rendered at the world's size, JPEG bytes, resized."""
    key = json.dumps(scene.to_dict(), sort_keys=True)
    if key not in cache:
        cache[key] = scorer.image_tensor(encode(render(scene, world_size), "jpeg"))
    return cache[key]


def train_world_scorer(world: SampleWorld, out_dir: str | os.PathLike | None = None,
                       config: ScorerTraining = ScorerTraining(), *, progress: bool = False) -> tuple[ClipScorer, dict[str, Any]]:
    """Train a tiny open_clip model on the world's clean pairs (symmetric InfoNCE, AdamW, cosine lr).

    Images are prepared exactly as :func:`score_documents` will see them (the world's JPEG bytes,
    resized to the model), texts as written in the metadata plus full captions (and, with
    ``clause_probability``, their clauses). The threshold is the ``threshold_quantile`` of the
    scores of clean pairs held out of training. Returns the scorer (threshold set) and a training
    report; saves it to ``out_dir`` if given."""
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    model_config = tiny_clip_config(config.image_size, config.context_length)
    scorer = ClipScorer.from_config(model_config)
    model = scorer.model.train()
    pairs = world_clean_pairs(world)
    rng.shuffle(pairs)
    n_calibration = max(1, int(len(pairs) * config.calibration_fraction))
    calibration = [(scene, text) for scene, text, as_in_metadata in pairs[:n_calibration] if as_in_metadata]
    pairs = [(scene, text) for scene, text, _ in pairs[n_calibration:]]
    size = world.config.image_size
    rendered: dict[str, torch.Tensor] = {}
    images_t = torch.stack([_as_filtered(scene, size, scorer, rendered) for scene, _ in pairs])
    tokens = scorer.tokenizer([t for _, t in pairs])
    clauses = [caption_clauses(t) for _, t in pairs]
    clause_rows: list[list[int]] = []
    flat: list[str] = []
    for options in clauses:
        clause_rows.append(list(range(len(flat), len(flat) + len(options))))
        flat.extend(options)
    clause_tokens = scorer.tokenizer(flat) if flat else tokens[:0]
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    start = time.perf_counter()
    losses = []
    for step in tqdm(range(config.steps), desc="tiny CLIP", disable=not progress):
        lr = config.lr * min(1.0, (step + 1) / config.warmup) * 0.5 * (1 + math.cos(math.pi * step / config.steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = rng.sample(range(len(pairs)), min(config.batch_size, len(pairs)))
        text_batch = tokens[batch].clone()
        if config.clause_probability > 0:
            for row, index in enumerate(batch):
                if clause_rows[index] and rng.random() < config.clause_probability:
                    text_batch[row] = clause_tokens[rng.choice(clause_rows[index])]
        out = model(images_t[batch], text_batch)
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T if isinstance(out, dict) else \
            out[2] * out[0] @ out[1].T
        # the same text can appear twice in a batch (a story frame + sentence, a shared clause): mask
        # duplicates of the target
        same_text = text_batch[:, None, :].eq(text_batch[None, :, :]).all(-1)
        logits = logits.masked_fill(same_text & ~torch.eye(len(batch), dtype=torch.bool), -1e4)
        target = torch.arange(len(batch))
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    held_out = scorer.pair_scores([encode(render(s, size), "jpeg") for s, _ in calibration], [t for _, t in calibration])
    scorer.threshold = float(np.quantile(held_out.numpy(), config.threshold_quantile))
    report = {"pairs": len(pairs), "calibration_pairs": len(calibration), "steps": config.steps, "seconds": time.perf_counter() - start,
              "initial_loss": float(np.mean(losses[:5])), "final_loss": float(np.mean(losses[-5:])), "threshold": scorer.threshold,
              "training": {k: getattr(config, k) for k in config.__dataclass_fields__}}
    if out_dir is not None:
        scorer.save(out_dir, extra={"report": report})
    return scorer, report


def evaluate_scorer(scorer: ClipScorer, world: SampleWorld) -> dict[str, Any]:
    """ROC-AUC of true vs mismatched image-text pairs of ``world`` (texts as written in its metadata).

    ``roc_auc`` uses true captions and story sentences as positives; alt-text pairs (true but
    uninformative) are reported separately as ``roc_auc_with_alt_text``."""
    rows = world_eval_pairs(world)
    size = world.config.image_size  # as the filter sees them: the world's JPEG bytes
    scores = scorer.pair_scores([encode(render(s, size), "jpeg") for s, _, _, _ in rows], [t for _, t, _, _ in rows]).numpy()
    negative = [s for s, r in zip(scores, rows) if not r[2]]
    informative = [s for s, r in zip(scores, rows) if r[2] and r[3] != "alt_text"]
    everything = [s for s, r in zip(scores, rows) if r[2]]
    result = {"roc_auc": roc_auc(informative, negative), "roc_auc_with_alt_text": roc_auc(everything, negative),
              "positives": len(informative), "negatives": len(negative)}
    if scorer.threshold is not None:
        result["true_kept"] = float(np.mean(np.asarray(informative) >= scorer.threshold))
        result["mismatched_removed"] = float(np.mean(np.asarray(negative) < scorer.threshold))
    return result
