"""The sample world's own CLIP scorer: a tiny open_clip model trained on the world's clean pairs.

:func:`train_world_scorer` trains a tiny open_clip model contrastively on the sample world's clean
pairs (true captions of pair images, story frames with their sentences and full captions), with
images prepared exactly as the filter sees them (the world's JPEG bytes, resized), picks its
filtering threshold from clean pairs held out of training alone (the ``threshold_quantile`` of
their scores, so ~95% of true pairs pass), and saves it. How well it separates true from
mismatched story images depends mostly on how many story sentences it saw: train it on a world
with a few hundred stories (the world is cheap; training time depends on ``steps`` only). :func:`evaluate_scorer`
reports ROC-AUC of true vs the world's deliberately mismatched pairs on any world (use a different seed than training).

:func:`provide_clip_scorer` is the clip_scorer stage: the sample world's scorer trained (:class:`WorldScorer`), or a
pretrained open_clip model described (:class:`pipelines.data.clip_score.PretrainedClip`).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pipelines.compute import Compute
from pipelines.data.clip_score import WORLD_SCORER_KIND, ClipScorer, ClipScorerManifest, PretrainedClip
from pipelines.sample_world.scenes import encode, render
from pipelines.sample_world.world import SampleWorld, WorldConfig, caption, generate_world
from pipelines.training.model_cache import cached_model


def tiny_clip_config(image_size: int = 64, context_length: int = 64) -> dict[str, Any]:
    """An open_clip CLIP config of ~2 M parameters (most in the 49408-token text embedding)."""
    return {
        "embed_dim": 64,
        "vision_cfg": {"image_size": image_size, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }


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
    """How the sample world's scorer trains: symmetric InfoNCE, AdamW, warmup + cosine. The defaults take ~1 min
    on one CPU core (~0.2 s a step)."""

    steps: int = 300
    batch_size: int = 96
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup: int = 20
    seed: int = 0
    image_size: int = 48
    """Scorer input size in pixels (the world's images are resized to it)."""
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


@dataclass(frozen=True)
class WorldScorer:
    """The sample world's scorer: trained on a world of another seed than the one it filters (as CLIP is trained on
    other data than it scores), its threshold calibrated on held-out clean pairs, evaluated on a third seed."""

    world: WorldConfig
    """The world whose data it scores."""
    training: ScorerTraining = ScorerTraining()
    training_pairs: int = 400
    training_stories: int = 400
    """Size of the scorer's own training world; a few hundred stories are what lets it reject mismatched story
    images while keeping >= 90% of true ones."""


def provide_clip_scorer(source: WorldScorer | PretrainedClip, out_dir: Path, compute: Compute = Compute()) -> ClipScorerManifest:
    """The clip_scorer stage: the sample world's scorer trained (and evaluated) into a folder under ``out_dir`` named
    by ``source``, once (:func:`pipelines.training.model_cache.cached_model`), or a pretrained checkpoint on local
    disk checked and described (``out_dir`` is not written then; weights are never downloaded)."""
    if isinstance(source, PretrainedClip):
        return source.describe()

    def build(folder: Path) -> ClipScorerManifest:
        training_world = generate_world(replace(source.world, seed=source.world.seed + 1000,
                                                n_pairs=source.training_pairs, n_stories=source.training_stories))
        with compute.threads():
            scorer, report = train_world_scorer(training_world, folder, source.training)
            evaluation = evaluate_scorer(scorer, generate_world(replace(source.world, seed=source.world.seed + 1)))
        return ClipScorerManifest(kind=WORLD_SCORER_KIND, threshold=scorer.threshold, directory=str(folder),
                                  training=report, evaluation=evaluation)

    return cached_model(out_dir, source, build, lambda saved, folder: ClipScorerManifest(**{**saved, "directory": str(folder)}))
