"""The MMFS ablation (paper Tab. 6(a)) in the graph: per variant (partitions of ``ablation_variants``), packed
sequences, a checkpoint, instruction sequences and a fine-tuned checkpoint, then one report comparing the variants."""

import dagster as dg

from assets.evaluation import EvaluationSettings
from assets.finetuning import FinetuningSettings, InstructionSettings
from assets.metadata import table
from assets.packing import PackingSettings
from assets.partitions import ablation_variants, single_run
from assets.resources import Compute, Storage
from assets.settings import stage_fields
from assets.training import RUN_INPUTS
from pipelines.data.clip_score import ClipScorerManifest
from pipelines.data.downloaded_images import DownloadedShard
from pipelines.data.instruction_sequences import InstructionSequences
from pipelines.data.instructions import InstructionSources
from pipelines.data.decontaminated_documents import DecontaminatedDocuments
from pipelines.data.packed_sequences import PackedSequences, SequenceShards
from pipelines.data.packing import PackingConfig
from pipelines.data.recaptions import RecaptionedShard
from pipelines.data.tokenizer import TokenizerManifest
from pipelines.evaluation.ablation import (AblationReport, ablation_report, finetune_variants, pack_variant_instructions,
                                          pack_variants, train_variants)
from pipelines.evaluation.report import inline_images
from pipelines.evaluation.run import EvaluationConfig
from pipelines.sample_world.publish import PublishedWorld
from pipelines.training.checkpoint import Checkpoint, ModelChoice
from pipelines.training.finetune import FinetunedCheckpoint
from pipelines.training.train import TrainConfig

EVERY_SHARD = dg.AssetIn(partition_mapping=dg.AllPartitionMapping())
"""A variant's input from the data graph: all of its raw-shard partitions."""


class AblationPackingSettings(PackingSettings):
    """Packing shared by every variant: ``num_image_tokens`` for the variants with and without MMFS,
    ``many_image_tokens`` for the one without MMFS that sees more tokens instead (``max_length`` needs room for two
    of its images)."""

    many_image_tokens: int = 256
    """Visual tokens per image of the many-tokens variant (the paper's: 256)."""


class AblationTrainingSettings(stage_fields(TrainConfig, ModelChoice,
                                            exclude=(*RUN_INPUTS, "betas", "mmfs", "config_json"))):
    """Training and model shared by every variant (:class:`pipelines.training.train.TrainConfig`,
    :class:`pipelines.training.checkpoint.ModelChoice`, a preset built from scratch); each variant sets MMFS."""


@dg.asset(group_name="ablation", partitions_def=ablation_variants, backfill_policy=single_run, kinds={"webdataset"},
          ins={"downloaded_images": EVERY_SHARD, "recaptions": EVERY_SHARD})
def ablation_sequences(
    context: dg.AssetExecutionContext,
    config: AblationPackingSettings,
    storage: Storage,
    tokenizer: TokenizerManifest,
    decontaminated_documents: DecontaminatedDocuments,
    downloaded_images: dict[str, DownloadedShard],
    recaptions: dict[str, RecaptionedShard],
) -> dict[str, PackedSequences]:
    """The training documents (filtered, deduplicated, decontaminated) packed for each variant's visual tokens."""
    return pack_variants(context.partition_keys, decontaminated_documents.shards, downloaded_images, recaptions,
                         tokenizer, config.to(PackingConfig), config.many_image_tokens, config.to(SequenceShards),
                         storage.layout, log=context.log.info)


@dg.asset(group_name="ablation", partitions_def=ablation_variants, backfill_policy=single_run,
          kinds={"pytorch", "deepspeed", "safetensors"})
def ablation_checkpoints(context: dg.AssetExecutionContext, config: AblationTrainingSettings, storage: Storage,
                         compute: Compute, tokenizer: TokenizerManifest,
                         ablation_sequences: dict[str, PackedSequences]) -> dict[str, Checkpoint]:
    """The model trained on each variant's sequences, MMFS on or off as the variant says."""
    first = next(iter(ablation_sequences.values()))
    training = config.to(TrainConfig, run_dir=str(storage.layout.path("checkpoints")), shards=first.path)
    return train_variants(ablation_sequences, tokenizer, config.to(ModelChoice), training, compute.get(),
                          log=context.log.info)


@dg.asset(group_name="ablation", partitions_def=ablation_variants, backfill_policy=single_run, kinds={"webdataset"})
def ablation_instruction_sequences(context: dg.AssetExecutionContext, config: InstructionSettings, storage: Storage,
                                   tokenizer: TokenizerManifest, ablation_sequences: dict[str, PackedSequences],
                                   ) -> dict[str, InstructionSequences]:
    """The instruction data packed as each variant's sequences were (its visual tokens), loss on the answers only."""
    return pack_variant_instructions(config.to(InstructionSources), tokenizer, ablation_sequences,
                                     config.to(SequenceShards), storage.layout, log=context.log.info)


@dg.asset(group_name="ablation", partitions_def=ablation_variants, backfill_policy=single_run,
          kinds={"pytorch", "deepspeed", "safetensors"})
def ablation_finetuned_checkpoints(context: dg.AssetExecutionContext, config: FinetuningSettings, storage: Storage,
                                   compute: Compute, ablation_checkpoints: dict[str, Checkpoint],
                                   ablation_instruction_sequences: dict[str, InstructionSequences],
                                   ) -> dict[str, FinetunedCheckpoint]:
    """Each variant's checkpoint fine-tuned on its instruction sequences (the paper's SFT stage)."""
    first = next(iter(ablation_instruction_sequences.values()))
    training = config.to(TrainConfig, run_dir=str(storage.layout.path("finetuned_checkpoints")), shards=first.path)
    return finetune_variants(ablation_checkpoints, ablation_instruction_sequences, training, compute.get(),
                             log=context.log.info)


@dg.asset(group_name="ablation", kinds={"pytorch", "markdown"})
def mmfs_ablation_report(
    context: dg.AssetExecutionContext,
    config: EvaluationSettings,
    storage: Storage,
    compute: Compute,
    ablation_finetuned_checkpoints: dict[str, FinetunedCheckpoint],
    sample_world: PublishedWorld,
    clip_scorer: ClipScorerManifest,
) -> dg.Output[AblationReport]:
    """Paper Tab. 6(a) on the sample world: N visual tokens with MMFS vs N without vs many without, each packed,
    pretrained, fine-tuned and evaluated alike, in one report."""
    report = ablation_report(ablation_finetuned_checkpoints, sample_world, clip_scorer, config.to(EvaluationConfig),
                             storage.layout.path("mmfs_ablation"), compute.get(), log=context.log.info)
    metadata = {"report": dg.MetadataValue.md(inline_images(report.path, names=["tasks.png", "loss.png"])),
                "seconds": table({k: f"{v:.0f} s" for k, v in report.seconds.items()}, ("variant", "evaluation")),
                "path": dg.MetadataValue.path(report.path)}
    return dg.Output(report, metadata=metadata, data_version=dg.DataVersion(report.version))
