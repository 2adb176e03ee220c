"""The checkpoint stage: MM-Interleaved trained on the packed shards (:mod:`pipelines.training.train`), with the
untrained model of the same seed saved beside it as the step-0 baseline, and the lineage of both."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch

from model.config import MMInterleavedConfig
from pipelines.compute import Compute
from pipelines.data.packed_sequences import PackedSequences
from pipelines.data.packing import PackingConfig
from pipelines.data.shards import read_index
from pipelines.data.tokenizer import TokenizerManifest
from pipelines.files import fingerprint
from pipelines.lineage import git_commit
from pipelines.training.run_lock import run_folder_lock
from pipelines.training.train import (
    TrainConfig,
    build_model,
    build_model_with_fitted_vae,
    read_metrics,
    save_model,
    train,
)

logger = logging.getLogger(__name__)

SCRATCH_PRESETS = ("tiny", "small")
"""The :class:`~model.config.MMInterleavedConfig` presets built from scratch (no pretrained part)."""


@dataclass(frozen=True)
class ModelChoice:
    """Which model the checkpoint trains."""

    config_json: str = ""
    """A model ``config.json`` (e.g. the paper preset's); empty: the ``preset`` with the shards' visual tokens."""
    preset: Literal[SCRATCH_PRESETS] = "tiny"
    """Without ``config_json``: the model built from scratch, ``tiny`` (the demo's and the quality recipe's) or
    ``small`` (64 px; :meth:`model.config.MMInterleavedConfig.small` has why the recipe does not train it)."""
    mmfs: bool = True
    """Without ``config_json``: MMFS in the LLM and the image decoder (off: the ablation's baseline)."""
    train_vit: bool = False
    """Without ``config_json``: train the preset's randomly initialised ViT too (:attr:`model.config.VisionConfig.train_vit`)."""
    vae_steps: int = 150
    """Models without a pretrained VAE (the presets): fit the random VAE to the training images for this many steps
    before training (0: keep it random, and every generated image is noise)."""

    def model_config(self, num_visual_tokens: int) -> MMInterleavedConfig:
        """The model's config, checked against the visual tokens the shards were packed with."""
        if self.config_json:
            config = MMInterleavedConfig.load(self.config_json)
        else:
            config = getattr(MMInterleavedConfig, self.preset)(num_visual_tokens=num_visual_tokens, mmfs=self.mmfs)
            config.vision = replace(config.vision, train_vit=self.train_vit)
        if config.num_visual_tokens != num_visual_tokens:
            raise ValueError(f"{self.config_json}: the model has {config.num_visual_tokens} visual tokens, "
                             f"the shards were packed with {num_visual_tokens}")
        return config


@dataclass(frozen=True)
class ShardLineage:
    """The training shards: their folder, its data version, each tar's sha256 and the sample count."""

    path: str
    data_version: str
    files: dict[str, str]
    samples: int


@dataclass(frozen=True)
class Checkpoint:
    """A trained model, its untrained twin and where both came from."""

    run_dir: str
    checkpoint: str
    model_dir: str
    untrained_model_dir: str
    step: int
    model_config_hash: str
    train_config: dict[str, Any]
    shards: ShardLineage
    filter_thresholds: dict[str, dict[str, Any]]
    packing: PackingConfig
    git_commit: str
    skipped_batches: int = 0
    vae_losses: list[float] = field(default_factory=list)
    """The VAE fit's losses (empty when it was not fitted)."""
    seconds: float = 0.0
    """Time this run spent (0 steps when it resumed a finished run)."""

    @property
    def version(self) -> str:
        """The model config, the shards' data version, the settings and the step: never the paths of its inputs."""
        return fingerprint(self.model_config_hash, self.shards.data_version, _settings(self.train_config), self.step)

    def metrics(self) -> list[dict[str, Any]]:
        """The run's optimizer-step records (``metrics.jsonl``)."""
        return read_metrics(self.run_dir)


PATH_FIELDS = ("run_dir", "shards", "tokenizer")
"""TrainConfig fields that say where things lie; the data versions of the shards and tokenizer stand for them."""


def _settings(train_config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in train_config.items() if k not in PATH_FIELDS}


def train_checkpoint(sequences: PackedSequences, tokenizer: TokenizerManifest, model: ModelChoice, training: TrainConfig,
                     compute: Compute = Compute(), log: Callable[[str], None] = logger.info) -> Checkpoint:
    """Train on ``sequences`` (DeepSpeed; resumes a run of the same inputs and settings) and save the untrained
    model of the same seed (and the same fitted VAE) beside it as the step-0 baseline.

    ``training`` gives the settings; its ``run_dir`` is the folder the run's own folder is made in (named by the
    fingerprint of the shards, the model and the settings), and its ``shards``, ``tokenizer``, ``model`` and
    ``torch_threads`` are set from the other arguments."""
    if sequences.samples == 0:
        raise ValueError(f"{sequences.path} holds no packed sequence to train on (did filtering keep any document?)")
    model_config = model.model_config(sequences.packing.num_image_tokens)
    config_hash = fingerprint(model_config.to_dict())
    inputs = {"shards": sequences.path, "tokenizer": tokenizer.path, "model": model_config.to_dict(),
              "torch_threads": compute.torch_threads}
    settings = _settings(replace(training, **inputs).to_dict())
    run_dir = Path(training.run_dir) / fingerprint(sequences.version, tokenizer.version, settings, config_hash)
    config = replace(training, run_dir=str(run_dir), **inputs)
    log(f"training {config.max_steps} steps in {run_dir} on {sequences.samples} sequences")
    start = time.perf_counter()
    vae_losses: list[float] = []
    if model.vae_steps > 0 and not model.config_json:
        built, vae_losses = build_model_with_fitted_vae(config, model.vae_steps)
        log(f"VAE fitted to the training images: loss {vae_losses[0]:.4f} -> {vae_losses[-1]:.4f}")
    else:
        torch.manual_seed(config.seed)
        built = build_model(config)
    with run_folder_lock(run_dir):  # one writer: the untrained twin too
        untrained = save_model(built, run_dir / "untrained" / "model")  # the step-0 baseline: same init, same VAE
        result = train(config, model=built)
    index = read_index(sequences.path)
    return Checkpoint(
        run_dir=str(run_dir), checkpoint=str(result.checkpoint), model_dir=str(result.checkpoint / "model"),
        untrained_model_dir=str(untrained), step=result.step, model_config_hash=config_hash,
        train_config=config.to_dict(), filter_thresholds=sequences.filter_thresholds, packing=sequences.packing,
        shards=ShardLineage(sequences.path, sequences.version, {s.name: s.sha256 for s in index.shards}, index.samples),
        git_commit=git_commit(), skipped_batches=result.skipped_batches, vae_losses=vae_losses,
        seconds=time.perf_counter() - start)
