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

from pipelines.evaluation.fid import FIDResult
from pipelines.evaluation.intervals import Estimate
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
    """One panel per task, one bar group per metric, one bar per compared result, 95% intervals as error bars."""
    rows: dict[str, dict[str, dict[str, Estimate]]] = {}
    for label, result in results.items():
        for task, metrics in result.estimates().items():
            for metric, estimate in metrics.items():
                rows.setdefault(task, {}).setdefault(metric, {})[label] = estimate
    figure = Figure(figsize=(4.2 * len(rows), 3.4))
    axes = figure.subplots(1, len(rows), squeeze=False)[0]
    width = 0.8 / max(1, len(results))
    for ax, (task, metrics) in zip(axes, rows.items()):
        for i, label in enumerate(results):
            found = [metrics[m].get(label) for m in metrics]
            values = [0.0 if e is None else e.value for e in found]
            errors = [[0.0 if e is None else e.value - e.low for e in found], [0.0 if e is None else e.high - e.value for e in found]]
            ax.bar([j + i * width for j in range(len(metrics))], values, width, yerr=errors, capsize=2, label=label)
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


def plot_examples(examples: Sequence[dict[str, Any]], title: str, per_row: int = 3) -> Figure:
    """Examples side by side, ``per_row`` to a row: each a panel of its prompt images and its generated images
    (green titles) in one line, with its prompt text and output text above them."""
    columns = min(per_row, len(examples))
    rows = (len(examples) + columns - 1) // columns
    widths = [sum(isinstance(e, Image.Image) for e in ex["prompt"]) + len(ex["images"]) for ex in examples]
    panel = max(1, min(6, max(widths)))
    figure = Figure(figsize=(columns * (1.5 * panel + 0.3), 2.5 * rows + 0.5), layout="constrained")
    panels = figure.subfigures(rows, columns, squeeze=False)
    for index, example in enumerate(examples):
        sub = panels[index // columns][index % columns]
        shown = [(e, "prompt") for e in example["prompt"] if isinstance(e, Image.Image)]
        shown += [(e, "generated") for e in example["images"]]
        axes = sub.subplots(1, panel, squeeze=False)[0]
        for ax in axes:
            ax.axis("off")
        for ax, (image, kind) in zip(axes, shown[-panel:]):
            ax.imshow(image)
            ax.set_title(kind, fontsize=7, color="tab:green" if kind == "generated" else "black")
        prompt_text = " | ".join(e for e in example["prompt"] if isinstance(e, str))
        text = textwrap.shorten(f"{prompt_text} → {example['text']!r}" if example["text"] else prompt_text, 150)
        sub.suptitle("\n".join(textwrap.wrap(text, 30 * panel)), fontsize=7)
    for index in range(len(examples), rows * columns):
        panels[index // columns][index % columns].set_visible(False)
    figure.suptitle(title, fontsize=10)
    return figure


def _score_table(results: Mapping[str, EvaluationResult]) -> list[str]:
    """Every metric as ``mean [95% interval]``, one column per result, and the first minus the last."""
    labels = list(results)
    compare = len(labels) > 1
    estimates = {label: result.estimates() for label, result in results.items()}
    header = "| task | metric | n | " + " | ".join(labels) + (f" | {labels[0]} − {labels[-1]} |" if compare else " |")
    lines = [header, "|" + "---|" * (len(labels) + 3 + compare)]
    tasks: dict[str, list[str]] = {}
    for by_task in estimates.values():
        for task, metrics in by_task.items():
            tasks.setdefault(task, [])
            tasks[task] += [m for m in metrics if m not in tasks[task]]
    for task, metrics in tasks.items():
        for metric in metrics:
            values = [estimates[label].get(task, {}).get(metric) for label in labels]
            counts = sorted({v.n for v in values if v is not None})
            cells = ["–" if v is None else str(v) for v in values]
            if compare:
                first, last = values[0], values[-1]
                cells.append("–" if first is None or last is None else
                             f"{first.value - last.value:+.3f}{' *' if first.above(last) or last.above(first) else ''}")
            lines.append(f"| {task} | {metric} | {'/'.join(map(str, counts))} | " + " | ".join(cells) + " |")
    lines += ["", "Each score is the mean over the evaluated items with its 95% bootstrap interval"
              + ("; * marks a difference outside both intervals." if compare else ".")]
    return lines


def _fid_line(fid: FIDResult | None) -> str:
    if fid is None:
        return "  FID: not computed (no Inception-v3 weights or CLIP scorer given, or fewer than 2 images)."
    interval = "" if fid.low is None else f" [{fid.low:.2f}, {fid.high:.2f}]"
    return f"  FID: {fid.label} = {fid.value:.2f}{interval}"


def _notes(results: Mapping[str, EvaluationResult]) -> list[str]:
    lines = ["How to read the image rows: `*_floor` scores each output against another item's target (a generator "
             "that ignores its prompt scores there), `*_blank` an empty canvas, `*_copy` (story continuation) the story's "
             "previous image itself, what copying it scores; `vae_ceiling` is what the model's VAE "
             "lets any generator reach (ground truth through encode -> decode), `rendered` the parser's own ceiling "
             "at the model's resolution. `attribute_accuracy` is the share of the target objects' facts (position, "
             "colour, shape, size) drawn right; `strict_accuracy` also counts each of the `extra_objects` (objects "
             "drawn where the target has none) as four wrong facts, so clutter does not score.", ""]
    for label, result in results.items():
        clip = result.clip
        if clip is None:
            lines.append(f"- **{label}**: no CLIP score (no scorer given).")
        else:
            reference = "" if clip.reference_clip_score is None else f"; ground-truth renderings score {clip.reference_clip_score:.2f}"
            lines.append(f"- **{label}**: CLIP score {clip.estimate()} of {clip.count} text-to-image outputs, "
                         f"scorer `{clip.scorer}`{reference}.")
        lines.append(_fid_line(result.fid))
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
