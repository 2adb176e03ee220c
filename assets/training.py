"""The model checkpoint: MM-Interleaved trained on the packed shards (``pipelines.training``), with its step-0 baseline."""

import dagster as dg

from assets.resources import Compute, Storage
from assets.settings import stage_fields
from pipelines.data.packed_sequences import PackedSequences
from pipelines.data.tokenizer import TokenizerManifest
from pipelines.evaluation.report import figure_markdown, plot_loss_curves
from pipelines.training.checkpoint import Checkpoint, ModelChoice, train_checkpoint
from pipelines.training.finetune import FinetunedCheckpoint
from pipelines.training.train import TrainConfig

RUN_INPUTS = ("run_dir", "shards", "tokenizer", "model", "torch_threads")
"""TrainConfig fields the checkpoint stage sets from its inputs (and the ``compute`` resource), not run config."""


class TrainingSettings(stage_fields(TrainConfig, ModelChoice, exclude=(*RUN_INPUTS, "betas"))):
    """The training run (:class:`pipelines.training.train.TrainConfig`) and the model it trains
    (:class:`pipelines.training.checkpoint.ModelChoice`); the sample world's values are in
    ``orchestration/presets/sample_world.yaml``."""


@dg.asset(group_name="training", kinds={"pytorch", "deepspeed", "safetensors"})
def checkpoint(context: dg.AssetExecutionContext, config: TrainingSettings, storage: Storage, compute: Compute,
               tokenizer: TokenizerManifest, packed_sequences: PackedSequences) -> dg.Output[Checkpoint]:
    """Train MM-Interleaved on the packed shards (DeepSpeed; resumes a run of the same inputs and settings) and
    save the untrained model of the same seed beside it as the step-0 baseline."""
    training = config.to(TrainConfig, run_dir=str(storage.layout.path("checkpoints")),
                         shards=packed_sequences.path)
    trained = train_checkpoint(packed_sequences, tokenizer, config.to(ModelChoice), training, compute.get(),
                               log=context.log.info)
    return dg.Output(trained, metadata=_metadata(trained), data_version=dg.DataVersion(trained.version))


def run_metadata(run: Checkpoint | FinetunedCheckpoint, label: str) -> dict:
    """What a training run's materialization shows of its steps: last losses, skipped batches, time, the loss
    curve (its line named ``label``)."""
    records = run.metrics()
    last = records[-1] if records else {}
    return {
        "step": run.step,
        "final_loss": last.get("loss", float("nan")),
        "final_text_loss": last.get("text_loss", float("nan")),
        "final_image_loss": last.get("image_loss", float("nan")),
        "skipped_batches": run.skipped_batches,
        "seconds_this_run": run.seconds,
        "loss_curve": dg.MetadataValue.md(figure_markdown(plot_loss_curves({label: records}), "loss curve")
                                          if records else "_no steps recorded_"),
    }


def _metadata(trained: Checkpoint) -> dict:
    records = trained.metrics()
    return {
        **run_metadata(trained, "train"),
        "vae_final_loss": trained.vae_losses[-1] if trained.vae_losses else "not fitted",
        "tokens_per_second": sum(r["tokens"] for r in records) / max(sum(r["seconds"] for r in records), 1e-9),
        "model_config_hash": trained.model_config_hash,
        "shards_data_version": trained.shards.data_version,
        "git_commit": trained.git_commit,
        "checkpoint": dg.MetadataValue.path(trained.checkpoint),
    }
