"""The evaluation report: ``report.md`` with PNG plots and a ``results.json``, written into one folder atomically.

:func:`write_report` compares any number of evaluated checkpoints side by side (e.g. ``trained``
vs ``untrained (step 0)``, or the variants of an ablation): a score table with the difference to
the last column, per-task bar charts (``tasks.png``), the training loss curves (``loss.png``),
example generations as image grids (``examples_<label>_<task>.png``) and the lineage table
(checkpoint, shards and their data versions, filter thresholds, config hash, git commit).
Plots use matplotlib's object API (no pyplot state, safe in worker threads).
"""

from __future__ import annotations

import base64
import json
import re
import textwrap
from collections.abc import Mapping, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from PIL import Image

from pipelines.evaluation.run import EvaluationResult
from pipelines.files import atomic_path

REPORT = "report.md"
RESULTS = "results.json"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def _png(figure: Figure, path: Path) -> str:
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return path.name


def _value(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def plot_task_scores(results: Mapping[str, EvaluationResult]) -> Figure:
    """One panel per task, one bar group per metric, one bar per compared result."""
    rows: dict[str, dict[str, dict[str, float]]] = {}
    for label, result in results.items():
        for task, metrics in result.metrics().items():
            for metric, value in metrics.items():
                rows.setdefault(task, {}).setdefault(metric, {})[label] = value
    figure = Figure(figsize=(4.2 * len(rows), 3.4))
    axes = figure.subplots(1, len(rows), squeeze=False)[0]
    width = 0.8 / max(1, len(results))
    for ax, (task, metrics) in zip(axes, rows.items()):
        for i, label in enumerate(results):
            values = [metrics[m].get(label, 0.0) for m in metrics]
            ax.bar([j + i * width for j in range(len(metrics))], values, width, label=label)
        ax.set_xticks([j + width * (len(results) - 1) / 2 for j in range(len(metrics))])
        ax.set_xticklabels([m.replace("accuracy_", "acc_") for m in metrics], rotation=30, ha="right", fontsize=8)
        ax.set_title(task, fontsize=10)
    axes[0].legend(fontsize=8)
    return figure


def plot_loss_curves(training: Mapping[str, Sequence[dict[str, Any]]]) -> Figure:
    """Total, text and image loss per optimizer step (``metrics.jsonl`` records) of each run."""
    figure = Figure(figsize=(12, 3.4))
    axes = figure.subplots(1, 3)
    for label, records in training.items():
        steps = [r for r in records if "loss" in r]
        for ax, key in zip(axes, ("loss", "text_loss", "image_loss")):
            ax.plot([r["step"] for r in steps], [r[key] for r in steps], label=label)
    for ax, key in zip(axes, ("loss", "text_loss", "image_loss")):
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=8)
    return figure


def plot_examples(examples: Sequence[dict[str, Any]], title: str, max_images: int = 6) -> Figure:
    """A grid: one row per example, its prompt images then its generated images, texts under the row."""
    columns = max(1, min(max_images, max(sum(isinstance(e, Image.Image) for e in ex["prompt"]) + len(ex["images"])
                                         for ex in examples)))
    figure = Figure(figsize=(1.6 * columns + 0.4, 2.2 * len(examples) + 0.4))
    axes = figure.subplots(len(examples), columns, squeeze=False)
    for row, example in zip(axes, examples):
        shown = [(e, "prompt") for e in example["prompt"] if isinstance(e, Image.Image)]
        shown += [(e, "generated") for e in example["images"]]
        for ax in row:
            ax.axis("off")
        for ax, (image, kind) in zip(row, shown[:columns]):
            ax.imshow(image)
            ax.set_title(kind, fontsize=7, color="tab:green" if kind == "generated" else "black")
        prompt_text = " | ".join(e for e in example["prompt"] if isinstance(e, str))
        caption = textwrap.shorten(f"prompt: {prompt_text}  →  output: {example['text']!r}", 160)
        row[0].text(0, -0.08, "\n".join(textwrap.wrap(caption, 14 * columns)), transform=row[0].transAxes,
                    fontsize=7, va="top")
    figure.suptitle(title, fontsize=10)
    figure.subplots_adjust(hspace=0.9)
    return figure


def _score_table(results: Mapping[str, EvaluationResult]) -> list[str]:
    labels = list(results)
    compare = len(labels) > 1
    header = "| task | metric | " + " | ".join(labels) + (f" | {labels[0]} − {labels[-1]} |" if compare else " |")
    lines = [header, "|" + "---|" * (len(labels) + 2 + compare)]
    tasks: dict[str, list[str]] = {}
    for result in results.values():
        for task, metrics in result.metrics().items():
            tasks.setdefault(task, [])
            tasks[task] += [m for m in metrics if m not in tasks[task]]
    for task, metrics in tasks.items():
        for metric in metrics:
            values = [results[label].metrics().get(task, {}).get(metric) for label in labels]
            cells = [_value(v) for v in values]
            if compare:
                delta = None if values[0] is None or values[-1] is None else values[0] - values[-1]
                cells.append("–" if delta is None else f"{delta:+.3f}")
            lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return lines


def _notes(results: Mapping[str, EvaluationResult]) -> list[str]:
    lines = []
    for label, result in results.items():
        clip = result.clip
        if clip is None:
            lines.append(f"- **{label}**: no CLIP score (no scorer given).")
        else:
            reference = "" if clip.reference_clip_score is None else f"; ground-truth renderings score {clip.reference_clip_score:.2f}"
            lines.append(f"- **{label}**: CLIP score {clip.clip_score:.2f} of {clip.count} text-to-image outputs, "
                         f"scorer `{clip.scorer}`{reference}.")
        lines.append(f"  FID: {result.fid.label} = {result.fid.value:.2f}" if result.fid is not None
                     else "  FID: not computed (no Inception-v3 weights or CLIP scorer given, or fewer than 2 images).")
        lines.append(f"  Checkpoint `{result.checkpoint}` (step {result.step}), evaluated in {result.seconds:.1f} s "
                     f"with {json.dumps(result.settings)}.")
    return lines


def write_report(
    out_dir: str | Path,
    results: Mapping[str, EvaluationResult],
    *,
    training: Mapping[str, Sequence[dict[str, Any]]] | None = None,
    lineage: Mapping[str, Any] | None = None,
    title: str = "Evaluation report",
    examples_of: Sequence[str] | None = None,
) -> Path:
    """Write ``report.md``, ``results.json`` and the PNGs into ``out_dir`` (replaced atomically).

    Args:
        results: label -> evaluation, in table order; the last column is the one differences are taken to.
        training: label -> ``metrics.jsonl`` records for the loss curves.
        lineage: key -> value rows of the lineage table (values may be dicts, shown as JSON).
        examples_of: labels whose example generations are drawn (default: all).
    """
    if not results:
        raise ValueError("write_report needs at least one evaluation result")
    out = Path(out_dir)
    with atomic_path(out) as tmp:
        tmp.mkdir()
        lines = [f"# {title}", ""]
        if lineage:
            lines += ["## Lineage", "", "| | |", "|---|---|"]
            lines += [f"| {k} | {json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v} |"
                      for k, v in lineage.items()]
            lines.append("")
        lines += ["## Scores", "", *_score_table(results), "", *_notes(results), "",
                  f"![per-task scores]({_png(plot_task_scores(results), tmp / 'tasks.png')})", ""]
        if training:
            lines += ["## Training", ""]
            for label, records in training.items():
                steps = [r for r in records if "loss" in r]
                if steps:
                    lines.append(f"- **{label}**: {len(steps)} steps, final loss {steps[-1]['loss']:.4f} "
                                 f"(text {steps[-1]['text_loss']:.4f}, image {steps[-1]['image_loss']:.4f}), "
                                 f"{sum(r['seconds'] for r in steps):.0f} s")
            lines += ["", f"![loss curves]({_png(plot_loss_curves(training), tmp / 'loss.png')})", ""]
        lines += ["## Example generations", ""]
        for label in examples_of if examples_of is not None else list(results):
            for task in results[label].tasks:
                if task.examples:
                    name = _png(plot_examples(task.examples, f"{label}: {task.task}"),
                                tmp / f"examples_{_slug(label)}_{task.task}.png")
                    lines += [f"### {label}: {task.task}", "", f"![{label} {task.task}]({name})", ""]
        (tmp / REPORT).write_text("\n".join(lines))
        payload = {"title": title, "lineage": dict(lineage or {}),
                   "results": {label: r.to_dict() for label, r in results.items()}}
        (tmp / RESULTS).write_text(json.dumps(payload, indent=1, sort_keys=True, default=str))
    return out


def inline_images(report_dir: str | Path, names: Sequence[str] | None = None) -> str:
    """``report.md`` with its PNGs embedded as data URIs (for Dagster's markdown metadata);
    ``names`` keeps only those images (others are dropped from the text)."""
    report_dir = Path(report_dir)

    def embed(match: re.Match) -> str:
        alt, name = match.group(1), match.group(2)
        if names is not None and name not in names:
            return f"_{alt}: see {name} in the report folder_"
        data = base64.b64encode((report_dir / name).read_bytes()).decode()
        return f"![{alt}](data:image/png;base64,{data})"

    return re.sub(r"!\[([^\]]*)\]\(([^)]+\.png)\)", embed, (report_dir / REPORT).read_text())


def figure_markdown(figure: Figure, alt: str) -> str:
    """A figure as a markdown image with a PNG data URI."""
    buffer = BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return f"![{alt}](data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()})"
