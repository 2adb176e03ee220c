"""Tokenization and packing: normalized documents -> sequences of at most ``max_length`` tokens.

Two stages, each a generator over records:

1. :func:`tokenize_documents` turns a document into a :class:`TokenizedDocument`: ``<s>`` text
   ``</s>`` with every image as ``<BoI>`` + N placeholders, plus the positions where the document
   may be split (between sentence units). A *sentence unit* is one sentence with the images
   matched to it; each image is placed before its sentence or, with probability
   ``image_after_probability`` (½, the paper's rule), after it. Pairs put the image first with
   probability ``pair_image_first_probability`` (½) and lowercase the caption. Randomness comes
   from draws hashed from ``(seed, doc_id)`` (:func:`_uniforms`), so a document is tokenized the same
   way whatever shard, worker or order it is processed in.
2. :func:`pack_tokenized` concatenates documents greedily into :class:`PackedSequence` s. A document
   that fits in the current sequence is appended; one that fits in an empty sequence starts a new
   one; a longer one is split at sentence-unit boundaries, filling the current sequence first.
   Only a single sentence unit longer than a whole sequence is cut inside, at a token that is not
   part of an image (counted in :attr:`PackingStats.forced_splits`). An image's ``<BoI>`` and its
   N placeholders are never separated (the paper's "a BoI in the last 64 tokens moves to the next
   sequence"). ``<s>`` only starts a document's first part and ``</s>`` only ends its last part.
   With ``max_images_per_sequence`` set, a sequence also holds at most that many images: a
   document whose images would pass the cap is split the same way (the paper caps images per
   sequence; weft moves the rest to the next sequence instead of dropping images).

Each sequence stores its token ids, the images' encoded bytes (one per ``<BoI>``, in order) and
its document boundaries as ``cu_seqlens`` (0, end of part 1, ..., length) with the document id
and part number of each segment, which is what :mod:`pipelines.data.loader` turns into the model's
``document_ids``.

Instruction documents (``kind == "instruction"``, supervised fine-tuning data read by
:mod:`pipelines.data.instructions`) say which tokens are trained. Their elements stay in conversation
order (no random image placement, no lowercasing); a text that follows a text goes after one space,
so ``[image, "What colour is the triangle?", "red"]`` packs as ``<s> [image] What colour is the
triangle? red </s>``, the tokens generation sees when it answers the evaluation's ``[image, question]``
prompt. Each element's role gives its loss: an answer's text tokens, the ``<BoI>`` of an answer's image
and the document's ``</s>`` are trained (the model learns to answer, to draw and to stop); ``<s>``, the
instruction's tokens and every image placeholder are not. An answer's image gets the diffusion loss, an
instruction's image does not. Such a document may be split only between rounds (before an instruction
that follows an answer), so an answer stays in one part with its question. A sequence holding one stores
a per-token ``loss_mask`` and per-image ``image_trained`` flags (other documents in it: all trained, the
model's defaults); a sequence without one stores neither, so pretraining shards are unchanged.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import struct
import time
from array import array
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from pipelines.data.documents import ANSWER_ROLE, IMAGE_STATUS_OK
from pipelines.data.errors import BadRecord, Handler, warn_and_continue
from pipelines.data.tokenizer import TINY_BOI_TOKEN, TINY_IMAGE_TOKEN, TextEncoder, TokenIds, token_ids

_INT32 = "i"
"""``array`` typecode of the token ids (C int: 4 bytes on every platform weft runs on, checked here)."""
_UINT8 = "B"
"""``array`` typecode of the loss masks."""
INSTRUCTION = "instruction"
"""The document kind whose elements carry roles (see the module docstring)."""
if array(_INT32).itemsize != 4:
    raise ImportError(f"pipelines.data.packing needs a 4-byte C int for array({_INT32!r})")


@dataclass(frozen=True)
class PackingConfig:
    """How documents become sequences. Written into the shards' index as metadata."""

    max_length: int = 2048
    """Tokens per sequence (the paper: 2048)."""
    num_image_tokens: int = 64
    """Placeholders per image: the model's visual tokens (``MMInterleavedConfig.num_visual_tokens``)."""
    image_after_probability: float = 0.5
    """Interleaved documents: probability that an image goes right after its sentence instead of before."""
    pair_image_first_probability: float = 0.5
    """Pairs: probability that the image comes before the caption."""
    lowercase_pair_captions: bool = True
    max_images_per_sequence: int | None = None
    """At most this many images in one sequence (None: no cap). A document whose images would pass
    the cap goes on in the next sequence, split at a sentence-unit boundary like an over-long one
    (inside a unit only when the unit alone holds more images than the cap, cut before an image's
    ``<BoI>``). No image is dropped."""
    seed: int = 0
    tokenize_batch_documents: int = 256
    """Documents tokenized per call into the (Rust) tokenizer."""

    def __post_init__(self) -> None:
        if self.num_image_tokens < 1:
            raise ValueError("num_image_tokens must be >= 1")
        if self.max_length < self.num_image_tokens + 3:
            raise ValueError(f"max_length {self.max_length} cannot hold one image (<s> <BoI> + {self.num_image_tokens} + </s>)")
        for name in ("image_after_probability", "pair_image_first_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.max_images_per_sequence is not None and self.max_images_per_sequence < 1:
            raise ValueError(f"max_images_per_sequence must be None or >= 1, got {self.max_images_per_sequence}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ROW_FORMAT = 2
"""Version of a packed row's JSON fields (2 added the documents' ``sources``). Part of the shard folders'
fingerprints, so a re-run never resumes into, or trains on, rows written without the fields it reads."""


@dataclass
class TokenizedDocument:
    """One document as tokens.

    Attributes:
        doc_id: the normalized document's id.
        tokens: the whole document, ``<s>`` ... ``</s>``, as an ``array("i")`` of int32 ids (the
            shards' dtype: an image's block and a whole document are appended to a sequence as a
            memory copy, and a sequence becomes a numpy array without converting each id).
        images: encoded image bytes, one per ``<BoI>`` in ``tokens``, in order.
        image_starts: position of each ``<BoI>`` in ``tokens``.
        breaks: sorted positions where a part may start/end (sentence-unit boundaries), with 0 and
            ``len(tokens)``.
        kind: ``interleaved``, ``pair`` or ``instruction``.
        source: the corpus it came from (the normalized document's ``source``: ``mmc4``, ``laion``, ...).
        loss_mask: instruction documents: ``array("B")`` aligned with ``tokens``, 1 where the token is a
            trained target; None: every token is (the model's defaults).
        image_trained: instruction documents: per image, whether it gets the diffusion loss.
    """

    doc_id: str
    tokens: array
    images: list[bytes]
    image_starts: list[int]
    breaks: list[int]
    kind: str = "interleaved"
    source: str = ""
    loss_mask: array | None = None
    image_trained: list[bool] | None = None


@dataclass
class PackedSequence:
    """One packed sequence (unpadded).

    Attributes:
        input_ids: ``(T,)`` int32, ``T <= max_length``.
        cu_seqlens: ``(D + 1,)`` int32, segment boundaries (0, ..., T); one segment per document part.
        doc_ids: ``D`` document ids.
        parts: ``D`` part numbers (0 for a document's first part).
        offsets: ``D`` positions of each segment's first token in its document's token stream.
        images: encoded bytes, one per ``<BoI>`` in row order.
        kinds: ``D`` document kinds (``interleaved`` | ``pair`` | ``instruction``).
        sources: ``D`` document sources (``mmc4``, ``laion``, ...: what training's ``source_rates`` reweight).
        loss_mask: ``(T,)`` uint8, 1 where the token is a trained target; only in a sequence holding an
            instruction document (None: every token is).
        image_trained: per image, whether it gets the diffusion loss; set with ``loss_mask``.
    """

    input_ids: np.ndarray
    cu_seqlens: np.ndarray
    doc_ids: list[str]
    parts: list[int]
    offsets: list[int]
    images: list[bytes]
    kinds: list[str]
    sources: list[str]
    loss_mask: np.ndarray | None = None
    image_trained: list[bool] | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to_sample(self, key: str, image_ext: str | Sequence[str] = "jpg") -> dict[str, Any]:
        """A WebDataset sample: ``KEY.input_ids.npy``, ``KEY.cu_seqlens.npy``, ``KEY.json`` and
        ``KEY.NNN.<image_ext>`` per image (raw bytes, decoded by extension on read). ``image_ext`` is one
        extension for every image or one per image (JSON ``image_exts``). A sequence with a loss mask adds
        ``KEY.loss_mask.npy`` and the JSON's ``image_trained``."""
        if "." in key:
            raise ValueError(f"WebDataset keys may not contain dots: {key!r}")
        info: dict[str, Any] = {"doc_ids": self.doc_ids, "parts": self.parts, "offsets": self.offsets,
                                "kinds": self.kinds, "sources": self.sources, "num_images": len(self.images)}
        if isinstance(image_ext, str):
            info["image_ext"] = image_ext
            extensions = [image_ext] * len(self.images)
        else:
            extensions = info["image_exts"] = list(image_ext)
            if len(extensions) != len(self.images):
                raise ValueError(f"{len(extensions)} image extensions for {len(self.images)} images")
        sample: dict[str, Any] = {"__key__": key, "input_ids.npy": self.input_ids, "cu_seqlens.npy": self.cu_seqlens,
                                  "json": info}
        if self.loss_mask is not None:
            sample["loss_mask.npy"] = self.loss_mask
            info["image_trained"] = self.image_trained
        for i, (data, ext) in enumerate(zip(self.images, extensions)):
            sample[f"{i:03d}.{ext}"] = data
        return sample


@dataclass
class PackingStats:
    """Counts for the asset's metadata (and the benchmark)."""

    documents: int = 0
    documents_skipped: int = 0
    sequences: int = 0
    text_tokens: int = 0
    image_tokens: int = 0
    images: int = 0
    images_missing: int = 0
    images_after_text: int = 0
    """Images with text of their document before them: the examples the image decoder learns to draw a prompt from
    (a pair packed caption-first, an interleaved image after a sentence). An image with nothing before it trains no
    drawing from text."""
    split_documents: int = 0
    forced_splits: int = 0
    padding_tokens: int = 0
    seconds: float = 0.0

    @property
    def tokens(self) -> int:
        return self.text_tokens + self.image_tokens


# 1. tokenize ------------------------------------------------------------------------------------
def _uniforms(seed: int, doc_id: str) -> Iterator[float]:
    """Uniform draws in [0, 1) for one document, a pure function of ``(seed, doc_id)``: 53-bit
    numbers cut from ``blake2b(f"{seed}:{doc_id}:{block}")`` (8 per block), hashed only when drawn.

    Seeding a ``random.Random`` per document (as packing did first) costs ~20 µs here, as much as
    tokenizing a short document; a hash costs ~1 µs. Any document gets the same layout in any
    shard, worker or order."""
    key = f"{seed}:{doc_id}:".encode()
    for block in itertools.count():
        for value in _EIGHT_U64.unpack(hashlib.blake2b(key + str(block).encode()).digest()):
            yield (value >> 11) * _INV_2_53


_INV_2_53 = 1.0 / (1 << 53)
_EIGHT_U64 = struct.Struct("<8Q")
_NO_IMAGES: tuple[bytes, ...] = ()

Unit = tuple[Sequence[bytes], str, Sequence[bytes]]
"""A sentence unit: (images before the text, the text, images after it); the text may be empty."""


def _image_bytes(element: dict[str, Any], images: Mapping[str, bytes]) -> bytes | None:
    if element.get("status") not in (None, IMAGE_STATUS_OK):
        return None
    key = element.get("key")
    if key is not None and key in images:
        return images[key]
    url = element.get("url")
    return images[url] if url is not None and url in images else None


def _layout(document: dict[str, Any], config: PackingConfig, images: Mapping[str, bytes],
            recaptions: Mapping[str, str] | None, stats: PackingStats, handler: Handler) -> list[Unit] | None:
    """The document as sentence units, images resolved to bytes; None if it has neither text nor images."""
    doc_id = document["doc_id"]
    groups: list[tuple[list[bytes], str]] = []  # (images waiting for this text, the text)
    pending: list[bytes] = []
    n_images = 0
    for index, element in enumerate(document["elements"]):
        if element["type"] == "text":
            groups.append((pending, element["text"] or ""))
            pending = []
            continue
        data = _image_bytes(element, images)
        if data is None:
            stats.images_missing += 1
            handler(BadRecord(doc_id, index, f"image not available (status={element.get('status')}, key={element.get('key')})"))
            continue
        pending.append(data)
        n_images += 1
    if not n_images and not any(text for _, text in groups):
        return None
    draws = _uniforms(config.seed, doc_id)
    if document["kind"] == "pair":
        pictures = [data for group, _ in groups for data in group] + pending
        caption = " ".join([text for _, text in groups])
        if recaptions is not None and doc_id in recaptions:
            caption = recaptions[doc_id]
        if config.lowercase_pair_captions:
            caption = caption.lower()
        if next(draws) < config.pair_image_first_probability:
            return [(pictures, caption, _NO_IMAGES)]
        return [(_NO_IMAGES, caption, pictures)]
    after_probability = config.image_after_probability
    units: list[Unit] = []
    for index, (pictures, text) in enumerate(groups):
        text = f" {text}" if index else text  # sentences joined by one space, as the public MMC4 loaders join them
        if not pictures:
            units.append((_NO_IMAGES, text, _NO_IMAGES))
            continue
        before: list[bytes] = []
        after: list[bytes] = []
        for data in pictures:
            (after if next(draws) < after_probability else before).append(data)
        units.append((before, text, after))
    if pending:
        units.append((pending, "", _NO_IMAGES))
    return units


@dataclass
class _InstructionPlan:
    """An instruction document's units (one per text or image) with what the packer needs beyond the text."""

    units: list[Unit]
    trained: list[bool]
    """Per unit: an answer's (trained) or an instruction's."""
    round_starts: list[int]
    """Units that start a new round (an instruction after an answer): where the document may be split."""


def _instruction_plan(document: dict[str, Any], images: Mapping[str, bytes], stats: PackingStats,
                      handler: Handler) -> _InstructionPlan | None:
    """The document's elements in order, one unit each, a text after a text with one space before it; None (and
    the reason to ``handler``) when an image has no bytes or nothing is trained."""
    doc_id = document["doc_id"]
    plan = _InstructionPlan([], [], [])
    after_text = False
    for index, element in enumerate(document["elements"]):
        answer = element.get("role") == ANSWER_ROLE
        if element["type"] == "text":
            text = element["text"] or ""
            if not text:
                continue
            unit: Unit = (_NO_IMAGES, f" {text}" if after_text else text, _NO_IMAGES)
        else:
            data = _image_bytes(element, images)
            if data is None:
                stats.images_missing += 1
                handler(BadRecord(doc_id, index, f"image not available (key={element.get('key')}): the instruction "
                                                 "document is skipped, its images' places would be lost"))
                return None
            unit = ((data,), "", _NO_IMAGES)
        if plan.trained and plan.trained[-1] and not answer:
            plan.round_starts.append(len(plan.units))
        plan.units.append(unit)
        plan.trained.append(answer)
        after_text = element["type"] == "text"
    if not any(plan.trained):
        handler(BadRecord(doc_id, -1, "instruction document has no answer to train on"))
        return None
    return plan


def tokenize_documents(
    documents: Iterable[dict[str, Any]],
    tokenizer,
    config: PackingConfig = PackingConfig(),
    *,
    images: Mapping[str, bytes],
    recaptions: Mapping[str, str] | None = None,
    ids: TokenIds | None = None,
    boi_token: str = TINY_BOI_TOKEN,
    image_token: str = TINY_IMAGE_TOKEN,
    stats: PackingStats | None = None,
    handler: Handler = warn_and_continue,
) -> Iterator[TokenizedDocument]:
    """Tokenize documents (see the module docstring). ``images`` maps an element's download ``key``
    (or its ``url``) to encoded bytes; an image without bytes or with a failed status is left out
    and reported to ``handler``. ``recaptions`` maps pair ``doc_id`` to a BLIP-2 caption: a pair
    found there is packed with its recaption instead of its source text. ``tokenizer`` is a Hugging Face fast tokenizer; the image
    tokens are looked up by their names ``boi_token`` and ``image_token`` (the model config's
    ``LanguageConfig.boi_token`` / ``image_token``) unless ``ids`` gives them."""
    ids = ids or token_ids(tokenizer, boi_token=boi_token, image_token=image_token)
    stats = stats if stats is not None else PackingStats()
    encoder = TextEncoder(tokenizer.backend_tokenizer, ids.eos)
    batch: list[tuple[dict[str, Any], list[Unit], _InstructionPlan | None]] = []
    for document in documents:
        plan = None
        if document["kind"] == INSTRUCTION:
            plan = _instruction_plan(document, images, stats, handler)
            units = None if plan is None else plan.units
        else:
            units = _layout(document, config, images, recaptions, stats, handler)
            if units is None:
                handler(BadRecord(document["doc_id"], -1, "document has neither text nor available images"))
        if units is None:
            stats.documents_skipped += 1
            continue
        batch.append((document, units, plan))
        if len(batch) >= config.tokenize_batch_documents:
            yield from _tokenize_batch(batch, encoder, config, ids, stats)
            batch = []
    if batch:
        yield from _tokenize_batch(batch, encoder, config, ids, stats)


def _tokenize_batch(batch: list[tuple[dict[str, Any], list[Unit], _InstructionPlan | None]], encoder: TextEncoder,
                    config: PackingConfig, ids: TokenIds, stats: PackingStats) -> Iterator[TokenizedDocument]:
    encoded = iter(encoder([text for _, units, _ in batch for _, text, _ in units if text]))
    image_block = array(_INT32, [ids.boi] + [ids.image] * config.num_image_tokens)
    first = array(_INT32, [ids.bos])
    eos, block = ids.eos, len(image_block)
    for document, units, plan in batch:
        tokens = first[:]
        pictures: list[bytes] = []
        starts: list[int] = []
        breaks = [0]
        text_seen = False
        for before, text, after in units:
            for _ in before:
                starts.append(len(tokens))
                tokens += image_block
            pictures += before
            stats.images_after_text += len(before) if text_seen else 0
            if text:
                tokens.extend(next(encoded))
                text_seen = True
            stats.images_after_text += len(after) if text_seen else 0
            for _ in after:
                starts.append(len(tokens))
                tokens += image_block
            pictures += after
            breaks.append(len(tokens))
        tokens.append(eos)
        breaks[-1] = len(tokens)  # </s> belongs to the last unit
        stats.text_tokens += len(tokens) - block * len(pictures)
        stats.image_tokens += block * len(pictures)
        stats.images += len(pictures)
        stats.documents += 1
        if plan is None:
            yield TokenizedDocument(document["doc_id"], tokens, pictures, starts, breaks, document["kind"],
                                    document["source"])
        else:
            yield _with_loss_mask(TokenizedDocument(document["doc_id"], tokens, pictures, starts, breaks,
                                                    document["kind"], document["source"]), plan, block)


def _with_loss_mask(doc: TokenizedDocument, plan: _InstructionPlan, block: int) -> TokenizedDocument:
    """An instruction document's loss mask and image flags from its units' spans (``doc.breaks``: one break after
    each unit, the last unit's span holding ``</s>``), and its breaks cut down to the round starts."""
    spans = doc.breaks
    mask = array(_UINT8, bytes(len(doc.tokens)))
    for unit, trained in enumerate(plan.trained):
        if trained:
            mask[spans[unit]: spans[unit + 1]] = array(_UINT8, b"\x01" * (spans[unit + 1] - spans[unit]))
    mask[0] = 0  # <s> is never a target
    placeholders = array(_UINT8, bytes(block - 1))
    for start in doc.image_starts:
        mask[start + 1: start + block] = placeholders
    doc.loss_mask = mask
    doc.image_trained = [trained for (before, _, _), trained in zip(plan.units, plan.trained) if before]
    doc.breaks = [0, *(spans[unit] for unit in plan.round_starts), len(doc.tokens)]
    return doc


# 2. pack ----------------------------------------------------------------------------------------
class _Builder:
    def __init__(self) -> None:
        self.tokens = array(_INT32)
        self.cu = [0]
        self.doc_ids: list[str] = []
        self.parts: list[int] = []
        self.offsets: list[int] = []
        self.images: list[bytes] = []
        self.kinds: list[str] = []
        self.sources: list[str] = []
        self.loss_mask: array | None = None
        self.image_trained: list[bool] | None = None

    def add(self, doc: TokenizedDocument, start: int, end: int, part: int) -> None:
        images_before = len(self.images)
        if start == 0 and end == len(doc.tokens):
            self.tokens += doc.tokens
            self.images += doc.images
        else:
            self.tokens += doc.tokens[start:end]
            lo = bisect.bisect_left(doc.image_starts, start)
            hi = bisect.bisect_left(doc.image_starts, end)
            self.images += doc.images[lo:hi]
        self.cu.append(len(self.tokens))
        self.doc_ids.append(doc.doc_id)
        self.parts.append(part)
        self.offsets.append(start)
        self.kinds.append(doc.kind)
        self.sources.append(doc.source)
        if doc.loss_mask is not None or self.loss_mask is not None:
            self._add_masks(doc, start, end, images_before)

    def _add_masks(self, doc: TokenizedDocument, start: int, end: int, images_before: int) -> None:
        """Extend the loss mask and image flags by the part just added (a document without them: all trained;
        the first document with them also fills them in for the documents before it)."""
        added_images = len(self.images) - images_before
        if self.loss_mask is None:
            self.loss_mask = array(_UINT8, b"\x01" * (len(self.tokens) - (end - start)))
            self.image_trained = [True] * images_before
        if doc.loss_mask is None or doc.image_trained is None:
            self.loss_mask += array(_UINT8, b"\x01" * (end - start))
            self.image_trained += [True] * added_images
            return
        self.loss_mask += doc.loss_mask[start:end]
        first = bisect.bisect_left(doc.image_starts, start)
        self.image_trained += doc.image_trained[first: first + added_images]

    def build(self) -> PackedSequence:
        mask = None if self.loss_mask is None else np.frombuffer(self.loss_mask, dtype=np.uint8)
        return PackedSequence(np.frombuffer(self.tokens, dtype=np.int32), np.asarray(self.cu, dtype=np.int32),
                              self.doc_ids, self.parts, self.offsets, self.images, self.kinds, self.sources, mask,
                              self.image_trained)


def _forced_cut(doc: TokenizedDocument, start: int, limit: int, block: int) -> int:
    """The furthest cut ``<= limit`` after ``start`` that does not fall inside an image block."""
    cut = limit
    i = bisect.bisect_right(doc.image_starts, cut) - 1
    if i >= 0 and doc.image_starts[i] < cut < doc.image_starts[i] + block:
        cut = doc.image_starts[i]
    if cut <= start:
        raise ValueError(f"cannot fit an image of {block} tokens in a sequence (document {doc.doc_id})")
    return cut


def pack_tokenized(
    documents: Iterable[TokenizedDocument],
    config: PackingConfig = PackingConfig(),
    *,
    stats: PackingStats | None = None,
) -> Iterator[PackedSequence]:
    """Greedy packing into sequences of at most ``config.max_length`` tokens and at most
    ``config.max_images_per_sequence`` images (see module docstring)."""
    stats = stats if stats is not None else PackingStats()
    max_length = config.max_length
    max_images = config.max_images_per_sequence
    block = config.num_image_tokens + 1
    current = _Builder()

    def flush() -> Iterator[PackedSequence]:
        nonlocal current
        if current.tokens:
            sequence = current.build()
            stats.sequences += 1
            stats.padding_tokens += max_length - len(sequence)
            yield sequence
        current = _Builder()

    for doc in documents:
        n = len(doc.tokens)
        images_fit_here = max_images is None or len(current.images) + len(doc.images) <= max_images
        images_fit_alone = max_images is None or len(doc.images) <= max_images
        if n <= max_length - len(current.tokens) and images_fit_here:
            current.add(doc, 0, n, 0)
            continue
        if n <= max_length and images_fit_alone:
            yield from flush()
            current.add(doc, 0, n, 0)
            continue
        stats.split_documents += 1
        start, part = 0, 0
        while start < n:
            limit = start + max_length - len(current.tokens)
            if max_images is not None:  # the part must end before the first image over the cap
                over = bisect.bisect_left(doc.image_starts, start) + max_images - len(current.images)
                if over < len(doc.image_starts):
                    limit = min(limit, doc.image_starts[over])
            if limit >= n:
                current.add(doc, start, n, part)
                break
            end = doc.breaks[bisect.bisect_right(doc.breaks, limit) - 1]
            if end <= start:
                if current.tokens:  # the next unit does not fit here: continue in a new sequence
                    yield from flush()
                    continue
                end = _forced_cut(doc, start, limit, block)
                stats.forced_splits += 1
            current.add(doc, start, end, part)
            start, part = end, part + 1
            yield from flush()
    yield from flush()


def pack_documents(
    documents: Iterable[dict[str, Any]],
    tokenizer,
    config: PackingConfig = PackingConfig(),
    *,
    images: Mapping[str, bytes],
    recaptions: Mapping[str, str] | None = None,
    stats: PackingStats | None = None,
    handler: Handler = warn_and_continue,
    boi_token: str = TINY_BOI_TOKEN,
    image_token: str = TINY_IMAGE_TOKEN,
) -> Iterator[PackedSequence]:
    """Normalized documents -> packed sequences: :func:`tokenize_documents` then :func:`pack_tokenized`.
    ``boi_token`` and ``image_token`` name the tokenizer's image tokens (the model config's
    ``LanguageConfig.boi_token`` / ``image_token``; the defaults are the tiny preset's).
    ``stats`` (if given) is filled as the generator runs; ``stats.seconds`` is the wall time spent."""
    stats = stats if stats is not None else PackingStats()
    tokenized = tokenize_documents(documents, tokenizer, config, images=images, recaptions=recaptions,
                                   boi_token=boi_token, image_token=image_token, stats=stats, handler=handler)
    packed = pack_tokenized(tokenized, config, stats=stats)
    while True:
        start = time.perf_counter()
        try:
            sequence = next(packed)
        except StopIteration:
            stats.seconds += time.perf_counter() - start
            return
        stats.seconds += time.perf_counter() - start
        yield sequence


def unpack(sequences: Iterable[PackedSequence], boi_id: int) -> dict[str, tuple[list[int], list[bytes]]]:
    """Reassemble every document's tokens and images from its parts (for integrity checks and tests).

    Raises ``ValueError`` when a document's parts are not numbered 0..k-1 or do not follow each other."""
    pieces: dict[str, list[tuple[int, int, list[int], list[bytes]]]] = {}
    for sequence in sequences:
        image_index = 0
        for d, doc_id in enumerate(sequence.doc_ids):
            segment = sequence.input_ids[sequence.cu_seqlens[d]: sequence.cu_seqlens[d + 1]]
            count = int((segment == boi_id).sum())
            pieces.setdefault(doc_id, []).append((sequence.parts[d], sequence.offsets[d], segment.tolist(),
                                                  sequence.images[image_index: image_index + count]))
            image_index += count
        if image_index != len(sequence.images):
            raise ValueError(f"sequence has {len(sequence.images)} images but {image_index} <BoI> tokens")
    out = {}
    for doc_id, found in pieces.items():
        found.sort(key=lambda p: p[0])
        if [p[0] for p in found] != list(range(len(found))):
            raise ValueError(f"document {doc_id} has parts {[p[0] for p in found]}")
        tokens: list[int] = []
        for _, offset, segment, _ in found:
            if offset != len(tokens):
                raise ValueError(f"document {doc_id}: a part starts at {offset}, expected {len(tokens)}")
            tokens.extend(segment)
        out[doc_id] = (tokens, [i for p in found for i in p[3]])
    return out
