"""MMFS ablation (paper Tab. 6(a)): N visual tokens with MMFS vs N without vs many (the paper: 32, 32, 256)
without, each pretrained and fine-tuned on the stages of the main flow.

Each variant packs the same filtered documents for its number of visual tokens (:func:`pack_variants`, the
packed_sequences stage), trains the recipe's model with MMFS switched on or off (:func:`train_variants`, the
checkpoint stage; without MMFS the LLM has no MMFS layers and the image decoder no MMFS blocks, so images reach the
model only as visual tokens), packs the instruction data for its visual tokens and fine-tunes on it
(:func:`pack_variant_instructions`, :func:`finetune_variants`: the SFT stage, where questions are asked), and
:func:`ablation_report` evaluates every fine-tuned variant on the sample world's benchmarks into one report. Every
stage resumes: complete shard sets are reused and a training run resumes from its folder.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipelines.compute import Compute
from pipelines.data.clip_score import ClipScorerManifest
from pipelines.data.downloaded_images import DownloadedShard
from pipelines.data.filtered_documents import FilteredShard
from pipelines.data.instruction_sequences import InstructionSequences, pack_instructions
from pipelines.data.instructions import InstructionSources
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
from pipelines.training.finetune import FinetunedCheckpoint, finetune_checkpoint
from pipelines.training.train import TrainConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AblationVariant:
    key: str
    """Its partition key."""
    mmfs: bool
    """MMFS in the LLM and the image decoder."""
    many_tokens: bool
    """Packed with the ablation's ``many_image_tokens`` visual tokens per image instead of the packing's
    ``num_image_tokens``."""

    def tokens(self, packing: PackingConfig, many_image_tokens: int) -> int:
        """Its visual tokens per image."""
        return many_image_tokens if self.many_tokens else packing.num_image_tokens

    def name(self, tokens: int) -> str:
        """Its label in the report, e.g. ``32 tokens, MMFS``."""
        return f"{tokens} tokens, {'MMFS' if self.mmfs else 'no MMFS'}"


VARIANTS = {v.key: v for v in (AblationVariant("mmfs", mmfs=True, many_tokens=False),
                               AblationVariant("no_mmfs", mmfs=False, many_tokens=False),
                               AblationVariant("many_tokens_no_mmfs", mmfs=False, many_tokens=True))}
"""The paper's variants by key, in its table's order."""


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
                  many_image_tokens: int, shards: SequenceShards, layout: DataLayout,
                  log: Callable[[str], None] = logger.info) -> dict[str, PackedSequences]:
    """The same documents packed for each variant of ``keys`` (:data:`VARIANTS`): ``packing`` with the variant's
    visual tokens (one ``max_length`` for all, with room for the largest variant's images)."""
    packed = {}
    for key in keys:
        tokens = VARIANTS[key].tokens(packing, many_image_tokens)
        packed[key] = pack_shards(filtered, downloads, recaptions, tokenizer,
                                  dataclasses.replace(packing, num_image_tokens=tokens), shards, layout, log)
        log(f"{VARIANTS[key].name(tokens)}: {packed[key].samples} sequences")
    return packed


def train_variants(sequences: Mapping[str, PackedSequences], tokenizer: TokenizerManifest, model: ModelChoice,
                   training: TrainConfig, compute: Compute = Compute(),
                   log: Callable[[str], None] = logger.info) -> dict[str, Checkpoint]:
    """``model`` trained on each variant's sequences, MMFS on or off as the variant says, with the same settings
    (``training``; see :func:`pipelines.training.checkpoint.train_checkpoint`)."""
    return {key: train_checkpoint(packed, tokenizer, dataclasses.replace(model, mmfs=VARIANTS[key].mmfs), training,
                                  compute, log)
            for key, packed in sequences.items()}


def pack_variant_instructions(sources: InstructionSources, tokenizer: TokenizerManifest,
                              sequences: Mapping[str, PackedSequences], shards: SequenceShards, layout: DataLayout,
                              log: Callable[[str], None] = logger.info) -> dict[str, InstructionSequences]:
    """The instruction data packed as each variant's pretraining sequences were (its visual tokens)."""
    return {key: pack_instructions(sources, tokenizer, packed, shards, layout, log) for key, packed in sequences.items()}


def finetune_variants(checkpoints: Mapping[str, Checkpoint], instructions: Mapping[str, InstructionSequences],
                      training: TrainConfig, compute: Compute = Compute(),
                      log: Callable[[str], None] = logger.info) -> dict[str, FinetunedCheckpoint]:
    """Each variant's checkpoint fine-tuned on its instruction sequences with the same settings (``training``; see
    :func:`pipelines.training.finetune.finetune_checkpoint`)."""
    return {key: finetune_checkpoint(checkpoint, instructions[key], training, compute, log)
            for key, checkpoint in checkpoints.items()}


def ablation_report(checkpoints: Mapping[str, FinetunedCheckpoint], world: PublishedWorld, scorer: ClipScorerManifest,
                    config: EvaluationConfig, out_root: Path, compute: Compute = Compute(),
                    log: Callable[[str], None] = logger.info) -> AblationReport:
    """Evaluate every variant's fine-tuned checkpoint on ``world``'s benchmarks and write one comparison report
    (scores, pretraining and fine-tuning loss curves, lineage) into ``out_root/<fingerprint of the inputs>/``."""
    loaded = scorer.load(compute)
    names = {key: VARIANTS[key].name(c.pretrained.packing.num_image_tokens) for key, c in checkpoints.items()}
    results: dict[str, EvaluationResult] = {}
    seconds: dict[str, float] = {}
    for key, checkpoint in checkpoints.items():
        start = time.perf_counter()
        results[names[key]] = evaluate_checkpoint(checkpoint.model_dir, world.eval_dir, config, world=world.world,
                                                  clip_scorer=loaded, compute=compute)
        seconds[names[key]] = time.perf_counter() - start
        log(f"{names[key]}: {results[names[key]].metrics()} ({seconds[names[key]]:.0f} s)")
    first = next(iter(checkpoints.values()))
    lineage = {"training shards": {names[k]: c.pretrained.shards.path for k, c in checkpoints.items()},
               "instruction shards": {names[k]: c.shards.path for k, c in checkpoints.items()},
               "filter thresholds": first.pretrained.filter_thresholds,
               "training": _settings(first.pretrained.train_config), "fine-tuning": _settings(first.train_config),
               "variants": {names[k]: {"num_visual_tokens": c.pretrained.packing.num_image_tokens,
                                       "mmfs": VARIANTS[k].mmfs} for k, c in checkpoints.items()},
               "git commit": first.git_commit, "evaluation seconds per variant": {k: round(v) for k, v in seconds.items()}}
    curves = {}
    for key, checkpoint in checkpoints.items():
        curves[f"{names[key]}: pretraining"] = checkpoint.pretrained.metrics()
        curves[f"{names[key]}: fine-tuning"] = checkpoint.metrics()
    out = out_root / fingerprint([c.version for c in checkpoints.values()], dataclasses.asdict(config), scorer.version)
    write_report(out, results, training=curves, lineage=lineage,
                 title="MMFS ablation (paper Tab. 6(a)) on the sample world, pretrained and fine-tuned")
    return AblationReport(str(out), {name: r.estimates() for name, r in results.items()}, seconds)


def _settings(train_config: Mapping[str, object]) -> dict[str, object]:
    """A run's settings without the paths and the model config its inputs set."""
    return {k: v for k, v in train_config.items() if k not in ("run_dir", "shards", "model")}
