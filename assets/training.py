"""The model checkpoint: MM-Interleaved trained on the packed shards (``model.train``), with its step-0 baseline."""

import time
from pathlib import Path

import dagster as dg
import torch

from assets.metadata import data_version
from model.config import MMInterleavedConfig
from model.train import TrainConfig, build_model, build_model_with_fitted_vae, read_metrics, save_model, train
from orchestration.resources import Storage
from pipelines.evaluation.report import figure_markdown, git_commit, plot_loss_curves
from pipelines.shards import read_index


class TrainingSettings(dg.Config):
    """``model.train.TrainConfig`` fields set per run; the defaults are the sample world's (~5-6 min on 2 CPU cores
    for shards packed with 8 visual tokens into 320-token sequences)."""

    config_json: str = ""
    """A model ``config.json`` (e.g. the paper preset's); empty: the ``tiny`` preset with the shards' visual tokens."""
    mmfs: bool = True
    """``tiny`` preset only: MMFS in the LLM and the image decoder (off: the ablation's baseline)."""
    vae_steps: int = 150
    """Models without a pretrained VAE (``tiny``): fit the random VAE to the training images for this many
    steps before training (0: keep it random, and every generated image is noise)."""
    torch_threads: int = 0
    """CPU threads while training; 0 keeps torch's setting (all cores), 1 avoids oversubscribing a CPU shared
    with other steps."""
    max_steps: int = 500
    batch_size: int = 1
    grad_accum_steps: int = 1
    lr: float = 1e-3
    decoder_lr: float = 2e-3
    warmup_steps: int = 10
    schedule: str = "cosine"
    weight_decay: float = 0.05
    zero_stage: int = 0
    precision: str = "auto"
    seed: int = 0
    checkpoint_every: int = 250
    shuffle_buffer: int = 64
    num_workers: int = 0

    def build_model_config(self, num_visual_tokens: int) -> MMInterleavedConfig:
        if self.config_json:
            config = MMInterleavedConfig.load(self.config_json)
        else:
            config = MMInterleavedConfig.tiny(num_visual_tokens=num_visual_tokens, mmfs=self.mmfs)
        if config.num_visual_tokens != num_visual_tokens:
            raise ValueError(f"{self.config_json}: the model has {config.num_visual_tokens} visual tokens, "
                             f"the shards were packed with {num_visual_tokens}")
        return config


def model_config_hash(config: MMInterleavedConfig) -> str:
    return data_version(config.to_dict()).value


@dg.asset(group_name="training", kinds={"pytorch", "deepspeed", "safetensors"})
def checkpoint(
    context: dg.AssetExecutionContext, config: TrainingSettings, storage: Storage, tokenizer: dict, packed_sequences: dict,
) -> dg.Output[dict]:
    """Train MM-Interleaved on the packed shards (DeepSpeed; resumes a run of the same inputs and settings) and
    save the untrained model of the same seed beside it as the step-0 baseline."""
    packing = packed_sequences["meta"]["packing"]
    model_config = config.build_model_config(packing["num_image_tokens"])
    config_hash = model_config_hash(model_config)
    shards_version = Path(packed_sequences["path"]).name  # the packed_sequences data version names its folder
    settings = config.model_dump()
    run_dir = storage.path("checkpoints", data_version(shards_version, settings, config_hash).value)
    train_config = TrainConfig(
        run_dir=str(run_dir), shards=packed_sequences["path"], tokenizer=tokenizer["path"], model=model_config.to_dict(),
        **{k: v for k, v in settings.items() if k not in ("config_json", "mmfs", "vae_steps")}, progress=True,
    )
    context.log.info(f"training {config.max_steps} steps in {run_dir} on {packed_sequences['samples']} sequences")
    start = time.perf_counter()
    vae_losses: list[float] = []
    if config.vae_steps > 0 and not config.config_json:
        model, vae_losses = build_model_with_fitted_vae(train_config, config.vae_steps)
        context.log.info(f"VAE fitted to the training images: loss {vae_losses[0]:.4f} -> {vae_losses[-1]:.4f}")
    else:
        torch.manual_seed(config.seed)
        model = build_model(train_config)
    untrained = save_model(model, run_dir / "untrained" / "model")  # the step-0 baseline: same init, same VAE
    result = train(train_config, model=model)
    seconds = time.perf_counter() - start
    records = read_metrics(run_dir)
    index = read_index(packed_sequences["path"])
    manifest = {
        "run_dir": str(run_dir),
        "checkpoint": str(result.checkpoint),
        "model_dir": str(result.checkpoint / "model"),
        "untrained_model_dir": str(untrained),
        "step": result.step,
        "model_config_hash": config_hash,
        "train_config": train_config.to_dict(),
        "shards": {"path": packed_sequences["path"], "data_version": shards_version,
                   "files": {s.name: s.sha256 for s in index.shards}, "samples": index.samples},
        "filter_thresholds": packed_sequences["meta"]["filter_thresholds"],
        "packing": packing,
        "git_commit": git_commit(),
    }
    last = records[-1] if records else {}
    metadata = {
        "step": result.step,
        "final_loss": last.get("loss", float("nan")),
        "final_text_loss": last.get("text_loss", float("nan")),
        "final_image_loss": last.get("image_loss", float("nan")),
        "skipped_batches": result.skipped_batches,
        "vae_final_loss": vae_losses[-1] if vae_losses else "not fitted",
        "seconds_this_run": seconds,
        "tokens_per_second": sum(r["tokens"] for r in records) / max(sum(r["seconds"] for r in records), 1e-9),
        "loss_curve": dg.MetadataValue.md(figure_markdown(plot_loss_curves({"train": records}), "loss curve")
                                          if records else "_no steps recorded_"),
        "model_config_hash": config_hash,
        "shards_data_version": shards_version,
        "git_commit": manifest["git_commit"],
        "checkpoint": dg.MetadataValue.path(manifest["checkpoint"]),
    }
    return dg.Output(manifest, metadata=metadata,
                     data_version=data_version(config_hash, shards_version, settings, result.step))
