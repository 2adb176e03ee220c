"""Streaming readers for source metadata as released, yielding normalized documents.

Every reader is a generator over one input shard with constant memory (line by line, or parquet
record batches). A malformed record is reported to ``handler`` as a :class:`BadRecord`
(file:line and reason) and skipped; the rest of the shard is processed. An image a record names
badly (an unusable URL, a sentence index out of range) is left out of its document with the reason
in the document's ``meta["skipped_images"]``; the document keeps its text and its other images.
A shard that cannot be read as a whole (not a zip, a truncated parquet, no document member, a
required column missing) raises :class:`pipelines.data.errors.ShardError` naming the file and the
cause. Text files may start with a UTF-8 byte-order mark; blank lines at the end of a file are not
records (blank lines between records are bad records).

- :func:`read_mmc4`: MMC4 documents (``.jsonl``, zipped ``.jsonl.zip`` / ``.zip``).
- :func:`read_pairs_parquet`: LAION-400M/2B/COCO (``URL``/``TEXT``), ``url``/``caption``,
  DataComp (``uid``/``url``/``text``); columns chosen case-insensitively or given explicitly.
- :func:`read_cc12m_tsv`: ``url<TAB>caption``, with or without a header row.
- :func:`read_obelics`, :func:`read_omnicorpus`, :func:`read_mint1t`: web documents as parallel
  ``texts`` / ``images`` lists (OBELICS, OmniCorpus-CC, MINT-1T HTML parquet).
- :func:`read_source`: the one entry point: picks one of the above from the source's name (the
  raw folder the shard lies in) or, without it, from the file name and a parquet's columns.
"""

from __future__ import annotations

import json
import math
import os
import re
import zipfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urljoin, urlsplit

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.data.documents import image_element, interleave, make_document, make_pair, text_element
from pipelines.data.errors import BadRecord, Handler, ShardError, warn_and_continue

URL_COLUMNS = ("url",)
CAPTION_COLUMNS = ("text", "caption")
ID_COLUMNS = ("uid", "key", "sample_id", "id")
SIMILARITY_COLUMNS = ("similarity", "clip_b32_similarity_score")
"""The source's own image-text similarity of a pair, first found (any case): LAION's ``similarity`` (CLIP
ViT-B/32), DataComp's ``clip_b32_similarity_score`` (the scale of the filter's ``pair_min_similarity``)."""
_BOM = b"\xef\xbb\xbf"


class RecordError(ValueError):
    """Raised inside a reader for one record; turned into a BadRecord for the handler."""


def check_url(url: Any, base: str | None = None) -> str:
    """An http(s) URL, stripped; a protocol-relative (``//host/a.jpg``) or relative one is resolved against the
    page it was found on (``base``), as a browser does."""
    if not isinstance(url, str) or not url.strip():
        raise RecordError("missing url")
    url = url.strip()
    if base and not urlsplit(url).scheme and urlsplit(base).scheme.lower() in ("http", "https"):
        url = urljoin(base, url)
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


def _numbered_lines(lines: Iterable[bytes], label: str, handler: Handler) -> Iterator[tuple[int, str]]:
    """``(1-based line number, text)`` of every non-blank line: a UTF-8 byte-order mark on line 1 removed, a line
    that is not UTF-8 reported, a blank line reported once a record follows it (trailing blank lines are not
    records)."""
    blank: list[int] = []
    for line_no, raw_line in enumerate(lines, start=1):
        if line_no == 1 and raw_line.startswith(_BOM):
            raw_line = raw_line[len(_BOM):]
        if not raw_line.strip():
            blank.append(line_no)
            continue
        for empty in blank:
            handler(BadRecord(label, empty, "empty line"))
        blank = []
        try:
            yield line_no, raw_line.decode("utf-8")
        except UnicodeDecodeError:
            handler(BadRecord(label, line_no, "not valid UTF-8"))


def _skipped(skipped: list[dict[str, Any]], index: int, reason: str) -> None:
    skipped.append({"index": index, "reason": reason})


# --------------------------------------------------------------------------------------- MMC4


def parse_mmc4_record(raw: Any, doc_id: str, source_file: str, line: int) -> dict[str, Any]:
    """One MMC4 json object → an interleaved document. Raises RecordError when the record is malformed; an image
    that is (bad ``raw_url``, ``matched_text_index`` or ``matched_sim``) is left out with its reason in
    ``meta["skipped_images"]`` (``index`` = its position in ``image_info``). Protocol-relative and relative image
    URLs are resolved against the document's ``url``."""
    if not isinstance(raw, dict):
        raise RecordError(f"expected a JSON object, got {type(raw).__name__}")
    sentences = raw.get("text_list")
    if not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences):
        raise RecordError("text_list must be a list of strings")
    infos = raw.get("image_info")
    if not isinstance(infos, list):
        raise RecordError("image_info must be a list")
    page_url = raw.get("url") if isinstance(raw.get("url"), str) else None
    images = []
    faces = []
    skipped: list[dict[str, Any]] = []
    for i, info in enumerate(infos):
        try:
            images.append(_mmc4_image(info, len(sentences), page_url))
            faces.append(info.get("face_detections"))
        except RecordError as err:
            _skipped(skipped, i, f"image_info[{i}]: {err}")
    similarity = raw.get("similarity_matrix")
    if similarity is not None:
        if not isinstance(similarity, list) or len(similarity) != len(infos) or not all(
            isinstance(row, list) and len(row) == len(sentences) for row in similarity
        ):
            raise RecordError(
                f"similarity_matrix must be {len(infos)} x {len(sentences)} (images x sentences)"
            )
    meta = {
        "could_have_url_duplicate": raw.get("could_have_url_duplicate"),
        "similarity_matrix": similarity,
        "face_detections": faces,
    }
    if skipped:
        meta["skipped_images"] = skipped
    return make_document(
        doc_id=doc_id, source="mmc4", kind="interleaved", source_file=source_file, source_row=line,
        page_url=page_url, elements=interleave(sentences, images), meta=meta,
    )


def _mmc4_image(info: Any, n_sentences: int, page_url: str | None) -> dict[str, Any]:
    if not isinstance(info, dict):
        raise RecordError("must be an object")
    url = check_url(info.get("raw_url"), page_url)
    index = info.get("matched_text_index")
    if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < n_sentences:
        raise RecordError(f"matched_text_index {index!r} not in [0, {n_sentences})")
    sim = info.get("matched_sim")
    if sim is not None and (isinstance(sim, bool) or not isinstance(sim, (int, float)) or math.isnan(sim)):
        raise RecordError(f"matched_sim {sim!r} is not a number")
    return image_element(url, image_name=info.get("image_name"), matched_text_index=index, matched_sim=sim,
                         source_id=info.get("image_name"))


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
    for line_no, line in _numbered_lines(lines, label, handler):
        text = line.strip()
        try:
            try:
                raw = json.loads(text)
            except json.JSONDecodeError as err:
                raise RecordError(f"invalid JSON: {err.msg}: column {err.colno}") from None
            if "\\ud" in text or "\\uD" in text:
                raw = _replace_lone_surrogates(raw)
            yield parse_mmc4_record(raw, f"mmc4:{stem}:{line_no}", label, line_no)
        except RecordError as err:
            handler(BadRecord(label, line_no, str(err)))


def _is_os_metadata(member: str) -> bool:
    """Archive members an OS adds beside the data: macOS resource forks (``__MACOSX/``, ``._name``), Finder and
    Explorer files."""
    base = member.rsplit("/", 1)[-1]
    return member.startswith("__MACOSX/") or base.startswith("._") or base in (".DS_Store", "Thumbs.db")


def read_mmc4(path: str | os.PathLike, handler: Handler = warn_and_continue) -> Iterator[dict[str, Any]]:
    """MMC4 documents, one JSON object a line.

    Files: ``*.jsonl``, or a zip of them: ``docs_shard_{i}_v2.jsonl.zip`` and ``docs_no_face_shard_{i}_v2.jsonl.zip``
    as released, ``shard_{i}.zip`` as common download scripts save them, any ``*.zip``. Every file member of a zip
    is read, whatever its name, except what an OS adds (``__MACOSX/``, ``._*``, ``.DS_Store``); a zip with no such
    member, or that is not a zip, is a :class:`ShardError`.

    Fields: ``text_list`` (sentences), ``image_info`` (``raw_url``, ``matched_text_index``, optional
    ``matched_sim``, ``image_name``, ``face_detections``), optional ``url`` (the page), ``similarity_matrix``
    (images x sentences) and ``could_have_url_duplicate``. Each image goes right before its matched sentence."""
    path = str(path)
    name = os.path.basename(path)
    if not path.endswith(".zip"):
        with open(path, "rb") as lines:
            yield from _mmc4_lines(lines, name, _stem(name), handler)
        return
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise ShardError(name, f"not a zip archive ({err})") from None
    with archive:
        members = sorted(m.filename for m in archive.infolist() if not m.is_dir() and not _is_os_metadata(m.filename))
        if not members:
            raise ShardError(name, f"no document member in the zip (members: {archive.namelist()[:5]})")
        for member in members:
            label = f"{name}/{member}"
            try:
                with archive.open(member) as lines:
                    yield from _mmc4_lines(lines, label, _stem(member), handler)
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                raise ShardError(label, f"corrupt zip member ({type(err).__name__}: {err})") from None


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


def _similarity(value: Any) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"similarity {value!r} is not a number")
    return float(value)


def _parquet(path: str | os.PathLike) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise ShardError(os.path.basename(str(path)), f"not a readable parquet file ({err})") from None


def _batches(parquet: pq.ParquetFile, name: str, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """The rows of ``parquet`` by record batch; a row group that cannot be read is a :class:`ShardError`."""
    batches = parquet.iter_batches(batch_size=batch_size)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            raise ShardError(name, f"unreadable parquet data ({err})") from None
        yield batch.to_pylist()


def read_pairs_parquet(
    path: str | os.PathLike,
    handler: Handler = warn_and_continue,
    *,
    source: str = "laion",
    url_col: str | None = None,
    caption_col: str | None = None,
    id_col: str | None = None,
    similarity_col: str | None = None,
    batch_size: int = 4096,
) -> Iterator[dict[str, Any]]:
    """Image-text pairs from LAION / DataComp style parquet (``part-{i:05d}.parquet``, any ``*.parquet``), streamed
    by record batch.

    Columns, any case unless given: url ``url``; caption ``text`` or ``caption``; id ``uid``, ``key``,
    ``sample_id`` or ``id`` (optional); the source's similarity :data:`SIMILARITY_COLUMNS` (optional: the image's
    ``matched_sim``, which the filter uses when there are no CLIP scores). Other columns (WIDTH, sha256, ...) go to
    ``meta``. ``line`` in reports is the 0-based row number.
    """
    name = os.path.basename(str(path))
    stem = _stem(name)
    parquet = _parquet(path)
    names = parquet.schema_arrow.names
    try:
        url_name = _pick_column(names, url_col, URL_COLUMNS, "url")
        caption_name = _pick_column(names, caption_col, CAPTION_COLUMNS, "caption")
    except ValueError as err:
        raise ShardError(name, str(err)) from None
    id_name = _pick_column(names, id_col, ID_COLUMNS, "id", required=False)
    similarity_name = _pick_column(names, similarity_col, SIMILARITY_COLUMNS, "similarity", required=False)
    modelled = (url_name, caption_name, id_name, similarity_name)
    row = 0
    for records in _batches(parquet, name, batch_size):
        for record in records:
            try:
                url = check_url(record.get(url_name))
                caption = _caption(record.get(caption_name))
                source_id = record.get(id_name) if id_name else None
                similarity = _similarity(record.get(similarity_name)) if similarity_name else None
                meta = {k: v for k, v in record.items() if k not in modelled}
                yield make_pair(
                    doc_id=f"{source}:{stem}:{row}", source=source, url=url, caption=caption,
                    source_file=name, source_row=row, matched_sim=similarity,
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
    """CC-12M pairs from ``url<TAB>caption`` lines (``cc12m.tsv`` as released, ``*.tsv``).

    ``header=None`` detects a first line that names the columns (``url`` and ``caption``, any
    case, any order); ``True``/``False`` force it. A URL never holds a tab, so a caption may: the
    line is split at its first tab (at its last when the header puts the caption first).
    """
    name = os.path.basename(str(path))
    stem = _stem(name)
    url_first = True
    with open(path, "rb") as lines:
        for line_no, line in _numbered_lines(lines, name, handler):
            text = line.rstrip("\r\n")
            if line_no == 1:
                lowered = [f.strip().lower() for f in text.split("\t")]
                is_header = header if header is not None else sorted(lowered) == ["caption", "url"]
                if is_header:
                    if sorted(lowered) == ["caption", "url"]:
                        url_first = lowered[0] == "url"
                    continue
            try:
                fields = text.split("\t", 1) if url_first else text.rsplit("\t", 1)
                if len(fields) != 2:
                    raise RecordError(f"expected 2 tab-separated fields, got {len(fields)}")
                url_field, caption_field = fields if url_first else reversed(fields)
                url = check_url(url_field)
                caption = _caption(caption_field)
                yield make_pair(
                    doc_id=f"{source}:{stem}:{line_no}", source=source, url=url, caption=caption,
                    source_file=name, source_row=line_no,
                )
            except RecordError as err:
                handler(BadRecord(name, line_no, str(err)))


# ------------------------------------------------------------------- web documents (parallel lists)


def parallel_lists_document(
    texts: Any, images: Any, *, doc_id: str, source: str, source_file: str, row: int, page_url: str | None,
    image_metadata: Sequence[Any] | None = None, meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A web document given as parallel ``texts`` / ``images`` lists (OBELICS, OmniCorpus, MINT-1T): position ``i``
    holds a text (``images[i]`` null) or an image URL (``texts[i]`` null); a position with neither is empty and
    skipped. Elements keep the source's order; an image's ``matched_text_index`` is the text after it (the one
    before it when none follows). ``image_metadata`` (one entry per image, in image order) goes to
    ``meta["image_metadata"]`` for the images kept; it may also be aligned with the positions (null at the texts).
    An image with an unusable URL is left out with its reason in ``meta["skipped_images"]`` (``index``: its
    position in the lists)."""
    if not isinstance(texts, list) or not isinstance(images, list):
        raise RecordError("texts and images must be lists")
    if len(texts) != len(images):
        raise RecordError(f"texts and images must be parallel lists, got {len(texts)} and {len(images)} entries")
    image_metadata = _image_order(image_metadata, images)
    elements: list[dict[str, Any]] = []
    kept_metadata: list[Any] = []
    skipped: list[dict[str, Any]] = []
    n_texts = n_images = 0
    for position, (text, url) in enumerate(zip(texts, images)):
        if text is not None and url is not None:
            raise RecordError(f"position {position} holds both a text and an image")
        if text is not None:
            if not isinstance(text, str):
                raise RecordError(f"texts[{position}] is not a string")
            elements.append(text_element(text, n_texts))
            n_texts += 1
        elif url is not None:
            metadata = image_metadata[n_images] if image_metadata is not None else None
            n_images += 1
            try:
                elements.append(image_element(check_url(url, page_url)))
                kept_metadata.append(metadata)
            except RecordError as err:
                _skipped(skipped, position, f"images[{position}]: {err}")
    _match_images_to_texts(elements)
    meta = dict(meta or {})
    if image_metadata is not None:
        meta["image_metadata"] = kept_metadata
    if skipped:
        meta["skipped_images"] = skipped
    return make_document(doc_id=doc_id, source=source, kind="interleaved", source_file=source_file, source_row=row,
                         page_url=page_url, elements=elements, meta=meta)


def _match_images_to_texts(elements: list[dict[str, Any]]) -> None:
    following = None
    for element in reversed(elements):
        if element["type"] == "text":
            following = element["sentence_index"]
        else:
            element["matched_text_index"] = following
    preceding = None
    for element in elements:
        if element["type"] == "text":
            preceding = element["sentence_index"]
        elif element["matched_text_index"] is None:
            element["matched_text_index"] = preceding


def _image_order(metadata: Any, images: list[Any]) -> list[Any] | None:
    """Per-image metadata in image order, from a list aligned with the positions or holding only the images."""
    if metadata is None:
        return None
    if not isinstance(metadata, list):
        raise RecordError("metadata must be a list")
    n_images = sum(url is not None for url in images)
    if len(metadata) == len(images):
        return [m for m, url in zip(metadata, images) if url is not None]
    if len(metadata) == n_images:
        return metadata
    raise RecordError(f"metadata has {len(metadata)} entries for {len(images)} positions and {n_images} images")


def _json_field(value: Any, what: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise RecordError(f"{what} is not JSON: {err.msg}: column {err.colno}") from None


Document = Callable[[dict[str, Any], str, str, int], dict[str, Any]]
"""``(record, doc_id, file name, row) -> document`` of one parquet layout."""


def _interleaved_parquet(path: str | os.PathLike, handler: Handler, source: str, batch_size: int,
                         document: Document) -> Iterator[dict[str, Any]]:
    name = os.path.basename(str(path))
    stem = _stem(name)
    parquet = _parquet(path)
    missing = [c for c in ("texts", "images") if c not in parquet.schema_arrow.names]
    if missing:
        raise ShardError(name, f"no {' and '.join(missing)} column (columns are {parquet.schema_arrow.names})")
    row = 0
    for records in _batches(parquet, name, batch_size):
        for record in records:
            try:
                yield document(record, f"{source}:{stem}:{row}", name, row)
            except RecordError as err:
                handler(BadRecord(name, row, str(err)))
            row += 1


def read_obelics(path: str | os.PathLike, handler: Handler = warn_and_continue, *, source: str = "obelics",
                 batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """OBELICS web documents (``data/train-{i:05d}-of-{n:05d}-*.parquet`` as released, any ``*.parquet``).

    Columns: ``texts`` and ``images`` (parallel lists, null where the other modality stands), ``metadata`` (a JSON
    string: a list aligned with the positions, each image's ``src``, ``alt_text``, sizes, ...; null at the texts),
    ``general_metadata`` (a JSON string: the page's ``url``, ``warc_filename``, ``warc_record_offset``,
    ``warc_record_length``). The page ``url`` becomes ``page_url``; the rest of ``general_metadata`` and any
    other column go to ``meta``, each image's metadata to ``meta["image_metadata"]``."""

    def document(record: dict[str, Any], doc_id: str, file: str, row: int) -> dict[str, Any]:
        general = _json_field(record.get("general_metadata"), "general_metadata") or {}
        if not isinstance(general, dict):
            raise RecordError("general_metadata must be a JSON object")
        texts, images = record.get("texts"), record.get("images")
        others = {k: v for k, v in record.items() if k not in ("texts", "images", "metadata", "general_metadata")}
        page_url = general.get("url") if isinstance(general.get("url"), str) else None
        return parallel_lists_document(
            texts, images, doc_id=doc_id, source=source, source_file=file, row=row, page_url=page_url,
            image_metadata=_json_field(record.get("metadata"), "metadata"),
            meta={**{k: v for k, v in general.items() if k != "url"}, **others})

    return _interleaved_parquet(path, handler, source, batch_size, document)


def read_omnicorpus(path: str | os.PathLike, handler: Handler = warn_and_continue, *, source: str = "omnicorpus",
                    batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """OmniCorpus-CC web documents (``CC-MAIN-{yyyy}-{ww}/train/{i:04d}.parquet`` as released, any ``*.parquet``).

    Columns: ``texts`` and ``images`` (parallel lists, null where the other modality stands), ``metadata`` (a list
    of per-image structs, aligned with the positions or in image order: ``p_hash``, ``d_hash`` and their
    ``*_dup_count``, ``img_url_sha``, ``width``, ``height``, ``bytes``, ``aesthetic_prob``, ``unsafe_prob``),
    ``general_metadata`` (a struct: ``id``, ``url`` of the page, ``domain``, ``fluency_prob``,
    ``non_advertisement_prob``, ``politics_prob``, ``porn_prob``, ``toxic_prob``). The page ``url`` becomes
    ``page_url``; the rest of ``general_metadata`` and any other column go to ``meta``, each image's metadata (its
    perceptual hashes included) to ``meta["image_metadata"]``."""

    def document(record: dict[str, Any], doc_id: str, file: str, row: int) -> dict[str, Any]:
        general = _json_field(record.get("general_metadata"), "general_metadata") or {}
        if not isinstance(general, dict):
            raise RecordError("general_metadata must be a struct")
        texts, images = record.get("texts"), record.get("images")
        others = {k: v for k, v in record.items() if k not in ("texts", "images", "metadata", "general_metadata")}
        page_url = general.get("url") if isinstance(general.get("url"), str) else None
        return parallel_lists_document(
            texts, images, doc_id=doc_id, source=source, source_file=file, row=row, page_url=page_url,
            image_metadata=record.get("metadata"),
            meta={**{k: v for k, v in general.items() if k != "url"}, **others})

    return _interleaved_parquet(path, handler, source, batch_size, document)


def read_mint1t(path: str | os.PathLike, handler: Handler = warn_and_continue, *, source: str = "mint1t",
                batch_size: int = 256) -> Iterator[dict[str, Any]]:
    """MINT-1T HTML web documents (``CC-MAIN-{yyyy}-{ww}/shard_{i:04d}.parquet`` as released, any ``*.parquet``).

    Columns: ``texts`` and ``images`` (parallel lists, null where the other modality stands), ``url`` (the page),
    ``cc_dump``; every other column (the image hashes and image metadata MINT-1T gives in image order, not
    aligned with the positions) goes to ``meta`` as it is."""

    def document(record: dict[str, Any], doc_id: str, file: str, row: int) -> dict[str, Any]:
        page_url = record.get("url") if isinstance(record.get("url"), str) else None
        return parallel_lists_document(
            record.get("texts"), record.get("images"), doc_id=doc_id, source=source, source_file=file, row=row,
            page_url=page_url, meta={k: v for k, v in record.items() if k not in ("texts", "images", "url")})

    return _interleaved_parquet(path, handler, source, batch_size, document)


# ------------------------------------------------------------------------------------ dispatch

READERS: dict[str, Callable[..., Iterator[dict[str, Any]]]] = {
    "mmc4": read_mmc4, "laion": read_pairs_parquet, "cc12m": read_cc12m_tsv, "obelics": read_obelics,
    "omnicorpus": read_omnicorpus, "mint1t": read_mint1t,
}
"""The reader of each source, by the name of the raw folder its shards lie in."""


def parquet_source(path: str | os.PathLike) -> str:
    """Which source a parquet file's columns are laid out as: ``omnicorpus`` (a ``general_metadata`` struct),
    ``obelics`` (a ``general_metadata`` JSON string), ``mint1t`` (``texts``/``images`` and a page ``url``),
    else ``laion`` (pairs)."""
    schema = _parquet(path).schema_arrow
    if "texts" not in schema.names or "images" not in schema.names:
        return "laion"
    if "general_metadata" in schema.names:
        return "omnicorpus" if pa.types.is_struct(schema.field("general_metadata").type) else "obelics"
    return "mint1t"


def read_source(path: str | os.PathLike, handler: Handler = warn_and_continue, *, source: str | None = None,
                **options: Any) -> Iterator[dict[str, Any]]:
    """The documents of one raw shard, read by the reader of ``source`` (:data:`READERS`: the raw folder's name);
    without it, from the file name: ``.jsonl`` / ``.zip`` → MMC4, ``.tsv`` → CC-12M, ``.parquet`` → by its
    columns (:func:`parquet_source`). ``options`` go to the reader."""
    name = Path(path).name
    if source is None:
        if name.endswith((".jsonl", ".zip")):
            source = "mmc4"
        elif name.endswith(".tsv"):
            source = "cc12m"
        elif name.endswith(".parquet"):
            source = parquet_source(path)
        else:
            raise ValueError(f"unknown source format for {name!r} (expected .jsonl, .jsonl.zip, .zip, .parquet, .tsv)")
    if source not in READERS:
        raise ValueError(f"no reader for source {source!r} (readers: {sorted(READERS)})")
    return READERS[source](path, handler, **options)
