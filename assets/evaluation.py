"""The evaluation report of the checkpoint (next to its fine-tuned successor and its untrained baseline) and the MMFS
ablation (paper Tab. 6(a))."""

import dagster as dg

from assets.metadata import table
from assets.resources import Compute, Storage
from assets.settings import stage_fields
from pipelines.data.clip_score import ClipScorerManifest
from pipelines.evaluation.evaluation_report import (
    TRAINED,
    EvaluationReport,
    baseline_comparison,
    beats_baseline,
    finetuned_comparison,
    finetuning_helps,
    report_against_baseline,
)
from pipelines.evaluation.report import inline_images
from pipelines.evaluation.run import EvaluationConfig
from pipelines.sample_world.publish import PublishedWorld
from pipelines.training.checkpoint import Checkpoint
from pipelines.training.finetune import FinetunedCheckpoint


class EvaluationSettings(stage_fields(EvaluationConfig)):
    """What the evaluation runs and how it samples (:class:`pipelines.evaluation.run.EvaluationConfig`)."""


@dg.asset(group_name="evaluation", kinds={"pytorch", "markdown"})
def evaluation_report(context: dg.AssetExecutionContext, config: EvaluationSettings, storage: Storage, compute: Compute,
                      checkpoint: Checkpoint, finetuned_checkpoint: FinetunedCheckpoint, sample_world: PublishedWorld,
                      clip_scorer: ClipScorerManifest) -> dg.Output[EvaluationReport]:
    """The sample world's benchmarks on the checkpoint, on its fine-tuned successor and on its untrained step-0
    baseline, side by side, with the CLIP score of generated images, loss curves, example grids and lineage (shards,
    thresholds, instruction shards, config, commit)."""
    report = report_against_baseline(checkpoint, finetuned_checkpoint, sample_world, clip_scorer,
                                     config.to(EvaluationConfig), storage.layout.path("evaluation_report"),
                                     compute.get(), log=context.log.info)
    return dg.Output(report, metadata=_metadata(report), data_version=dg.DataVersion(report.version))


def _metadata(report: EvaluationReport) -> dict:
    scores = {}  # "<task>/<metric>" (+ " low" / " high", its 95% interval) as numbers, for Dagster's plots over runs
    for label, metrics in report.scores.items():
        prefix = "" if label == TRAINED else f"{label.split()[0]} "
        for task, values in metrics.items():
            for metric, estimate in values.items():
                key = f"{prefix}{task}/{metric}"
                scores.update({key: estimate.value, f"{key} low": estimate.low, f"{key} high": estimate.high})
    return {
        **scores,
        "report": dg.MetadataValue.md(inline_images(report.path, names=["tasks.png", "loss.png",
                                                                        "examples_trained_text_to_image.png",
                                                                        "examples_finetuned_vqa.png"])),
        "clip_scorer": report.clip_scorer,
        "eval_seconds": report.seconds,
        "path": dg.MetadataValue.path(report.path),
    }


@dg.asset_check(asset=evaluation_report, description=(
    "The trained checkpoint beats its untrained step-0 baseline outside both 95% intervals on captioning (CIDEr), "
    "text-to-image and story-continuation strict accuracy."))
def evaluation_report_beats_untrained(evaluation_report: EvaluationReport) -> dg.AssetCheckResult:
    pairs = baseline_comparison(evaluation_report)
    return dg.AssetCheckResult(passed=beats_baseline(evaluation_report), metadata={
        "scores": table({k: f"trained {t} vs untrained {u}" for k, (t, u) in pairs.items()},
                        ("metric", "trained vs untrained"))})


@dg.asset_check(asset=evaluation_report, description=(
    "The fine-tuned checkpoint beats both the pretrained checkpoint and the untrained baseline outside the 95% "
    "intervals on VQA accuracy (what the instruction data teaches)."))
def evaluation_report_finetuned_beats_baselines(evaluation_report: EvaluationReport) -> dg.AssetCheckResult:
    triples = finetuned_comparison(evaluation_report)
    return dg.AssetCheckResult(passed=finetuning_helps(evaluation_report), metadata={
        "scores": table({k: f"finetuned {f} vs trained {t} vs untrained {u}" for k, (f, t, u) in triples.items()},
                        ("metric", "finetuned vs trained vs untrained"))})
