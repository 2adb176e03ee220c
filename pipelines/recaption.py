"""BLIP-2 recaptioning, and the sample world's own tiny captioner.

:class:`Captioner` wraps a ``Blip2Processor`` + ``Blip2ForConditionalGeneration`` loaded from a
local directory (BLIP-2 OPT-2.7B in the paper; never a download): batched, ``no_grad``, greedy
decoding, CPU or GPU.

:func:`recaption_documents` yields one row per downloaded image of the pair documents —
``doc_id``, ``element_index``, ``key``, ``caption`` (the source text) and ``caption_blip2`` — and
:func:`recaptions_mapping` turns those rows into the ``recaptions`` (``doc_id -> caption``) that
:func:`pipelines.packing.pack_documents` uses when ``PackingConfig.pair_caption == "blip2"``. An image
that is missing or cannot be decoded is reported to ``handler`` with its key and skipped.

:func:`train_world_captioner` trains a BLIP-2-architecture model of ~0.5 M parameters (tiny ViT,
tiny Q-Former, tiny OPT, a BPE trained on the world's text) on the world's clean pairs and saves
it with ``save_pretrained``, so the same loading path serves it. :func:`evaluate_recaptioning`
measures caption accuracy on the world's noisy alt-text pairs before (the alt-text) and after
(the recaption): a caption is *correct* when it equals the scene's true caption
(:func:`pipelines.sample_world.caption`) after :func:`normalize_caption`; ``fact_f1`` gives partial
credit over the (size, colour, shape, position) and (digit, position) facts a caption states.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import random
import re
import shutil
import string
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    BlipImageProcessor,
    PreTrainedTokenizerBase,
)

from pipelines.documents import IMAGE_STATUS_OK
from pipelines.errors import BadRecord, Handler, warn_and_continue
from pipelines.sample_world.scenes import COLOURS, SHAPES, SIZES
from pipelines.sample_world.world import SampleWorld, WorldConfig, caption, generate_world
from pipelines.tokenizer import train_tokenizer, world_texts
from pipelines.world_data import world_documents, world_images, world_truth

CAPTION_FIELD = "caption_blip2"
POSITION_EMBEDDING_STD = 1.0
"""Initial scale of the tiny captioner's ViT position embeddings (see :func:`tiny_captioner`)."""


class Captioner:
    """Captions images with a BLIP-2 model (eval mode, ``no_grad``, greedy decoding)."""

    def __init__(self, model: Blip2ForConditionalGeneration, processor: Blip2Processor, *,
                 device: str | torch.device = "cpu", batch_size: int = 32, max_new_tokens: int = 64) -> None:
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
        """Model + processor, written to a temporary sibling and renamed (no half-written directory)."""
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            self.model.save_pretrained(tmp)
            self.processor.save_pretrained(tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return out

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(B, 3, H, W)`` on the model's device and dtype."""
        pixels = self.processor.image_processor(list(images), return_tensors="pt")["pixel_values"]
        return pixels.to(self.device, self.model.dtype)

    @torch.no_grad()
    def caption(self, images: Sequence[Image.Image | bytes]) -> list[str]:
        """One caption per image, in order (batches of ``batch_size``)."""
        captions: list[str] = []
        for start in range(0, len(images), self.batch_size):
            batch = [_as_image(x) for x in images[start: start + self.batch_size]]
            tokenizer = self.processor.tokenizer
            out = self.model.generate(pixel_values=self.pixel_values(batch), max_new_tokens=self.max_new_tokens,
                                      do_sample=False, num_beams=1, pad_token_id=tokenizer.pad_token_id)
            # 'out' repeats the prompt (image placeholders + <s>) for decoder-only LMs; both are special tokens
            captions.extend(text.strip() for text in tokenizer.batch_decode(out, skip_special_tokens=True))
        return captions


def model_digest(directory: str | os.PathLike) -> str:
    """sha256 over a saved captioner's weights (``*.safetensors``) and ``tokenizer.json``: its version,
    which names the recaptions it made. A retrained model with identical weights keeps its version;
    ``config.json`` is left out because a load → save round trip rewrites it with the same meaning."""
    digest = hashlib.sha256()
    root = Path(directory)
    weights, tokenizer = sorted(root.glob("*.safetensors")), root / "tokenizer.json"
    if not weights or not tokenizer.is_file():
        raise FileNotFoundError(f"{root}: need *.safetensors and tokenizer.json (Captioner.save_pretrained layout)")
    for path in [*weights, tokenizer]:
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _as_image(data: Image.Image | bytes) -> Image.Image:
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
                image = _as_image(images[key])
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


# caption accuracy ---------------------------------------------------------------------------------
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})
_POSITIONS = "top left|top right|bottom left|bottom right|top|bottom|left|right|center|middle"
_OBJECT = re.compile(rf"\b({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) (?:in|at) the ({_POSITIONS})\b")
_DIGIT = re.compile(rf"\bdigit (\d) at the ({_POSITIONS})\b")


def normalize_caption(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed."""
    return " ".join(text.lower().translate(_PUNCTUATION).split())


def caption_facts(text: str) -> set[tuple[str, ...]]:
    """The facts a caption states: ``(size, colour, shape, position)`` per object, ``("digit", d, position)``."""
    norm = normalize_caption(text)
    facts = {m.groups() for m in _OBJECT.finditer(norm)}
    facts |= {("digit", *m.groups()) for m in _DIGIT.finditer(norm)}
    return facts


def caption_scores(predictions: Sequence[str], truths: Sequence[str]) -> dict[str, float]:
    """``accuracy``: fraction with ``normalize_caption(prediction) == normalize_caption(truth)``;
    ``fact_f1``: mean per-caption F1 of :func:`caption_facts` against the truth's facts."""
    if len(predictions) != len(truths) or not truths:
        raise ValueError("need as many predictions as truths, at least one")
    exact, f1 = [], []
    for prediction, truth in zip(predictions, truths):
        exact.append(normalize_caption(prediction) == normalize_caption(truth))
        got, want = caption_facts(prediction), caption_facts(truth)
        hit = len(got & want)
        f1.append(0.0 if not hit else 2 * hit / (len(got) + len(want)))
    return {"accuracy": float(np.mean(exact)), "fact_f1": float(np.mean(f1)), "n": len(truths)}


# the sample world's captioner ---------------------------------------------------------------------
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
    """BPE size of the tokenizer trained on the world's text (``pipelines.tokenizer.train_tokenizer``)."""

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
    pixels = torch.cat([captioner.pixel_values([_as_image(jpegs[key]) for key, _ in pairs[i: i + chunk]])
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
