"""The evaluation_report stage: the sample world's benchmarks on a checkpoint, on its fine-tuned successor and on its
untrained step-0 twin, side by side, with the CLIP score of generated images, the loss curves, example grids and
the lineage (shards, filter thresholds, what dedup and decontamination removed from the training data and why,
instruction shards, model config, commit)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.compute import Compute
from pipelines.data.clip_score import ClipScorerManifest
from pipelines.data.shards import read_index
from pipelines.evaluation.intervals import Estimate
from pipelines.evaluation.report import write_report
from pipelines.evaluation.run import EvaluationConfig, EvaluationResult, evaluate_checkpoint
from pipelines.files import fingerprint
from pipelines.sample_world.publish import PublishedWorld
from pipelines.training.checkpoint import Checkpoint
from pipelines.training.finetune import FinetunedCheckpoint

logger = logging.getLogger(__name__)

TRAINED, FINETUNED, UNTRAINED = "trained", "finetuned", "untrained (step 0)"
BASELINE_METRICS = (("captioning", "cider"), ("text_to_image", "strict_accuracy"),
                    ("story_continuation", "strict_accuracy"))
"""The ``(task, metric)`` scores a trained checkpoint must beat its untrained twin on, outside both intervals.
Images are compared on strict accuracy: an untrained decoder's noise parses as a blob in every cell, which gets
every target position right (plain attribute accuracy ~0.45 for noise)."""
FINETUNED_METRICS = (("vqa", "accuracy"),)
"""The ``(task, metric)`` scores the fine-tuned checkpoint must beat both the pretrained checkpoint and the untrained
twin on, outside the intervals: what instruction data teaches and pretraining does not."""

Scores = dict[str, dict[str, Estimate]]
"""``{task: {metric: mean with its 95% interval}}`` of one evaluated model."""


@dataclass(frozen=True)
class EvaluationReport:
    """The written report and the scores in it."""

    path: str
    report: str
    """``report.md``."""
    scores: dict[str, Scores]
    """Per compared model (:data:`TRAINED`, :data:`FINETUNED`, :data:`UNTRAINED`): its scores."""
    checkpoint: str
    step: int
    clip_scorer: str
    """The kind of scorer that gave the CLIP scores."""
    config: EvaluationConfig
    seconds: float = 0.0

    @property
    def version(self) -> str:
        return fingerprint(Path(self.path).name, self.scores)  # the folder is named by its inputs; not where it lies


def baseline_comparison(report: EvaluationReport) -> dict[str, tuple[Estimate, Estimate]]:
    """``"task/metric" -> (trained, untrained)`` for the :data:`BASELINE_METRICS` the report has."""
    trained, untrained = report.scores[TRAINED], report.scores[UNTRAINED]
    return {f"{task}/{metric}": (trained[task][metric], untrained[task][metric])
            for task, metric in BASELINE_METRICS if task in trained}


def beats_baseline(report: EvaluationReport) -> bool:
    """Whether the trained checkpoint's interval lies above its untrained twin's on every compared metric (and
    there is one)."""
    pairs = baseline_comparison(report)
    return bool(pairs) and all(trained.above(untrained) for trained, untrained in pairs.values())


def removed_from_training(shards_path: str) -> dict[str, Any]:
    """The lineage rows of what dedup and decontamination removed from the training shards, and why (counts by rule,
    examples, the files listing every removal), from the shards' index; none for shards packed without them."""
    meta = read_index(shards_path).meta
    rows: dict[str, Any] = {}
    if "dedup" in meta:
        dedup = meta["dedup"]
        rows["dedup"] = {"removed": dedup["drops_by_rule"], "order": dedup["order"],
                         "images kept": f"{dedup['images_kept']} of {dedup['images_in']}",
                         "documents kept": f"{dedup['documents_kept']} of {dedup['documents_in']}",
                         "removals listed in": sorted(dedup["drops"].values())}
    if "decontamination" in meta:
        clean = meta["decontamination"]
        rows["decontamination"] = {"checked against": clean["checked_against"], "removed": clean["removed"],
                                   "images kept": f"{clean['images_kept']} of {clean['images_in']}",
                                   "documents kept": f"{clean['documents_kept']} of {clean['documents_in']}",
                                   "settings": clean["config"], "examples": clean["examples"][:5],
                                   "removals listed in": sorted(clean["drops"].values())}
    return rows


def finetuned_comparison(report: EvaluationReport) -> dict[str, tuple[Estimate, Estimate, Estimate]]:
    """``"task/metric" -> (finetuned, trained, untrained)`` for the :data:`FINETUNED_METRICS` the report has."""
    finetuned, trained, untrained = report.scores[FINETUNED], report.scores[TRAINED], report.scores[UNTRAINED]
    return {f"{task}/{metric}": (finetuned[task][metric], trained[task][metric], untrained[task][metric])
            for task, metric in FINETUNED_METRICS if task in finetuned}


def finetuning_helps(report: EvaluationReport) -> bool:
    """Whether the fine-tuned checkpoint's interval lies above both the pretrained checkpoint's and the untrained
    twin's on every compared metric (and there is one)."""
    triples = finetuned_comparison(report)
    return bool(triples) and all(f.above(t) and f.above(u) for f, t, u in triples.values())


def report_against_baseline(checkpoint: Checkpoint, finetuned: FinetunedCheckpoint, world: PublishedWorld,
                            scorer: ClipScorerManifest, config: EvaluationConfig, out_root: Path,
                            compute: Compute = Compute(), log: Callable[[str], None] = logger.info) -> EvaluationReport:
    """Evaluate the checkpoint, its fine-tuned successor and its untrained twin on ``world``'s eval splits and write
    the report into ``out_root/<fingerprint of the inputs>/``."""
    if finetuned.pretrained.checkpoint != checkpoint.checkpoint:
        raise ValueError(f"the fine-tuned checkpoint {finetuned.checkpoint} started from {finetuned.pretrained.checkpoint}, "
                         f"not from {checkpoint.checkpoint}: materialize finetuned_checkpoint again")
    loaded = scorer.load(compute)
    results: dict[str, EvaluationResult] = {}
    for label, model_dir in ((TRAINED, checkpoint.model_dir), (FINETUNED, finetuned.model_dir),
                             (UNTRAINED, checkpoint.untrained_model_dir)):
        log(f"evaluating {label}: {model_dir}")
        results[label] = evaluate_checkpoint(model_dir, world.eval_dir, config, world=world.world, clip_scorer=loaded,
                                             compute=compute)
        log(f"{label}: {results[label].metrics()} in {results[label].seconds:.0f} s")
    lineage = {
        "checkpoint": checkpoint.checkpoint,
        "step": checkpoint.step,
        "training shards": checkpoint.shards.path,
        "shards data version": checkpoint.shards.data_version,
        "shard files (sha256)": checkpoint.shards.files,
        "filter thresholds": checkpoint.filter_thresholds,
        **removed_from_training(checkpoint.shards.path),
        "packing": dataclasses.asdict(checkpoint.packing),
        "model config hash": checkpoint.model_config_hash,
        "finetuned checkpoint": finetuned.checkpoint,
        "finetuned step": finetuned.step,
        "instruction shards": finetuned.shards.path,
        "instruction shards data version": finetuned.shards.data_version,
        "git commit": checkpoint.git_commit,
        "clip scorer": f"{scorer.kind} ({scorer.location})",
        "eval split": world.eval_dir,
    }
    out = out_root / fingerprint(checkpoint.version, finetuned.version, dataclasses.asdict(config), scorer.version)
    write_report(out, results, training={TRAINED: checkpoint.metrics(), FINETUNED: finetuned.metrics()},
                 lineage=lineage, examples_of=[TRAINED, FINETUNED],
                 title=f"MM-Interleaved evaluation: step {checkpoint.step}, fine-tuned {finetuned.step} steps, "
                       "vs untrained")
    return EvaluationReport(str(out), str(out / "report.md"), {label: r.estimates() for label, r in results.items()},
                            checkpoint.checkpoint, checkpoint.step, scorer.kind, config,
                            sum(r.seconds for r in results.values()))
