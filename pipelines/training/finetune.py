"""The finetuned_checkpoint stage: the paper's supervised fine-tuning. The pretrained checkpoint's model trained
further on the instruction shards (:mod:`pipelines.data.instruction_sequences`: loss on the answers only) with the
same loop (:func:`pipelines.training.train.train`), keeping the lineage of the checkpoint it started from (and so of
its untrained step-0 twin)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipelines.compute import Compute
from pipelines.data.instruction_sequences import InstructionSequences
from pipelines.data.shards import read_index
from pipelines.files import fingerprint
from pipelines.lineage import git_commit
from pipelines.training.checkpoint import PATH_FIELDS, Checkpoint, ShardLineage
from pipelines.training.train import TrainConfig, read_metrics, train

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetunedCheckpoint:
    """A model fine-tuned on instruction shards, and the pretrained checkpoint it started from."""

    run_dir: str
    checkpoint: str
    model_dir: str
    step: int
    train_config: dict[str, Any]
    shards: ShardLineage
    """The instruction shards."""
    pretrained: Checkpoint
    """Where fine-tuning started: its model, its shards and filter thresholds, its untrained twin."""
    git_commit: str
    skipped_batches: int = 0
    seconds: float = 0.0
    """Time this run spent (0 steps when it resumed a finished run)."""

    @property
    def version(self) -> str:
        settings = {k: v for k, v in self.train_config.items() if k not in PATH_FIELDS}
        return fingerprint(self.pretrained.version, self.shards.data_version, settings, self.step)

    def metrics(self) -> list[dict[str, Any]]:
        """The run's optimizer-step records (``metrics.jsonl``)."""
        return read_metrics(self.run_dir)


def finetune_checkpoint(pretrained: Checkpoint, sequences: InstructionSequences, training: TrainConfig,
                        compute: Compute = Compute(), log: Callable[[str], None] = logger.info) -> FinetunedCheckpoint:
    """Train ``pretrained``'s model on ``sequences`` (DeepSpeed; resumes a run of the same inputs and settings).

    ``training`` gives the settings; its ``run_dir`` is the folder the run's own folder is made in (named by the
    fingerprint of the pretrained checkpoint, the shards and the settings), and its ``shards``, ``tokenizer``,
    ``model`` and ``torch_threads`` are set from the other arguments."""
    from model.mm_interleaved import MMInterleaved  # transformers, diffusers and open_clip: ~5 s, only when used

    if sequences.samples == 0:
        raise ValueError(f"{sequences.path} holds no instruction sequence to fine-tune on (were all items malformed?)")
    if sequences.packing.num_image_tokens != pretrained.packing.num_image_tokens:
        raise ValueError(f"{sequences.path} was packed with {sequences.packing.num_image_tokens} tokens per image; "
                         f"the pretrained model has {pretrained.packing.num_image_tokens}")
    model = MMInterleaved.from_pretrained(pretrained.model_dir)
    model_ids = (model.tokenizer.bos_token_id, model.tokenizer.eos_token_id, model.boi_token_id, model.image_token_id)
    shard_ids = sequences.token_ids
    if model_ids != (shard_ids.bos, shard_ids.eos, shard_ids.boi, shard_ids.image):
        raise ValueError(f"{sequences.path} was packed with another tokenizer than {pretrained.model_dir}'s "
                         f"(<s> </s> <BoI> <image>: {shard_ids} vs {model_ids})")
    inputs = {"shards": sequences.path, "tokenizer": pretrained.train_config.get("tokenizer"),
              "model": model.config.to_dict(), "torch_threads": compute.torch_threads}
    settings = {k: v for k, v in replace(training, **inputs).to_dict().items() if k not in PATH_FIELDS}
    run_dir = Path(training.run_dir) / fingerprint(pretrained.version, sequences.version, settings)
    config = replace(training, run_dir=str(run_dir), **inputs)
    log(f"fine-tuning {pretrained.model_dir} for {config.max_steps} steps in {run_dir} on {sequences.samples} "
        "instruction sequences")
    start = time.perf_counter()
    result = train(config, model=model)
    index = read_index(sequences.path)
    return FinetunedCheckpoint(
        run_dir=str(run_dir), checkpoint=str(result.checkpoint), model_dir=str(result.checkpoint / "model"),
        step=result.step, train_config=config.to_dict(),
        shards=ShardLineage(sequences.path, sequences.version, {s.name: s.sha256 for s in index.shards}, index.samples),
        pretrained=pretrained, git_commit=git_commit(), skipped_batches=result.skipped_batches,
        seconds=time.perf_counter() - start)
