"""The normalized document: one schema for interleaved documents (MMC4, OBELICS, sample-world
stories) and for image-text pairs (LAION, CC-12M, DataComp).

A document is a plain dict (picklable, cheap) that matches :data:`DOCUMENT_SCHEMA`::

    {
      "doc_id": "mmc4:docs_shard_0_v2:17",   # source:shard:row, unique and stable across re-runs
      "source": "mmc4",                       # mmc4 | laion | cc12m | obelics | omnicorpus | mint1t | sample_world
      "kind": "interleaved",                  # interleaved | pair | instruction
      "source_file": "docs_shard_0_v2.jsonl.zip",
      "source_row": 17,                       # 1-based line (text formats) or 0-based row (parquet)
      "page_url": "https://...",              # MMC4's document url; None for pairs
      "elements": [ {element}, ... ],         # reading order
      "meta": "{...}",                        # JSON string of source fields weft does not model
    }

An element is either text or image; unused fields are None::

    {"type": "text",  "text": "A sentence.", "sentence_index": 0, ...}
    {"type": "image", "url": "http://...", "image_name": "...", "matched_text_index": 0,
     "matched_sim": 0.31, "source_id": "...",      # from the source
     "key": None, "status": None, "error": None, "sha256": None}   # filled by the download stage

MMC4 documents place every image immediately before the sentence it is matched to (images matched to
the same sentence keep their source order); web documents given as parallel lists (OBELICS,
OmniCorpus, MINT-1T) keep the source's order, each image matched to the text after it. Pairs are
``[image, text(caption)]``.

Instruction documents (supervised fine-tuning data, :mod:`pipelines.data.instructions`) keep their
elements in conversation order and give each a ``"role"``: :data:`INSTRUCTION_ROLE` (a human turn: context,
not trained) or :data:`ANSWER_ROLE` (a gpt turn: trained). They are read from their JSON files straight
into the packer; ``role`` is not a column of :data:`ELEMENT_TYPE`.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.files import atomic_path

ELEMENT_TYPE = pa.struct(
    [
        pa.field("type", pa.string(), nullable=False),
        pa.field("text", pa.string()),
        pa.field("sentence_index", pa.int32()),
        pa.field("url", pa.string()),
        pa.field("image_name", pa.string()),
        pa.field("matched_text_index", pa.int32()),
        pa.field("matched_sim", pa.float64()),  # float64: a score at the threshold stays at it
        pa.field("source_id", pa.string()),
        pa.field("key", pa.string()),
        pa.field("status", pa.string()),
        pa.field("error", pa.string()),
        pa.field("sha256", pa.string()),
    ]
)

DOCUMENT_SCHEMA = pa.schema(
    [
        pa.field("doc_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("source_file", pa.string()),
        pa.field("source_row", pa.int64()),
        pa.field("page_url", pa.string()),
        pa.field("elements", pa.list_(ELEMENT_TYPE), nullable=False),
        pa.field("meta", pa.string()),
    ]
)

KINDS = ("interleaved", "pair", "instruction")
INSTRUCTION_ROLE, ANSWER_ROLE = "instruction", "answer"
"""An instruction document's element roles: not trained (the prompt) / trained (the answer)."""
IMAGE_STATUS_OK = "ok"


def text_element(text: str, sentence_index: int | None = None) -> dict[str, Any]:
    return _element("text", text=text, sentence_index=sentence_index)


def image_element(
    url: str,
    *,
    image_name: str | None = None,
    matched_text_index: int | None = None,
    matched_sim: float | None = None,
    source_id: str | None = None,
) -> dict[str, Any]:
    return _element(
        "image",
        url=url,
        image_name=image_name,
        matched_text_index=matched_text_index,
        matched_sim=None if matched_sim is None else float(matched_sim),
        source_id=source_id,
    )


def _element(kind: str, **fields: Any) -> dict[str, Any]:
    element = {name: None for name in ELEMENT_TYPE.names}
    element["type"] = kind
    element.update(fields)
    return element


def make_document(
    *,
    doc_id: str,
    source: str,
    kind: str,
    elements: list[dict[str, Any]],
    source_file: str | None = None,
    source_row: int | None = None,
    page_url: str | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    if kind not in KINDS:
        raise ValueError(f"document kind must be one of {KINDS}, got {kind!r}")
    return {
        "doc_id": doc_id,
        "source": source,
        "kind": kind,
        "source_file": source_file,
        "source_row": source_row,
        "page_url": page_url,
        "elements": elements,
        "meta": json.dumps(json_safe(meta or {}), sort_keys=True, default=str, allow_nan=False),
    }


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None: standard JSON has no NaN (parquet sources have them)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def make_pair(
    *, doc_id: str, source: str, url: str, caption: str, source_file: str | None = None,
    source_row: int | None = None, source_id: str | None = None, matched_sim: float | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """An image-text pair as a one-image document: ``[image, text]``; ``matched_sim`` is the source's own
    image-text similarity (LAION's ``similarity``), the filter's score when there are no CLIP scores."""
    return make_document(
        doc_id=doc_id, source=source, kind="pair", source_file=source_file, source_row=source_row,
        elements=[image_element(url, matched_text_index=0, matched_sim=matched_sim, source_id=source_id),
                  text_element(caption, 0)],
        meta=meta,
    )


def interleave(
    sentences: list[str], images: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Reading order: each image element right before its matched sentence (stable for ties)."""
    by_sentence: dict[int, list[dict[str, Any]]] = {}
    for image in images:
        by_sentence.setdefault(image["matched_text_index"], []).append(image)
    elements: list[dict[str, Any]] = []
    for index, sentence in enumerate(sentences):
        elements.extend(by_sentence.get(index, []))
        elements.append(text_element(sentence, index))
    return elements


def image_elements(document: dict[str, Any]) -> list[dict[str, Any]]:
    return [e for e in document["elements"] if e["type"] == "image"]


def documents_to_table(documents: Iterable[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(documents), schema=DOCUMENT_SCHEMA)


def write_documents(documents: Iterable[dict[str, Any]], path: str | os.PathLike, batch_size: int = 1024) -> int:
    """Stream documents into one parquet file (written atomically: :func:`pipelines.files.atomic_path`).

    Returns the number of documents written. Memory is bounded by ``batch_size`` documents.
    """
    count = 0
    batch: list[dict[str, Any]] = []
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, DOCUMENT_SCHEMA) as writer:
        for document in documents:
            batch.append(document)
            if len(batch) >= batch_size:
                writer.write_table(documents_to_table(batch))
                count += len(batch)
                batch = []
        if batch or count == 0:
            writer.write_table(documents_to_table(batch))
            count += len(batch)
    return count


def read_documents(path: str | os.PathLike, batch_size: int = 1024) -> Iterator[dict[str, Any]]:
    """Stream documents back from a parquet file written by :func:`write_documents`."""
    parquet = pq.ParquetFile(path)
    for batch in parquet.iter_batches(batch_size=batch_size):
        yield from batch.to_pylist()
