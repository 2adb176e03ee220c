"""Streaming readers for source metadata as released, yielding normalized documents.

Every reader is a generator over one input shard with constant memory (line by line, or parquet
record batches). A malformed record is reported to ``handler`` as a :class:`BadRecord`
(file:line and reason) and skipped; the rest of the shard is processed.

- :func:`read_mmc4`: MMC4 ``docs_shard_{i}_v2.jsonl.zip`` or plain ``.jsonl``.
- :func:`read_pairs_parquet`: LAION-400M/2B/COCO (``URL``/``TEXT``), ``url``/``caption``,
  DataComp (``uid``/``url``/``text``); columns chosen case-insensitively or given explicitly.
- :func:`read_cc12m_tsv`: ``url<TAB>caption``, with or without a header row.
- :func:`read_source`: picks one of the above from the file name.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlsplit

import pyarrow.parquet as pq

from pipelines.data.documents import image_element, interleave, make_document, make_pair
from pipelines.data.errors import BadRecord, Handler, warn_and_continue

URL_COLUMNS = ("url",)
CAPTION_COLUMNS = ("text", "caption")
ID_COLUMNS = ("uid", "key", "sample_id", "id")


class RecordError(ValueError):
    """Raised inside a reader for one record; turned into a BadRecord for the handler."""


def check_url(url: Any) -> str:
    if not isinstance(url, str) or not url.strip():
        raise RecordError("missing url")
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise RecordError(f"invalid url {url[:100]!r}")
    return url


def _stem(name: str) -> str:
    name = os.path.basename(name)
    for suffix in (".jsonl.zip", ".jsonl", ".parquet", ".tsv", ".zip"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


# --------------------------------------------------------------------------------------- MMC4


def parse_mmc4_record(raw: Any, doc_id: str, source_file: str, line: int) -> dict[str, Any]:
    """One MMC4 json object → an interleaved document. Raises RecordError when malformed."""
    if not isinstance(raw, dict):
        raise RecordError(f"expected a JSON object, got {type(raw).__name__}")
    sentences = raw.get("text_list")
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise RecordError("text_list must be a list of strings")
    infos = raw.get("image_info")
    if not isinstance(infos, list):
        raise RecordError("image_info must be a list")
    images = []
    faces = []
    for i, info in enumerate(infos):
        if not isinstance(info, dict):
            raise RecordError(f"image_info[{i}] must be an object")
        try:
            url = check_url(info.get("raw_url"))
        except RecordError as err:
            raise RecordError(f"image_info[{i}]: {err}") from None
        index = info.get("matched_text_index")
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(sentences):
            raise RecordError(
                f"image_info[{i}].matched_text_index {index!r} not in [0, {len(sentences)})"
            )
        sim = info.get("matched_sim")
        if sim is not None and (isinstance(sim, bool) or not isinstance(sim, (int, float)) or math.isnan(sim)):
            raise RecordError(f"image_info[{i}].matched_sim {sim!r} is not a number")
        images.append(
            image_element(url, image_name=info.get("image_name"), matched_text_index=index, matched_sim=sim,
                          source_id=info.get("image_name"))
        )
        faces.append(info.get("face_detections"))
    similarity = raw.get("similarity_matrix")
    if similarity is not None:
        if not isinstance(similarity, list) or len(similarity) != len(infos) or not all(
            isinstance(row, list) and len(row) == len(sentences) for row in similarity
        ):
            raise RecordError(
                f"similarity_matrix must be {len(infos)} x {len(sentences)} (images x sentences)"
            )
    page_url = raw.get("url")
    meta = {
        "could_have_url_duplicate": raw.get("could_have_url_duplicate"),
        "similarity_matrix": similarity,
        "face_detections": faces,
    }
    return make_document(
        doc_id=doc_id, source="mmc4", kind="interleaved", source_file=source_file, source_row=line,
        page_url=page_url if isinstance(page_url, str) else None, elements=interleave(sentences, images),
        meta=meta,
    )


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def _replace_lone_surrogates(value: Any) -> Any:
    """Strings with unpaired ``\\udXXX`` escapes (seen in crawled text) get U+FFFD in their place:
    JSON allows them, UTF-8 (and so parquet) does not."""
    if isinstance(value, str):
        return _LONE_SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_replace_lone_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {k: _replace_lone_surrogates(v) for k, v in value.items()}
    return value


def _mmc4_lines(lines: Iterator[bytes], label: str, stem: str, handler: Handler) -> Iterator[dict[str, Any]]:
    for line_no, raw_line in enumerate(lines, start=1):
        try:
            text = raw_line.decode("utf-8").strip()
            if not text:
                raise RecordError("empty line")
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as err:
                raise RecordError(f"invalid JSON: {err.msg} at column {err.colno}") from None
            if "\\ud" in text or "\\uD" in text:
                raw = _replace_lone_surrogates(raw)
            yield parse_mmc4_record(raw, f"mmc4:{stem}:{line_no}", label, line_no)
        except UnicodeDecodeError:
            handler(BadRecord(label, line_no, "not valid UTF-8"))
        except RecordError as err:
            handler(BadRecord(label, line_no, str(err)))


def read_mmc4(path: str | os.PathLike, handler: Handler = warn_and_continue) -> Iterator[dict[str, Any]]:
    """MMC4 documents from ``*.jsonl`` or a released ``*.jsonl.zip`` (every ``.jsonl`` member)."""
    path = str(path)
    name = os.path.basename(path)
    if path.endswith(".zip"):
        with zipfile.ZipFile(path) as archive:
            for member in sorted(m for m in archive.namelist() if m.endswith(".jsonl")):
                with archive.open(member) as lines:
                    yield from _mmc4_lines(lines, f"{name}/{member}", _stem(member), handler)
    else:
        with open(path, "rb") as lines:
            yield from _mmc4_lines(lines, name, _stem(name), handler)


# ------------------------------------------------------------------------------------- pairs


def _pick_column(names: Sequence[str], wanted: str | None, candidates: Sequence[str], what: str,
                 required: bool = True) -> str | None:
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"{what} column {wanted!r} not found; columns are {list(names)}")
        return wanted
    lowered = {n.lower(): n for n in names}
    for candidate in candidates:
        if candidate in lowered:
            return lowered[candidate]
    if required:
        raise ValueError(f"no {what} column among {list(names)} (looked for {list(candidates)}, any case)")
    return None


def _caption(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecordError("missing caption")
    return value.strip()


def read_pairs_parquet(
    path: str | os.PathLike,
    handler: Handler = warn_and_continue,
    *,
    source: str = "laion",
    url_col: str | None = None,
    caption_col: str | None = None,
    id_col: str | None = None,
    batch_size: int = 4096,
) -> Iterator[dict[str, Any]]:
    """Image-text pairs from LAION / DataComp style parquet, streamed by record batch.

    Other columns (similarity, WIDTH, sha256, ...) go to ``meta``. ``line`` in reports is the
    0-based row number.
    """
    name = os.path.basename(str(path))
    stem = _stem(name)
    parquet = pq.ParquetFile(path)
    names = parquet.schema_arrow.names
    url_name = _pick_column(names, url_col, URL_COLUMNS, "url")
    caption_name = _pick_column(names, caption_col, CAPTION_COLUMNS, "caption")
    id_name = _pick_column(names, id_col, ID_COLUMNS, "id", required=False)
    row = 0
    for batch in parquet.iter_batches(batch_size=batch_size):
        for record in batch.to_pylist():
            try:
                url = check_url(record.get(url_name))
                caption = _caption(record.get(caption_name))
                source_id = record.get(id_name) if id_name else None
                meta = {k: v for k, v in record.items() if k not in (url_name, caption_name, id_name)}
                yield make_pair(
                    doc_id=f"{source}:{stem}:{row}", source=source, url=url, caption=caption,
                    source_file=name, source_row=row,
                    source_id=None if source_id is None else str(source_id), meta=meta,
                )
            except RecordError as err:
                handler(BadRecord(name, row, str(err)))
            row += 1


def read_cc12m_tsv(
    path: str | os.PathLike,
    handler: Handler = warn_and_continue,
    *,
    header: bool | None = None,
    source: str = "cc12m",
) -> Iterator[dict[str, Any]]:
    """CC-12M pairs from ``url<TAB>caption`` lines.

    ``header=None`` detects a first line that names the columns (``url`` and ``caption``, any
    case, any order); ``True``/``False`` force it.
    """
    name = os.path.basename(str(path))
    stem = _stem(name)
    url_index, caption_index = 0, 1
    with open(path, "rb") as lines:
        for line_no, raw_line in enumerate(lines, start=1):
            try:
                text = raw_line.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError:
                handler(BadRecord(name, line_no, "not valid UTF-8"))
                continue
            fields = text.split("\t")
            if line_no == 1:
                lowered = [f.strip().lower() for f in fields]
                is_header = header if header is not None else sorted(lowered) == ["caption", "url"]
                if is_header:
                    if sorted(lowered) == ["caption", "url"]:
                        url_index, caption_index = lowered.index("url"), lowered.index("caption")
                    continue
            try:
                if not text.strip():
                    raise RecordError("empty line")
                if len(fields) != 2:
                    raise RecordError(f"expected 2 tab-separated fields, got {len(fields)}")
                url = check_url(fields[url_index])
                caption = _caption(fields[caption_index])
                yield make_pair(
                    doc_id=f"{source}:{stem}:{line_no}", source=source, url=url, caption=caption,
                    source_file=name, source_row=line_no,
                )
            except RecordError as err:
                handler(BadRecord(name, line_no, str(err)))


def read_source(path: str | os.PathLike, handler: Handler = warn_and_continue, **options: Any) -> Iterator[dict[str, Any]]:
    """Dispatch on the file name: ``.jsonl``/``.jsonl.zip`` → MMC4, ``.parquet`` → pairs,
    ``.tsv`` → CC-12M."""
    name = str(path)
    if name.endswith((".jsonl", ".jsonl.zip")):
        return read_mmc4(path, handler, **options)
    if name.endswith(".parquet"):
        return read_pairs_parquet(path, handler, **options)
    if name.endswith(".tsv"):
        return read_cc12m_tsv(path, handler, **options)
    raise ValueError(f"unknown source format for {Path(name).name!r} (expected .jsonl, .jsonl.zip, .parquet, .tsv)")
