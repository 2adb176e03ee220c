"""The sample world's own captioner: a BLIP-2-architecture model of ~0.5 M parameters trained from scratch.

:func:`train_world_captioner` trains a tiny BLIP-2 (tiny ViT, tiny Q-Former, tiny OPT, a BPE trained on the
world's text) on the world's clean pairs and saves it with ``save_pretrained``, so the loading path of a real
BLIP-2 (:class:`pipelines.data.recaption.Captioner`) serves it. :func:`evaluate_recaptioning` measures caption
accuracy (:mod:`pipelines.sample_world.captions`) on the world's noisy alt-text pairs before (the alt-text) and
after (the recaption).

:func:`provide_captioner` is the captioner stage: the sample world's captioner trained (:class:`WorldCaptioner`), or a
BLIP-2 folder described (:class:`pipelines.data.recaption.PretrainedBlip2`).
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    PreTrainedTokenizerBase,
)

from pipelines.compute import Compute
from pipelines.data.recaption import (
    CAPTION_FIELD,
    Captioner,
    CaptionerManifest,
    Captioning,
    PretrainedBlip2,
    as_rgb_image,
    model_digest,
    recaption_documents,
)
from pipelines.data.tokenizer import train_tokenizer
from pipelines.sample_world.captions import caption_scores
from pipelines.sample_world.documents import world_documents, world_images, world_texts, world_truth
from pipelines.sample_world.world import SampleWorld, WorldConfig, caption, generate_world
from pipelines.training.model_cache import cached_model

WORLD_CAPTIONER_KIND = "sample_world_tiny_blip2"
POSITION_EMBEDDING_STD = 1.0
"""Initial scale of the tiny captioner's ViT position embeddings (see :func:`tiny_captioner`)."""


def tiny_blip2_config(tokenizer: PreTrainedTokenizerBase, image_token_index: int, *, image_size: int = 64,
                      num_query_tokens: int = 16) -> Blip2Config:
    """A BLIP-2 (ViT + Q-Former + OPT) of ~0.5 M parameters for the tokenizer's vocabulary."""
    return Blip2Config(
        # the vision default initializer_range (1e-10) assumes pretrained weights get loaded; from scratch: 0.02
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": 8, "initializer_range": 0.02},
        qformer_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "cross_attention_frequency": 1},
        text_config={"model_type": "opt", "vocab_size": len(tokenizer), "hidden_size": 128, "word_embed_proj_dim": 128,
                     "ffn_dim": 256, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 160,
                     "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "pad_token_id": tokenizer.pad_token_id, "dropout": 0.0, "attention_dropout": 0.0},
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=64,
        image_token_index=image_token_index,
    )


def tiny_captioner(tokenizer: PreTrainedTokenizerBase, *, image_size: int = 64, num_query_tokens: int = 16,
                   seed: int = 0, **kwargs: Any) -> Captioner:
    """A randomly initialised tiny BLIP-2 with its processor (the world's captioner before training)."""
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=num_query_tokens)
    image_token_index = tokenizer.convert_tokens_to_ids(processor.image_token.content)
    torch.manual_seed(seed)
    config = tiny_blip2_config(tokenizer, image_token_index, image_size=image_size, num_query_tokens=num_query_tokens)
    model = Blip2ForConditionalGeneration(config)
    # transformers initialises for pretrained weights to overwrite; three of its choices stall training from scratch:
    # - the query tokens start at zero: identical queries get identical gradients and never tell apart, so draw
    #   them as BLIP-2's own training does;
    # - the ViT's position embeddings start at initializer_range (0.02), ~15x smaller than the patch embeddings:
    #   the Q-Former's cross-attention cannot tell one patch from another, so the captioner learns which colours
    #   an image holds but not where (first-object position at chance after 2400 steps). Drawn at unit scale, as
    #   the ViT module itself draws them (torch.randn), the Q-Former routes per-cell content within 300 steps;
    # - the patch embedding starts at initializer_range too, so each patch's content (~0.3) is then swamped by
    #   its unit-scale position: runs learned either where the objects are or their colours, rarely both. Drawn at
    #   fan-in scale (std 1/sqrt(3 * patch^2)) content and position start alike: the alt-text fact F1 of 600-step
    #   runs at lr 1.5e-3 rose from 0.03-0.13 to 0.12-0.16 over seeds 0-2.
    with torch.no_grad():
        model.query_tokens.normal_(0.0, config.qformer_config.initializer_range)
        model.vision_model.embeddings.position_embedding.normal_(0.0, POSITION_EMBEDDING_STD)
        patch = model.vision_model.embeddings.patch_embedding.weight
        patch.normal_(0.0, patch[0].numel() ** -0.5)
    return Captioner(model, processor, **kwargs)


def world_caption_pairs(world: SampleWorld) -> list[tuple[str, str]]:
    """``(image key, true caption)`` for training: pair images whose metadata text is the true
    caption and every non-mismatched story image with its scene's caption. Alt-text and
    mismatched pairs are left out, so they stay unseen for :func:`evaluate_recaptioning`."""
    out = [(p.image_id, p.caption) for p in world.pairs if p.text_kind == "caption"]
    for story in world.stories:
        out.extend((image.image_id, caption(image.scene)) for image in story.images if not image.mismatched)
    return out


def captioner_training_world(config: WorldConfig, n_pairs: int) -> SampleWorld:
    """A world like ``config`` (seed, image size) of ``n_pairs`` pairs that all carry their true caption
    (no stories, alt-texts or mismatches): the captioner's training data, every image a fresh scene."""
    return generate_world(replace(config, n_pairs=n_pairs, n_stories=0, alt_text_rate=0.0, mismatch_rate=0.0))


@dataclass(frozen=True)
class CaptionerTraining:
    """AdamW with warmup + cosine. The defaults take ~3 min on one CPU core (~0.15 s a step at batch 32):
    the sample world's demo budget. Learning the captions is a slow phase change (which objects come first,
    then their colours, sizes, shapes): 600 steps reach fact F1 0.12-0.16, 1200 steps 0.24-0.46 (seeds 0-2); at
    lr 3e-3 runs often never leave the plateau where positions are at chance."""

    steps: int = 1200
    batch_size: int = 32
    lr: float = 1.5e-3
    weight_decay: float = 0.01
    warmup: int = 50
    seed: int = 0
    image_size: int = 64
    num_query_tokens: int = 16
    vocab_size: int = 510
    """BPE size of the tokenizer trained on the world's text (``pipelines.data.tokenizer.train_tokenizer``)."""

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1")
        if self.warmup < 1:
            raise ValueError(f"warmup must be >= 1, got {self.warmup}")


def learning_rate(step: int, config: CaptionerTraining) -> float:
    """Linear warmup, then cosine decay to zero."""
    return config.lr * min(1.0, (step + 1) / config.warmup) * 0.5 * (1 + math.cos(math.pi * step / config.steps))


def train_world_captioner(world: SampleWorld, out_dir: str | os.PathLike | None = None,
                          config: CaptionerTraining = CaptionerTraining(), *,
                          progress: bool = False) -> tuple[Captioner, dict[str, Any]]:
    """Train a tiny BLIP-2 on the world's clean pairs (next-token loss on ``<s> caption </s>`` after
    the query tokens; AdamW, warmup + cosine). Returns the captioner and a training report; saves
    it with ``save_pretrained`` to ``out_dir`` if given (load it back with :meth:`Captioner.from_pretrained`)."""
    rng = random.Random(config.seed)
    tokenizer = train_tokenizer(world_texts(world), vocab_size=config.vocab_size)
    captioner = tiny_captioner(tokenizer, image_size=config.image_size, num_query_tokens=config.num_query_tokens,
                               seed=config.seed)
    model = captioner.model.train()
    # 1. data: JPEGs at the world's size (what the download stage gives), resized by the processor
    #    exactly as at captioning time → pixels; captions → <image>*Q <s> text </s>
    pairs = world_caption_pairs(world)
    jpegs = world_images(world)
    chunk = 512  # the processor's float intermediates for every image at once would cost several GB
    pixels = torch.cat([captioner.pixel_values([as_rgb_image(jpegs[key]) for key, _ in pairs[i: i + chunk]])
                        for i in range(0, len(pairs), chunk)])
    ids = _caption_ids(captioner, [text for _, text in pairs])
    # 2. optimise
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    losses: list[float] = []
    start = time.perf_counter()
    for step in tqdm(range(config.steps), desc="tiny BLIP-2", disable=not progress):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config)
        batch = rng.sample(range(len(pairs)), min(config.batch_size, len(pairs)))
        input_ids, attention_mask, labels = ids[0][batch], ids[1][batch], ids[2][batch]
        length = int(attention_mask.sum(1).max())  # host sync: trim the batch to its longest caption
        loss = model(pixel_values=pixels[batch], input_ids=input_ids[:, :length],
                     attention_mask=attention_mask[:, :length], labels=labels[:, :length]).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())  # host sync, once per step
    model.eval()
    report = {"pairs": len(pairs), "parameters": sum(p.numel() for p in model.parameters()), "steps": config.steps,
              "seconds": time.perf_counter() - start, "initial_loss": float(np.mean(losses[:5])),
              "final_loss": float(np.mean(losses[-5:])),
              "training": {k: getattr(config, k) for k in config.__dataclass_fields__}}
    if out_dir is not None:
        captioner.save_pretrained(out_dir)
    return captioner, report


def _caption_ids(captioner: Captioner, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask``, ``labels`` ``(N, Q + 1 + T + 1)``, right-padded; labels are
    ``-100`` on the query placeholders and padding."""
    tokenizer = captioner.processor.tokenizer
    config = captioner.model.config
    prefix = [config.image_token_index] * config.num_query_tokens + [tokenizer.bos_token_id]
    rows = [prefix + tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, : config.num_query_tokens] = -100
    return input_ids.to(captioner.device), attention_mask.to(captioner.device), labels.to(captioner.device)


def evaluate_recaptioning(captioner: Captioner, world: SampleWorld, *, text_kind: str = "alt_text",
                          progress: bool = False) -> dict[str, Any]:
    """Caption accuracy on the world's pairs of ``text_kind`` before (their metadata text) and after
    (the recaption), run through :func:`recaption_documents` on the world's documents."""
    truth = world_truth(world)
    keys = {p.image_id for p in world.pairs if p.text_kind == text_kind}
    documents = [d for d in world_documents(world) if d["kind"] == "pair" and d["elements"][0].get("key") in keys]
    rows = list(recaption_documents(documents, captioner, world_images(world), progress=progress))
    truths = [truth[r["key"]]["caption"] for r in rows]
    before = caption_scores([r["caption"] for r in rows], truths)
    after = caption_scores([r[CAPTION_FIELD] for r in rows], truths)
    return {"text_kind": text_kind, "pairs": len(rows), "before": before, "after": after,
            "examples": [{"key": r["key"], "before": r["caption"], "after": r[CAPTION_FIELD], "truth": t}
                         for r, t in zip(rows[:5], truths[:5])]}


@dataclass(frozen=True)
class WorldCaptioner:
    """The sample world's captioner: a tiny BLIP-2 trained on a world of another seed whose pairs all carry their
    true caption, evaluated on the noisy alt-text pairs of the world it recaptions."""

    world: WorldConfig
    """The world whose pairs it recaptions."""
    training: CaptionerTraining = CaptionerTraining()
    training_pairs: int = 12_000
    """Pairs of the captioner's own training world (no alt-texts, no mismatches). Fresh scenes, not more steps, are
    what make it generalise: on ~2k pairs the tiny model memorises its training images and recaptions new ones no
    better than chance."""
    captioning: Captioning = Captioning()


def provide_captioner(source: WorldCaptioner | PretrainedBlip2, out_dir: Path,
                      compute: Compute = Compute()) -> CaptionerManifest:
    """The captioner stage: the sample world's captioner trained (and evaluated) into a folder under ``out_dir`` named
    by ``source``, once (:func:`pipelines.training.model_cache.cached_model`), or a BLIP-2 folder on local disk
    checked and described (``out_dir`` is not written then)."""
    if isinstance(source, PretrainedBlip2):
        return source.describe()

    def build(folder: Path) -> CaptionerManifest:
        training_world = captioner_training_world(replace(source.world, seed=source.world.seed + 2000),
                                                  source.training_pairs)
        with compute.threads():
            _, report = train_world_captioner(training_world, folder, source.training)
            manifest = CaptionerManifest(kind=WORLD_CAPTIONER_KIND, directory=str(folder), version=model_digest(folder),
                                         captioning=source.captioning, training=report)
            evaluation = evaluate_recaptioning(manifest.load(compute), generate_world(source.world))
        return replace(manifest, evaluation=evaluation)

    def restore(saved: dict[str, Any], folder: Path) -> CaptionerManifest:
        return CaptionerManifest(**{**saved, "directory": str(folder), "captioning": Captioning(**saved["captioning"])})

    return cached_model(out_dir, source, build, restore)
