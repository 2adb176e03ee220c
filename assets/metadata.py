"""Small helpers that turn stage results into Dagster metadata (formatting only, no stage logic)."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable, Sequence
from typing import Any

import dagster as dg


def image_preview(items: list[tuple[bytes, str]], mime: str = "image/jpeg") -> dg.MetadataValue:
    """Markdown with each image inline (data URI) above its text."""
    lines = []
    for data, text in items:
        uri = f"data:{mime};base64,{base64.b64encode(data).decode()}"
        lines.append(f"![image]({uri})\n\n{html.escape(text)}\n")
    return dg.MetadataValue.md("\n".join(lines) if lines else "_nothing to preview_")


def table(rows: dict[str, Any], header: tuple[str, str] = ("key", "value")) -> dg.MetadataValue:
    """A two-column markdown table (cells HTML-escaped)."""
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {html.escape(str(k))} | {html.escape(str(v))} |" for k, v in rows.items()]
    return dg.MetadataValue.md("\n".join(lines))


def wide_table(rows: Sequence[Sequence[Any]], header: Sequence[str], empty: str) -> dg.MetadataValue:
    """A markdown table of any width (``|`` escaped in cells); ``empty`` when there are no rows."""
    lines = [f"| {' | '.join(header)} |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |" for row in rows]
    return dg.MetadataValue.md("\n".join(lines) if rows else empty)


def bullets(items: Iterable[str], empty: str = "_none_") -> dg.MetadataValue:
    """A markdown list (``empty`` when there is nothing)."""
    lines = [f"- {item}" for item in items]
    return dg.MetadataValue.md("\n".join(lines) or empty)


def per_second(count: float, seconds: float) -> float:
    return count / max(seconds, 1e-9)
