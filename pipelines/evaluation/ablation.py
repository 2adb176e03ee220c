"""MMFS ablation (paper Tab. 6(a)): 32 visual tokens with MMFS vs 32 without vs 256 without.

Each variant packs the same documents for its number of visual tokens, trains the ``tiny`` preset
with MMFS switched on or off (``MMInterleavedConfig.tiny(num_visual_tokens, mmfs)``: without MMFS
the LLM has no MMFS layers and the image decoder no MMFS blocks, so images reach the model only as
visual tokens), is evaluated on the sample world's benchmarks, and all variants land in one report.
Every stage is resumable: complete shard sets are reused and a training run resumes from its folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config import MMInterleavedConfig
from pipelines.clip_score import ClipScorer
from pipelines.evaluation.report import write_report
from pipelines.evaluation.run import EvaluationResult, evaluate_checkpoint
from pipelines.packing import PackingConfig, pack_documents
from pipelines.shards import read_index, write_shards
from pipelines.tokenizer import load_tokenizer


@dataclass(frozen=True)
class AblationVariant:
    name: str
    num_visual_tokens: int
    mmfs: bool

    def model_config(self) -> MMInterleavedConfig:
        return MMInterleavedConfig.tiny(num_visual_tokens=self.num_visual_tokens, mmfs=self.mmfs)


PAPER_VARIANTS = (
    AblationVariant("32 tokens, MMFS", 32, True),
    AblationVariant("32 tokens, no MMFS", 32, False),
    AblationVariant("256 tokens, no MMFS", 256, False),
)


@dataclass(frozen=True)
class AblationTraining:
    """Training settings shared by every variant (``model.train.TrainConfig`` fields)."""

    max_steps: int = 500
    lr: float = 1e-3
    decoder_lr: float = 2e-3
    warmup_steps: int = 10
    max_length: int = 640
    """Tokens per packed sequence, the same for every variant: room for two images of 256 tokens, and short
    enough that the decoder's MMFS over every image of a sequence stays cheap for 32-token variants."""
    vae_steps: int = 150
    """Steps fitting the tiny preset's random VAE to the training images before training (``fit_vae``)."""
    torch_threads: int = 0
    seed: int = 0


@dataclass
class AblationResult:
    report: Path
    results: dict[str, EvaluationResult]
    seconds: dict[str, float] = field(default_factory=dict)
    """Per variant: packing + training + evaluation time."""


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


def pack_variant(documents: Sequence[dict], images: Mapping[str, bytes], tokenizer: Any, out_dir: Path,
                 packing: PackingConfig) -> Path:
    """Shards of ``documents`` packed with ``packing`` in ``out_dir`` (kept when already complete with the same settings)."""
    if (out_dir / "index.json").exists():
        index = read_index(out_dir)
        if index.complete and index.meta.get("packing") == packing.to_dict():
            return out_dir
    sequences = pack_documents(documents, tokenizer, packing, images=images)
    write_shards((s.to_sample(f"{i:09d}") for i, s in enumerate(sequences)), out_dir, maxcount=64, prefix="seq",
                 meta={"packing": packing.to_dict()})
    return out_dir


def run_ablation(
    documents: Sequence[dict],
    images: Mapping[str, bytes],
    tokenizer: Mapping[str, Any],
    eval_dir: str | Path,
    out_dir: str | Path,
    *,
    world: Mapping[str, Any],
    training: AblationTraining = AblationTraining(),
    evaluation: Mapping[str, Any] | None = None,
    clip_scorer: ClipScorer | None = None,
    variants: Sequence[AblationVariant] = PAPER_VARIANTS,
    log: Callable[[str], None] = print,
) -> AblationResult:
    """Pack, train and evaluate every variant on the same documents; write one comparison report.

    Args:
        documents: filtered documents (``pipelines.documents`` schema); ``images``: their bytes by key.
        tokenizer: the ``tokenizer`` manifest (``path``, ``source.boi_token``, ``source.image_token``).
        world: config of the sample world that wrote ``eval_dir`` (for the prompts' images).
        evaluation: keyword arguments of :func:`evaluate_checkpoint` (limit, steps, ...).
    """
    from model.train import TrainConfig, build_model_with_fitted_vae, read_metrics, train

    out = Path(out_dir)
    text_tokenizer = load_tokenizer(tokenizer["path"], boi_token=tokenizer["source"]["boi_token"],
                                    image_token=tokenizer["source"]["image_token"])
    results: dict[str, EvaluationResult] = {}
    curves: dict[str, list[dict]] = {}
    seconds: dict[str, float] = {}
    for variant in variants:
        start = time.perf_counter()
        folder = out / _slug(variant.name)
        packing = PackingConfig(max_length=training.max_length, num_image_tokens=variant.num_visual_tokens,
                                seed=training.seed)
        shards = pack_variant(documents, images, text_tokenizer, folder / "shards", packing)
        log(f"{variant.name}: {read_index(shards).samples} sequences; training {training.max_steps} steps")
        config = TrainConfig(run_dir=str(folder / "run"), shards=str(shards), tokenizer=tokenizer["path"],
                             model=variant.model_config().to_dict(), max_steps=training.max_steps, lr=training.lr,
                             decoder_lr=training.decoder_lr, warmup_steps=training.warmup_steps, seed=training.seed,
                             zero_stage=0, checkpoint_every=training.max_steps, shuffle_buffer=64,
                             torch_threads=training.torch_threads)
        model, _ = build_model_with_fitted_vae(config, training.vae_steps)
        result = train(config, model=model)
        curves[variant.name] = read_metrics(folder / "run")
        results[variant.name] = evaluate_checkpoint(result.checkpoint, eval_dir, world=world, clip_scorer=clip_scorer,
                                                    **dict(evaluation or {}))
        seconds[variant.name] = time.perf_counter() - start
        log(f"{variant.name}: {results[variant.name].metrics()} ({seconds[variant.name]:.0f} s)")
    lineage = {"documents": len(documents), "tokenizer": tokenizer["path"], "training": vars(training),
               "variants": {v.name: {"num_visual_tokens": v.num_visual_tokens, "mmfs": v.mmfs} for v in variants},
               "seconds per variant": {k: round(v) for k, v in seconds.items()}}
    report = write_report(out / "report", results, training=curves, lineage=lineage,
                          title="MMFS ablation (paper Tab. 6(a)) on the sample world")
    return AblationResult(report, results, seconds)

