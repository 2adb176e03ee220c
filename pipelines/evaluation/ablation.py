"""MMFS ablation (paper Tab. 6(a)): 32 visual tokens with MMFS vs 32 without vs 256 without, on the stages of the
main flow.

Each variant packs the same filtered documents for its number of visual tokens (:func:`pack_variants`, the
packed_sequences stage), trains the ``tiny`` preset with MMFS switched on or off (:func:`train_variants`, the
checkpoint stage; without MMFS the LLM has no MMFS layers and the image decoder no MMFS blocks, so images reach the
model only as visual tokens), and :func:`ablation_report` evaluates every variant on the sample world's benchmarks
into one report. Every stage resumes: complete shard sets are reused and a training run resumes from its folder.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipelines.compute import Compute
from pipelines.data.clip_score import ClipScorerManifest
from pipelines.data.downloaded_images import DownloadedShard
from pipelines.data.filtered_documents import FilteredShard
from pipelines.data.layout import DataLayout
from pipelines.data.packed_sequences import PackedSequences, SequenceShards, pack_shards
from pipelines.data.packing import PackingConfig
from pipelines.data.recaptions import RecaptionedShard
from pipelines.data.tokenizer import TokenizerManifest
from pipelines.evaluation.intervals import Estimate
from pipelines.evaluation.report import write_report
from pipelines.evaluation.run import EvaluationConfig, EvaluationResult, evaluate_checkpoint
from pipelines.files import fingerprint
from pipelines.sample_world.publish import PublishedWorld
from pipelines.training.checkpoint import Checkpoint, ModelChoice, train_checkpoint
from pipelines.training.train import TrainConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AblationVariant:
    name: str
    num_visual_tokens: int
    mmfs: bool

    @property
    def key(self) -> str:
        """The variant's name as an identifier (its partition key)."""
        return re.sub(r"[^a-z0-9]+", "_", self.name.lower()).strip("_")


PAPER_VARIANTS = (
    AblationVariant("32 tokens, MMFS", 32, True),
    AblationVariant("32 tokens, no MMFS", 32, False),
    AblationVariant("256 tokens, no MMFS", 256, False),
)
VARIANTS = {v.key: v for v in PAPER_VARIANTS}
"""The paper's variants by key."""


@dataclass(frozen=True)
class AblationReport:
    path: str
    """The report folder (``report.md``, ``results.json``, plots)."""
    scores: dict[str, dict[str, dict[str, Estimate]]]
    """Per variant name: ``{task: {metric: mean with its 95% interval}}``."""
    seconds: dict[str, float]
    """Per variant: evaluation time."""

    @property
    def version(self) -> str:
        return fingerprint(Path(self.path).name, self.scores)  # the folder is named by its inputs; not where it lies


def pack_variants(keys: Sequence[str], filtered: Mapping[str, FilteredShard], downloads: Mapping[str, DownloadedShard],
                  recaptions: Mapping[str, RecaptionedShard], tokenizer: TokenizerManifest, packing: PackingConfig,
                  shards: SequenceShards, layout: DataLayout,
                  log: Callable[[str], None] = logger.info) -> dict[str, PackedSequences]:
    """The same documents packed for each variant of ``keys`` (:data:`VARIANTS`): ``packing`` with the variant's
    visual tokens (one ``max_length`` for all, with room for the largest variant's images)."""
    packed = {}
    for key in keys:
        variant_packing = dataclasses.replace(packing, num_image_tokens=VARIANTS[key].num_visual_tokens)
        packed[key] = pack_shards(filtered, downloads, recaptions, tokenizer, variant_packing, shards, layout, log)
        log(f"{VARIANTS[key].name}: {packed[key].samples} sequences")
    return packed


def train_variants(sequences: Mapping[str, PackedSequences], tokenizer: TokenizerManifest, vae_steps: int,
                   training: TrainConfig, compute: Compute = Compute(),
                   log: Callable[[str], None] = logger.info) -> dict[str, Checkpoint]:
    """The ``tiny`` preset trained on each variant's sequences, MMFS on or off as the variant says, with the same
    settings (``training``; see :func:`pipelines.training.checkpoint.train_checkpoint`)."""
    return {key: train_checkpoint(packed, tokenizer, ModelChoice(mmfs=VARIANTS[key].mmfs, vae_steps=vae_steps),
                                  training, compute, log)
            for key, packed in sequences.items()}


def ablation_report(checkpoints: Mapping[str, Checkpoint], world: PublishedWorld, scorer: ClipScorerManifest,
                    config: EvaluationConfig, out_root: Path, compute: Compute = Compute(),
                    log: Callable[[str], None] = logger.info) -> AblationReport:
    """Evaluate every variant's checkpoint on ``world``'s benchmarks and write one comparison report (scores, loss
    curves, lineage) into ``out_root/<fingerprint of the inputs>/``."""
    loaded = scorer.load(compute)
    results: dict[str, EvaluationResult] = {}
    seconds: dict[str, float] = {}
    variants = [VARIANTS[key] for key in checkpoints]
    for variant, checkpoint in zip(variants, checkpoints.values()):
        start = time.perf_counter()
        results[variant.name] = evaluate_checkpoint(checkpoint.model_dir, world.eval_dir, config, world=world.world,
                                                    clip_scorer=loaded, compute=compute)
        seconds[variant.name] = time.perf_counter() - start
        log(f"{variant.name}: {results[variant.name].metrics()} ({seconds[variant.name]:.0f} s)")
    first = next(iter(checkpoints.values()))
    lineage = {"training shards": {v.name: c.shards.path for v, c in zip(variants, checkpoints.values())},
               "filter thresholds": first.filter_thresholds,
               "training": {k: v for k, v in first.train_config.items() if k not in ("run_dir", "shards", "model")},
               "variants": {v.name: {"num_visual_tokens": v.num_visual_tokens, "mmfs": v.mmfs} for v in variants},
               "git commit": first.git_commit, "evaluation seconds per variant": {k: round(v) for k, v in seconds.items()}}
    out = out_root / fingerprint([c.version for c in checkpoints.values()], dataclasses.asdict(config), scorer.version)
    write_report(out, results, training={v.name: c.metrics() for v, c in zip(variants, checkpoints.values())},
                 lineage=lineage, title="MMFS ablation (paper Tab. 6(a)) on the sample world")
    return AblationReport(str(out), {name: r.estimates() for name, r in results.items()}, seconds)
