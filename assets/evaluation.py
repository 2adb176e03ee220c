"""The evaluation report of the checkpoint (next to its untrained baseline) and the MMFS ablation (paper Tab. 6(a))."""

from pathlib import Path
from typing import Optional

import dagster as dg

from assets.download import downloaded_image_bytes
from assets.metadata import data_version, table
from model.train import read_metrics
from orchestration.resources import PretrainedClipScorer, SampleWorldClipScorer, Storage
from pipelines.documents import read_documents
from pipelines.evaluation.ablation import PAPER_VARIANTS, AblationTraining, run_ablation
from pipelines.evaluation.report import inline_images, write_report
from pipelines.evaluation.run import DEFAULT_GUIDANCE_SCALE, DEFAULT_INFERENCE_STEPS, EvaluationResult, evaluate_checkpoint
from pipelines.evaluation.sample_world_tasks import TASKS
from pipelines.torch_threads import cpu_threads

TRAINED, UNTRAINED = "trained", "untrained (step 0)"


class EvaluationSettings(dg.Config):
    """What to run and how to sample; the defaults take ~1 min per model on 2 CPU cores."""

    tasks: list[str] = list(TASKS)
    limit: Optional[int] = 8
    """Records per task (``None``: all)."""
    num_inference_steps: int = DEFAULT_INFERENCE_STEPS
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE
    max_new_tokens: int = 24
    seed: int = 0
    inception_weights: str = ""
    """Local torchvision Inception-v3 state dict for FID proper; empty: FID on CLIP features, labelled so."""
    device: str = "cpu"
    torch_threads: int = 0
    """CPU threads while generating; 0 keeps torch's setting (all cores), 1 avoids oversubscribing a CPU shared
    with other steps."""

    def evaluate(self, model_dir: str, eval_dir: str, world: dict, scorer) -> EvaluationResult:
        with cpu_threads(self.torch_threads):
            return evaluate_checkpoint(
                model_dir, eval_dir, tasks=self.tasks, limit=self.limit, num_inference_steps=self.num_inference_steps,
                guidance_scale=self.guidance_scale, max_new_tokens=self.max_new_tokens, world=world, clip_scorer=scorer,
                inception_weights=self.inception_weights or None, seed=self.seed, device=self.device)


def _eval_dir(sample_world: dict) -> str:
    return str(Path(next(iter(sample_world["eval"].values()))).parent)


def _score_metadata(results: dict[str, EvaluationResult]) -> dict:
    """``<task>/<metric>`` (and ``untrained <task>/<metric>``) as numbers, for Dagster's plots over runs."""
    out = {}
    for label, result in results.items():
        prefix = "" if label == TRAINED else f"{label.split()[0]} "
        for task, metrics in result.metrics().items():
            out.update({f"{prefix}{task}/{metric}": float(value) for metric, value in metrics.items()})
    return out


@dg.asset(group_name="evaluation", kinds={"pytorch", "markdown"})
def evaluation_report(
    context: dg.AssetExecutionContext,
    config: EvaluationSettings,
    storage: Storage,
    clip_scorer_source: dg.ResourceParam[SampleWorldClipScorer | PretrainedClipScorer],
    checkpoint: dict,
    sample_world: dict,
    clip_scorer: dict,
) -> dg.Output[dict]:
    """The sample world's benchmarks on the checkpoint and on its untrained step-0 baseline, side by side, with the
    CLIP score of generated images, loss curve, example grids and lineage (shards, thresholds, config, commit)."""
    scorer = clip_scorer_source.load(clip_scorer)
    eval_dir = _eval_dir(sample_world)
    results = {}
    for label, model_dir in ((TRAINED, checkpoint["model_dir"]), (UNTRAINED, checkpoint["untrained_model_dir"])):
        context.log.info(f"evaluating {label}: {model_dir}")
        results[label] = config.evaluate(model_dir, eval_dir, sample_world["config"], scorer)
        context.log.info(f"{label}: {results[label].metrics()} in {results[label].seconds:.0f} s")
    lineage = {
        "checkpoint": checkpoint["checkpoint"],
        "step": checkpoint["step"],
        "training shards": checkpoint["shards"]["path"],
        "shards data version": checkpoint["shards"]["data_version"],
        "shard files (sha256)": checkpoint["shards"]["files"],
        "filter thresholds": checkpoint["filter_thresholds"],
        "packing": checkpoint["packing"],
        "model config hash": checkpoint["model_config_hash"],
        "git commit": checkpoint["git_commit"],
        "clip scorer": f"{clip_scorer['kind']} ({clip_scorer.get('directory') or clip_scorer.get('checkpoint')})",
        "eval split": eval_dir,
    }
    settings = config.model_dump()
    out = storage.path("evaluation_report", data_version(checkpoint, settings, clip_scorer).value)
    write_report(out, results, training={TRAINED: read_metrics(checkpoint["run_dir"])}, lineage=lineage,
                 title=f"MM-Interleaved evaluation: step {checkpoint['step']} vs untrained", examples_of=[TRAINED])
    scores = {label: r.metrics() for label, r in results.items()}
    manifest = {"path": str(out), "report": str(out / "report.md"), "scores": scores,
                "checkpoint": checkpoint["checkpoint"], "step": checkpoint["step"], "settings": settings}
    metadata = {
        **_score_metadata(results),
        "report": dg.MetadataValue.md(inline_images(out, names=["tasks.png", "loss.png", "examples_trained_text_to_image.png"])),
        "clip_scorer": clip_scorer["kind"],
        "eval_seconds": sum(r.seconds for r in results.values()),
        "path": dg.MetadataValue.path(str(out)),
    }
    return dg.Output(manifest, metadata=metadata, data_version=data_version(manifest))


@dg.asset_check(asset=evaluation_report, description=(
    "The trained checkpoint beats its untrained step-0 baseline on captioning (CIDEr) and text-to-image "
    "attribute accuracy."))
def evaluation_report_beats_untrained(evaluation_report: dict) -> dg.AssetCheckResult:
    trained, untrained = evaluation_report["scores"][TRAINED], evaluation_report["scores"][UNTRAINED]
    pairs = {f"{task}/{metric}": (trained[task][metric], untrained[task][metric])
             for task, metric in (("captioning", "cider"), ("text_to_image", "attribute_accuracy"))
             if task in trained}
    return dg.AssetCheckResult(
        passed=bool(pairs) and all(t > u for t, u in pairs.values()),
        metadata={"scores": table({k: f"trained {t:.3f} vs untrained {u:.3f}" for k, (t, u) in pairs.items()},
                                  ("metric", "trained vs untrained"))})


class AblationSettings(dg.Config):
    """Training and evaluation of each ablation variant (the same for all three)."""

    max_steps: int = 500
    lr: float = 1e-3
    decoder_lr: float = 2e-3
    warmup_steps: int = 10
    max_length: int = 640
    """Tokens per packed sequence, the same for every variant (256 visual tokens need room for 2 images)."""
    vae_steps: int = 150
    torch_threads: int = 0
    seed: int = 0
    evaluation: EvaluationSettings = EvaluationSettings()


@dg.asset(group_name="ablation", kinds={"pytorch", "markdown"})
def mmfs_ablation_report(
    context: dg.AssetExecutionContext,
    config: AblationSettings,
    storage: Storage,
    clip_scorer_source: dg.ResourceParam[SampleWorldClipScorer | PretrainedClipScorer],
    tokenizer: dict,
    filtered_documents: dict,
    downloaded_images: dict,
    sample_world: dict,
    clip_scorer: dict,
) -> dg.Output[dict]:
    """Paper Tab. 6(a) on the sample world: 32 visual tokens with MMFS vs 32 without vs 256 without, each packed,
    trained and evaluated alike, in one report."""
    documents = [d for key in sorted(filtered_documents) for d in read_documents(filtered_documents[key]["path"])]
    images = {}
    for key in sorted(downloaded_images):
        images.update(downloaded_image_bytes(downloaded_images[key]))
    settings = config.model_dump()
    out = storage.path("mmfs_ablation", data_version(settings, tokenizer, {k: m["path"] for k, m in filtered_documents.items()}).value)
    e = config.evaluation
    with cpu_threads(e.torch_threads):
        result = run_ablation(
            documents, images, tokenizer, _eval_dir(sample_world), out, world=sample_world["config"],
            training=AblationTraining(max_steps=config.max_steps, lr=config.lr, decoder_lr=config.decoder_lr,
                                      warmup_steps=config.warmup_steps, max_length=config.max_length,
                                      vae_steps=config.vae_steps, torch_threads=config.torch_threads, seed=config.seed),
            evaluation={"tasks": e.tasks, "limit": e.limit, "num_inference_steps": e.num_inference_steps,
                        "guidance_scale": e.guidance_scale, "max_new_tokens": e.max_new_tokens, "seed": e.seed,
                        "device": e.device}, clip_scorer=clip_scorer_source.load(clip_scorer),
            variants=PAPER_VARIANTS, log=context.log.info)
    manifest = {"path": str(result.report), "scores": {name: r.metrics() for name, r in result.results.items()},
                "seconds": result.seconds, "settings": settings}
    metadata = {
        "report": dg.MetadataValue.md(inline_images(result.report, names=["tasks.png", "loss.png"])),
        "seconds": table({k: f"{v:.0f} s" for k, v in result.seconds.items()}, ("variant", "train + eval")),
        "path": dg.MetadataValue.path(str(result.report)),
    }
    return dg.Output(manifest, metadata=metadata, data_version=data_version(manifest["scores"], settings))
