"""Small helpers that turn stage results into Dagster metadata (formatting only, no stage logic)."""

import base64
import hashlib
import html
import json
from pathlib import Path
from typing import Any

import dagster as dg


def data_version(*parts: Any) -> dg.DataVersion:
    """A data version from JSON-serialisable content (manifests, settings, file digests)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return dg.DataVersion(hashlib.sha256(blob).hexdigest()[:16])


def file_digest(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def image_preview(items: list[tuple[bytes, str]], mime: str = "image/jpeg") -> dg.MetadataValue:
    """Markdown with each image inline (data URI) above its text."""
    lines = []
    for data, text in items:
        uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        lines.append(f"![image]({uri})\n\n{html.escape(text)}\n")
    return dg.MetadataValue.md("\n".join(lines) if lines else "_nothing to preview_")


def table(rows: dict[str, Any], header: tuple[str, str] = ("key", "value")) -> dg.MetadataValue:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {html.escape(str(k))} | {html.escape(str(v))} |" for k, v in rows.items()]
    return dg.MetadataValue.md("\n".join(lines))
