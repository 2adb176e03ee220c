"""Supervised fine-tuning (the paper's SFT stage): instruction data packed with loss on the answers only, and the
checkpoint fine-tuned on it from the pretrained one."""

import dagster as dg

from assets.metadata import bullets, table
from assets.resources import Compute, Storage
from assets.settings import stage_fields
from assets.packing import shard_integrity
from assets.training import RUN_INPUTS, run_metadata
from pipelines.data.instruction_sequences import InstructionSequences, pack_instructions
from pipelines.data.instructions import InstructionSources
from pipelines.data.packed_sequences import PackedSequences, SequenceShards
from pipelines.data.tokenizer import TokenizerManifest
from pipelines.training.checkpoint import Checkpoint
from pipelines.training.finetune import FinetunedCheckpoint, finetune_checkpoint
from pipelines.training.train import TrainConfig


class InstructionSettings(stage_fields(InstructionSources, SequenceShards)):
    """Where the LLaVA-style instruction files and their images are
    (:class:`pipelines.data.instructions.InstructionSources`; the sample world writes its own under the raw folder)
    and how many sequences go in a tar."""


@dg.asset(group_name="finetuning", kinds={"webdataset"})
def instruction_sequences(context: dg.AssetExecutionContext, config: InstructionSettings, storage: Storage,
                          tokenizer: TokenizerManifest, packed_sequences: PackedSequences,
                          ) -> dg.Output[InstructionSequences]:
    """Read the instruction files (a malformed item is skipped and named by file and index), pack them as the
    pretraining sequences are packed (same tokenizer, length and visual tokens) with loss on the answers only, and
    write them as WebDataset tars with an index."""
    sequences = pack_instructions(config.to(InstructionSources), tokenizer, packed_sequences,
                                  config.to(SequenceShards), storage.layout, log=context.log.info)
    return dg.Output(sequences, metadata=_instruction_metadata(sequences), data_version=dg.DataVersion(sequences.version))


def _instruction_metadata(sequences: InstructionSequences) -> dict:
    counts = sequences.counts
    return {
        "items": counts.items,
        "malformed_items": counts.malformed,
        "malformed_examples": bullets(counts.malformed_examples),
        "sequences": sequences.samples,
        "trained_tokens": counts.losses.trained_tokens,
        "untrained_tokens": counts.losses.untrained_tokens,
        "trained_images": counts.losses.trained_images,
        "untrained_images": counts.losses.untrained_images,
        "split_documents": counts.stats.split_documents,
        "instruction_files": table(sequences.meta["instructions"], ("file", "sha256")),
        "bytes": sequences.bytes,
        "path": dg.MetadataValue.path(sequences.path),
    }


@dg.asset_check(asset=instruction_sequences, blocking=True,
                description="Shards match their index: files, sizes, sha256 and sample counts.")
def instruction_sequences_shard_integrity(instruction_sequences: InstructionSequences) -> dg.AssetCheckResult:
    return shard_integrity(instruction_sequences.path, instruction_sequences.samples)


class FinetuningSettings(stage_fields(TrainConfig, exclude=(*RUN_INPUTS, "betas"))):
    """The fine-tuning run (:class:`pipelines.training.train.TrainConfig`); the sample world's values are in
    ``orchestration/presets/sample_world.yaml``."""


@dg.asset(group_name="finetuning", kinds={"pytorch", "deepspeed", "safetensors"})
def finetuned_checkpoint(context: dg.AssetExecutionContext, config: FinetuningSettings, storage: Storage,
                         compute: Compute, checkpoint: Checkpoint,
                         instruction_sequences: InstructionSequences) -> dg.Output[FinetunedCheckpoint]:
    """Fine-tune the trained checkpoint's model on the instruction shards (DeepSpeed; resumes a run of the same
    inputs and settings), keeping the lineage of the checkpoint it started from."""
    training = config.to(TrainConfig, run_dir=str(storage.layout.path("finetuned_checkpoints")),
                         shards=instruction_sequences.path)
    tuned = finetune_checkpoint(checkpoint, instruction_sequences, training, compute.get(), log=context.log.info)
    return dg.Output(tuned, metadata=_finetuned_metadata(tuned), data_version=dg.DataVersion(tuned.version))


def _finetuned_metadata(tuned: FinetunedCheckpoint) -> dict:
    return {
        **run_metadata(tuned, "finetuning"),
        "pretrained_checkpoint": dg.MetadataValue.path(tuned.pretrained.checkpoint),
        "instruction_shards_data_version": tuned.shards.data_version,
        "git_commit": tuned.git_commit,
        "checkpoint": dg.MetadataValue.path(tuned.checkpoint),
    }
