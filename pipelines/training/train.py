"""Train MM-Interleaved on packed WebDataset shards with DeepSpeed, from one process to many nodes.

One code path everywhere: ``python -m pipelines.training.train --config cfg.json`` runs one process (it sets up
a one-rank group itself); ``torchrun --nproc_per_node N -m pipelines.training.train --config cfg.json`` or the
``deepspeed`` launcher run N ranks per node. The backend is NCCL on GPUs and gloo on CPU; ZeRO's
stage comes from the config. Reads top to bottom: config -> distributed setup -> data -> model ->
optimizer/engine -> resume -> loop.

A run folder holds ``train_config.json``, ``metrics.jsonl`` (rank 0: one JSON object per optimizer
step, plus ``event`` records for skipped batches, checkpoints and resumes), ``samples/rank{r}.jsonl``
(the sample keys each rank consumed, per micro-batch: data lineage) and ``checkpoints/`` (see
:mod:`model.checkpoint`). Started again on the same folder, training resumes from the latest
checkpoint: weights, optimizer, step (the schedule is a function of it), each rank's data position and RNG.
A folder has one writer: each rank holds its lock in ``.lock/`` (:mod:`pipelines.training.run_lock`) and a second
training there stops before writing anything. Run alone, the rendezvous and gloo/NCCL listen on loopback only.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import ipaddress
import json
import logging
import math
import os
import socket
import sys
import time
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.distributed as dist
import webdataset as wds
from annotated_types import Ge, Gt, Interval
from safetensors.torch import load_file
from tqdm.auto import tqdm

from model.batch import InterleavedBatch
from model.checkpoint import (
    MODEL_DIR,
    TRAINER_STATE,
    latest_checkpoint,
    load_checkpoint,
    read_rank_state,
    save_checkpoint,
    set_rng_state,
)
from model.config import MMInterleavedConfig, OptimizerGroups
from pipelines.compute import cpu_threads, offline_process
from pipelines.data.loader import collate_sequences, sequence_dataset
from pipelines.data.shards import read_index
from pipelines.data.tokenizer import load_tokenizer
from pipelines.fields import check_fields
from pipelines.files import atomic_path, write_json, write_text
from pipelines.training.run_lock import RunFolderLocked, run_folder_lock
from pipelines.training.schedule import SCHEDULES, lr_factor

logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
METRICS = "metrics.jsonl"


# -------------------------------------------------------------------------------------------------
# config
# -------------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Everything a training run needs; written to ``{run_dir}/train_config.json``."""

    run_dir: str
    """Folder for checkpoints, metrics and sample logs; a run started on a folder with a checkpoint resumes."""
    shards: str | list[str]
    """A shard folder with ``index.json`` (``pipelines.data.shards``) or a list of shard paths/URLs."""
    tokenizer: str | None = None
    """Local tokenizer folder; ``None``: the model config's ``tokenizer_path``/``llm_path``."""
    model: str | dict[str, Any] = "tiny"
    """``"tiny"`` (the preset's defaults), a path to a model ``config.json``, or ``MMInterleavedConfig.to_dict()``."""
    max_steps: Annotated[int, Ge(1)] = 15000
    """Optimizer steps to train for (the paper: 15k)."""
    batch_size: Annotated[int, Ge(1)] = 1
    """Packed sequences per rank per micro-batch."""
    grad_accum_steps: Annotated[int, Ge(1)] = 1
    """Micro-batches per optimizer step; the global batch is ``batch_size * grad_accum_steps * world_size``."""
    lr: Annotated[float, Gt(0)] = OptimizerGroups.lr
    """Peak learning rate of everything but the UNet and the sampling offsets (the decoder's new modules included
    unless ``new_decoder_lr``): :class:`model.config.OptimizerGroups`, as the other rates."""
    decoder_lr: Annotated[float, Ge(0)] = OptimizerGroups.decoder_lr
    """Peak learning rate of the UNet."""
    new_decoder_lr: Annotated[float, Ge(0)] | None = OptimizerGroups.new_decoder_lr
    """Peak learning rate of the decoder's new modules (condition encoder, UNet MMFS, CFG negative); ``None``: ``lr``."""
    offsets_lr: Annotated[float, Ge(0)] | None = OptimizerGroups.offsets_lr
    """Peak learning rate of every MMFS ``sampling_offsets``; ``None``: the rate of the module they belong to."""
    weight_decay: Annotated[float, Ge(0)] = OptimizerGroups.weight_decay
    """AdamW weight decay (gates, sampling offsets, norms and biases are excluded by the model's groups)."""
    betas: tuple[float, float] = (0.9, 0.995)
    eps: Annotated[float, Gt(0)] = 1e-6
    """Adam's epsilon (the release's 1e-6)."""
    warmup_steps: Annotated[int, Ge(0)] = 1000
    """Linear warmup steps."""
    schedule: Literal[SCHEDULES] = "cosine"
    """After warmup: ``cosine`` decay to ``min_lr_ratio`` at ``max_steps``, or ``constant``."""
    min_lr_ratio: Annotated[float, Interval(ge=0, le=1)] = 0.0
    grad_clip: Annotated[float, Ge(0)] = 1.0
    """Clip the global gradient norm to this; 0 disables clipping."""
    precision: Literal[PRECISIONS] = "auto"
    """``auto`` (bf16 on GPUs that support it, else fp16 on GPU, fp32 on CPU), ``fp32``, ``bf16``, ``fp16``."""
    zero_stage: int = 1
    """DeepSpeed ZeRO stage: 0 (plain data parallel), 1 (optimizer states, the paper), 2 (+ gradients)."""
    seed: int = 0
    """Seeds the model init, the data order (per epoch) and each rank's RNG."""
    shuffle_buffer: Annotated[int, Ge(1)] = 256
    """Samples in each data worker's shuffle buffer (1: no shuffle)."""
    source_rates: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per corpus (a document's ``source``: ``mmc4``, ``laion``, ``cc12m``, ...), the expected uses of each of its packed
    rows per epoch; unlisted corpora 1, 0 leaves one out. The release mixes its corpora by sampling probability
    ([1, 1, 1, 2] for three pair sets and MMC4); weft reweights rows, so an epoch's mix is ``rate x rows`` per corpus.
    Empty (the default): every row once, the corpora as packed."""
    resampled: bool = False
    """Resample shards endlessly (multi-node recipe); then ``epoch_samples`` bounds an epoch and a
    resume starts a fresh, differently seeded epoch instead of replaying to the exact position."""
    epoch_samples: Annotated[int, Ge(1)] | None = None
    """Samples per data worker per epoch; required with ``resampled``."""
    num_workers: Annotated[int, Ge(0)] = 0
    """DataLoader worker processes per rank."""
    checkpoint_every: Annotated[int, Ge(1)] = 1000
    """Save a checkpoint every this many optimizer steps (and always at the end)."""
    keep_checkpoints: Annotated[int, Ge(0)] = 3
    """Checkpoints kept (oldest pruned first); 0 keeps all."""
    resume: bool = True
    """Resume from the run folder's latest checkpoint when there is one."""
    max_consecutive_skips: Annotated[int, Ge(1)] = 8
    """Abort when this many micro-batches in a row have a NaN/inf loss."""
    progress: bool = True
    """tqdm progress bar on rank 0."""
    log_samples: bool = True
    """Write the sample keys of every micro-batch to ``samples/rank{r}.jsonl``."""
    torch_threads: Annotated[int, Ge(0)] = 0
    """CPU threads of each rank while training; 0 keeps torch's setting. On a small shared CPU, 1 avoids
    oversubscription (measured: ~1 s instead of 5-50 s per step of the tiny preset with 3 busy processes on 2 cores)."""

    def __post_init__(self) -> None:
        check_fields(self)  # types, choices and ranges, from the annotations
        if not self.run_dir:
            raise ValueError("run_dir must be a folder path")
        if isinstance(self.shards, (list, tuple)):
            self.shards = [str(s) for s in self.shards]
            if not self.shards:
                raise ValueError("shards is an empty list")
        elif not self.shards:
            raise ValueError("shards must be a shard folder or a list of shard paths")
        self.betas = tuple(float(b) for b in self.betas)
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps {self.warmup_steps} exceeds max_steps {self.max_steps}")
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"zero_stage must be 0, 1 or 2, got {self.zero_stage} (stage 3 would need "
                             "parameter gathering to write the safetensors model; not supported yet)")
        bad_rates = {k: v for k, v in self.source_rates.items()
                     if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0}
        if bad_rates:
            raise ValueError(f"source_rates: rates must be numbers >= 0 keyed by source name, got {bad_rates}")
        if self.resampled and self.epoch_samples is None:
            raise ValueError("resampled=True reads shards forever: set epoch_samples")
        if self.model != "tiny" and not isinstance(self.model, dict) and not Path(self.model).is_file():
            raise ValueError(f"model must be 'tiny', a config dict or a config.json path; {self.model!r} is not a file")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """The fields in JSON file ``path``, then ``overrides`` (``--set``: ``true``/``false`` in any case for a
        boolean). Every problem is one ``ValueError`` line naming the file and the key."""
        try:
            fields = json.loads(Path(path).read_text())
        except OSError as error:
            raise ValueError(f"{path}: cannot read the config ({error.strerror})") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{error.lineno}: not JSON ({error.msg})") from None
        if not isinstance(fields, dict):
            raise ValueError(f"{path}: expected a JSON object of TrainConfig fields, got a {type(fields).__name__}")
        known = {f.name: f for f in dataclasses.fields(cls)}
        for key, value in (overrides or {}).items():
            hint = typing.get_type_hints(cls).get(key)
            if hint is bool and isinstance(value, str) and value.lower() in ("true", "false"):
                value = value.lower() == "true"
            fields[key] = value
        unknown = sorted(set(fields) - set(known))
        if unknown:
            raise ValueError(f"{path}: unknown TrainConfig keys {unknown} (known: {', '.join(known)})")
        missing = [name for name, f in known.items() if name not in fields
                   and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if missing:
            raise ValueError(f"{path}: missing required TrainConfig keys {missing}")
        try:
            return cls(**fields)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None

    def optimizer_groups(self) -> OptimizerGroups:
        return OptimizerGroups(self.lr, self.decoder_lr, self.new_decoder_lr, self.offsets_lr, self.weight_decay)

    def model_config(self) -> MMInterleavedConfig:
        if self.model == "tiny":
            return MMInterleavedConfig.tiny()
        if isinstance(self.model, dict):
            return MMInterleavedConfig.from_dict(self.model)
        return MMInterleavedConfig.load(self.model)


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank; ``metrics`` are the steps of this invocation)."""

    run_dir: Path
    step: int
    checkpoint: Path | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    skipped_batches: int = 0


# -------------------------------------------------------------------------------------------------
# distributed setup
# -------------------------------------------------------------------------------------------------
def _deepspeed():
    """Import DeepSpeed with its JIT-built ops cached in weft's cache folder (built once, ~1 min on CPU)."""
    cache = Path(os.environ.get("WEFT_CACHE_DIR", Path.home() / ".cache" / "weft"))
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions" / "deepspeed"))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    return deepspeed


LOOPBACK_INTERFACES = ("lo", "lo0")
"""Names of the loopback interface (Linux, macOS), for gloo's and NCCL's own sockets."""


def _bind_to_loopback() -> None:
    """gloo and NCCL open sockets of their own, on the interface the host name resolves to unless told: on one
    machine, tell them loopback (a variable the user set wins)."""
    names = {name for _, name in socket.if_nameindex()}
    loopback = next((name for name in LOOPBACK_INTERFACES if name in names), None)
    if loopback is None:
        logger.warning("no loopback interface among %s: gloo/NCCL bind where the host name resolves", sorted(names))
        return
    for variable in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(variable, loopback)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def _loopback_store() -> dist.TCPStore:
    """A one-rank rendezvous store listening on 127.0.0.1 only (torch's binds every interface; it listens on a socket
    bound here instead, and the port is the kernel's choice, so no race for a free one)."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    # the store's server owns the socket from here on (it closes it when the store goes)
    return dist.TCPStore("127.0.0.1", port, 1, True, master_listen_fd=listener.detach(), wait_for_workers=False)


@contextlib.contextmanager
def distributed() -> Iterator[tuple[int, int, int]]:
    """(rank, world size, local rank). Launched by torchrun/deepspeed: their environment (``MASTER_ADDR`` decides
    where the ranks meet; on loopback, gloo/NCCL bind there too); alone: a one-rank group whose rendezvous and
    sockets listen on loopback only. Tears down only a group it created (env restored afterwards)."""
    deepspeed = _deepspeed()
    if dist.is_initialized():
        yield dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        return
    launched = "RANK" in os.environ
    saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                                             "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")}
    try:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if not launched or _is_loopback(os.environ.get("MASTER_ADDR", "127.0.0.1")):
            _bind_to_loopback()
        if not launched:
            store = _loopback_store()
            os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(store.port)})
        local_rank = int(os.environ["LOCAL_RANK"])
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        if not launched:
            dist.init_process_group(backend, store=store, rank=0, world_size=1)
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False)  # adopts a group made here
        try:
            yield dist.get_rank(), dist.get_world_size(), local_rank
        finally:
            deepspeed.comm.destroy_process_group()  # also drops DeepSpeed's cached groups (a later call re-inits)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _precision(config: TrainConfig) -> str:
    if config.precision != "auto":
        return config.precision
    if not torch.cuda.is_available():
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


# -------------------------------------------------------------------------------------------------
# data
# -------------------------------------------------------------------------------------------------
def shard_urls(shards: str | Sequence[str], num_image_tokens: int) -> list[str]:
    """Shard URLs from a folder's ``index.json`` (checked complete and packed for ``num_image_tokens``) or a list."""
    if not isinstance(shards, str):
        return list(shards)
    index = read_index(shards)
    if not index.complete:
        raise ValueError(f"the shard set in {shards} is incomplete (its writer did not finish)")
    packed_for = index.meta.get("packing", {}).get("num_image_tokens")
    if packed_for is not None and packed_for != num_image_tokens:
        raise ValueError(f"{shards} was packed with {packed_for} tokens per image; the model has {num_image_tokens}")
    return index.urls(shards)


def _collate(samples, *, pad_token_id: int, image_size: tuple[int, int]) -> tuple[list[str], InterleavedBatch]:
    return [s["__key__"] for s in samples], collate_sequences(samples, pad_token_id=pad_token_id, image_size=image_size)


GRAPH_KINDS = ("text_only", "images_untrained", "images_trained")


def _graph_kind(batch: InterleavedBatch, out) -> int:
    """Which branches of the model's autograd graph this micro-batch used (index into GRAPH_KINDS).

    ZeRO-2 reduces gradient buckets in the order parameters become ready in backward and assumes
    that order is the same on every rank (DeepSpeed issue #2343); a batch without images skips the
    vision tower, one without a trained image skips the image decoder. Such micro-batches are
    skipped when ranks disagree (ZeRO 0/1 reduce after backward and need no agreement).
    """
    if batch.images.shape[0] == 0:
        return 0
    return 2 if out.num_trained_images > 0 else 1


class EpochData:
    """This rank's micro-batches ``(keys, batch)``, epoch after epoch, with a resumable position.

    Epoch ``e`` reads the shards in the order of seed ``seed + e`` (the same on every rank; split by
    node and worker), so ``(epoch, position)`` pins the next batch exactly: resuming rebuilds epoch
    ``e`` and skips ``position`` batches. With ``resampled``, resuming starts epoch ``e + 1`` instead.
    """

    def __init__(self, urls: list[str], config: TrainConfig, image_size: tuple[int, int], pad_token_id: int,
                 epoch: int = 0, position: int = 0) -> None:
        self.urls, self.config, self.image_size, self.pad_token_id = urls, config, tuple(image_size), pad_token_id
        self.epoch, self.position = epoch, position
        self._iterator: Iterator | None = None

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def _loader(self, epoch: int) -> torch.utils.data.DataLoader:
        c = self.config
        dataset = sequence_dataset(self.urls, image_size=self.image_size, resampled=c.resampled, shuffle_buffer=c.shuffle_buffer,
                                   seed=c.seed + epoch, epoch_samples=c.epoch_samples, source_rates=c.source_rates)
        collate = functools.partial(_collate, pad_token_id=self.pad_token_id, image_size=self.image_size)
        dataset = dataset.compose(wds.batched(c.batch_size, collation_fn=collate, partial=True))
        # its own generator: creating an iterator must not draw from the global RNG (exact resume)
        generator = torch.Generator().manual_seed(c.seed + epoch)
        return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=c.num_workers, generator=generator)

    def __next__(self) -> tuple[list[str], InterleavedBatch]:
        for _ in range(2):
            if self._iterator is None:
                self._iterator = iter(self._loader(self.epoch))
                for _ in range(self.position):  # replay to the saved position (decodes those batches again)
                    if next(self._iterator, None) is None:
                        raise RuntimeError(f"epoch {self.epoch} has fewer than {self.position} batches on this rank")
            item = next(self._iterator, None)
            if item is not None:
                self.position += 1
                return item
            self._iterator = None
            self.epoch, self.position = self.epoch + 1, 0
        raise RuntimeError("this rank read an empty epoch: fewer shards than ranks x data workers?")


# -------------------------------------------------------------------------------------------------
# model
# -------------------------------------------------------------------------------------------------
def build_model(config: TrainConfig):
    from model.mm_interleaved import MMInterleaved  # transformers, diffusers and open_clip: ~5 s, only when building

    model_config = config.model_config()
    tokenizer = None
    if config.tokenizer is not None:
        tokenizer = load_tokenizer(config.tokenizer, boi_token=model_config.language.boi_token,
                                   image_token=model_config.language.image_token)
    return MMInterleaved.from_config(model_config, tokenizer)


def shard_images(config: TrainConfig, image_size: tuple[int, int], num_image_tokens: int, limit: int = 4096) -> torch.Tensor:
    """Up to ``limit`` images of the training shards, ``(N, 3, H, W)`` in [0, 1] (one pass, in shard order)."""
    images = []
    for sample in sequence_dataset(shard_urls(config.shards, num_image_tokens), image_size=image_size, shuffle_buffer=1,
                                   seed=config.seed):
        images += list(sample["images"])
        if len(images) >= limit:
            break
    if not images:
        raise ValueError(f"the shards in {config.shards} hold no images to fit the VAE on")
    return torch.stack(images[:limit])


def build_model_with_fitted_vae(config: TrainConfig, vae_steps: int) -> tuple[Any, list[float]]:
    """:func:`build_model` (same seed as :func:`train`) whose random VAE is first fitted to the training images
    (:func:`model.image_decoder.fit_vae`; for the ``tiny`` preset, which has no pretrained VAE). The fitted
    scaling factor is written into the model's config, so checkpoints load with it. Returns the model and the
    VAE's losses."""
    from model.image_decoder import fit_vae

    model_config = config.model_config()
    if model_config.decoder.diffusion_path is not None:
        raise ValueError("the decoder loads a pretrained VAE from diffusion_path: there is nothing to fit")
    torch.manual_seed(config.seed)
    model = build_model(config)
    images = shard_images(config, model.image_size, model.num_visual_tokens)
    with cpu_threads(config.torch_threads), tqdm(total=vae_steps, desc="vae", unit="step",
                                                 disable=not config.progress) as bar:

        def step_done(loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            bar.update(1)

        losses = fit_vae(model.decoder.vae, images, steps=vae_steps, seed=config.seed, on_step=step_done)
    model.config.decoder.vae_config = {**model.config.decoder.vae_config,
                                       "scaling_factor": model.decoder.vae.config.scaling_factor}
    return model, losses


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The optimizer-step records of a run's ``metrics.jsonl`` (events left out; empty before the first step)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r]


def save_model(model, directory: str | os.PathLike) -> Path:
    """``model.save_pretrained(directory)``, atomically (:func:`pipelines.files.atomic_path`; e.g. the step-0 baseline)."""
    with atomic_path(directory) as tmp:
        model.save_pretrained(tmp)
    return Path(directory)


# -------------------------------------------------------------------------------------------------
# training
# -------------------------------------------------------------------------------------------------
def _deepspeed_config(config: TrainConfig, precision: str) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": config.batch_size,
        "gradient_accumulation_steps": config.grad_accum_steps,
        "gradient_clipping": config.grad_clip,
        "zero_optimization": {"stage": config.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch's AdamW: no DeepSpeedCPUAdam build, same maths
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


class _JsonLines:
    """Append-only JSON-lines file; on resume, records past the resumed step are dropped first."""

    def __init__(self, path: Path, enabled: bool, keep_until_step: int | None) -> None:
        self.path, self.enabled = path, enabled
        if not enabled:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until_step is not None and path.exists():
            lines = [line for line in path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line).get("step", 0) <= keep_until_step]
            write_text(path, "".join(line + "\n" for line in kept))
        elif keep_until_step is None:
            write_text(path, "")
        self.file = open(path, "a")

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.enabled:
            self.file.close()


def train(config: TrainConfig, *, model=None, data=None) -> TrainResult:
    """Train until ``config.max_steps`` (resuming from the run folder's latest checkpoint).

    ``model``: an already built :class:`MMInterleaved` (default: :func:`build_model`). ``data``: an
    iterator of ``(sample_keys, InterleavedBatch)`` for this rank (default: the config's shards via
    :class:`EpochData`; a custom iterator's position is not checkpointed).
    """
    run_dir = Path(config.run_dir)
    # first: a training refused because another holds the folder must change nothing in it
    with run_folder_lock(run_dir, int(os.environ.get("RANK", 0))), distributed() as (rank, world_size, local_rank), \
            cpu_threads(config.torch_threads):
        deepspeed = _deepspeed()
        device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
        if rank == 0:
            write_json(run_dir / "train_config.json", config.to_dict())
        checkpoint = latest_checkpoint(run_dir) if config.resume else None

        # model: the same init on every rank (DeepSpeed also broadcasts rank 0's weights)
        torch.manual_seed(config.seed)
        if model is None:
            model = build_model(config)
        if checkpoint is not None:  # frozen weights are not in the engine state: take them from the model file
            model.load_state_dict(load_file(str(checkpoint / MODEL_DIR / model.weights_name)), strict=False)

        # optimizer, schedule, engine
        groups = model.parameter_groups(config.optimizer_groups())
        for group in groups:
            group.pop("param_names")
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=config.betas, eps=config.eps)
        # the schedule is a pure function of the step, applied to the groups before each step: no state to save
        schedule = functools.partial(lr_factor, warmup_steps=config.warmup_steps, max_steps=config.max_steps,
                                     schedule=config.schedule, min_ratio=config.min_lr_ratio)
        base_lrs = [g["lr"] for g in groups]
        group_names = [g["name"] for g in groups]
        precision = _precision(config)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=_deepspeed_config(config, precision))

        # resume: engine state, then this rank's data position and RNG (or fresh ones)
        step, epoch, position = 0, 0, 0
        torch.manual_seed(config.seed * 1000 + rank)
        if checkpoint is not None:
            state = json.loads((checkpoint / TRAINER_STATE).read_text())
            step = state["step"]
            saved = read_rank_state(checkpoint, rank) if state["world_size"] == world_size else None
            if saved is not None:
                load_checkpoint(engine, checkpoint)
                rng, data_state = saved
                set_rng_state(rng)
                epoch, position = data_state["epoch"], data_state["position"]
                if config.resampled:
                    epoch, position = epoch + 1, 0
            else:
                if rank == 0:
                    logger.warning("checkpoint %s was written by %d ranks, now %d: weights, step and schedule resume; "
                                   "the optimizer moments restart from zero (ZeRO partitions are per rank), data "
                                   "restarts at a new epoch and RNG is reseeded", checkpoint, state["world_size"], world_size)
                epoch = state["max_epoch"] + 1
                torch.manual_seed(config.seed * 1000 + rank + step)
            if rank == 0:
                logger.info("resumed from %s at step %d", checkpoint, step)

        # data
        if data is None:
            urls = shard_urls(config.shards, model.num_visual_tokens)
            pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else model.tokenizer.eos_token_id
            data = EpochData(urls, config, model.image_size, pad, epoch, position)

        # loop
        metrics = _JsonLines(run_dir / METRICS, rank == 0, step if checkpoint is not None else None)
        samples_log = _JsonLines(run_dir / "samples" / f"rank{rank}.jsonl", config.log_samples,
                                 step if checkpoint is not None else None)
        if checkpoint is not None:
            metrics.write({"event": "resume", "step": step, "checkpoint": str(checkpoint), "world_size": world_size})
        result = TrainResult(run_dir, step, checkpoint)
        bar = tqdm(total=config.max_steps, initial=step, desc="train", unit="step", disable=not (config.progress and rank == 0))
        engine.train()
        consecutive_skips = 0
        last_saved = step if checkpoint is not None else None
        try:
            while step < config.max_steps:
                start = time.perf_counter()
                # [loss, text_loss, image_loss, micro-batches, tokens, samples] summed over this step
                totals = torch.zeros(6, dtype=torch.float64)
                done = 0
                for param_group, base_lr in zip(optimizer.param_groups, base_lrs):
                    param_group["lr"] = base_lr * schedule(step)
                while done < config.grad_accum_steps:
                    keys, batch = next(data)
                    batch = batch.to(device)
                    out = engine(batch)
                    # host-device sync (one per micro-batch): every rank must agree to skip a non-finite
                    # loss, and under ZeRO-2 on the shape of the autograd graph (see _graph_kind)
                    flags = torch.zeros(1 + len(GRAPH_KINDS), device=device)
                    flags[0] = 0.0 if torch.isfinite(out.loss).item() else 1.0
                    flags[1 + _graph_kind(batch, out)] = 1.0
                    dist.all_reduce(flags)
                    if config.zero_stage == 2 and int((flags[1:] > 0).sum()) > 1:
                        result.skipped_batches += 1
                        kinds = [k for k, n in zip(GRAPH_KINDS, flags[1:].tolist()) if n > 0]
                        logger.warning("step %d: ranks disagree on the graph (%s); ZeRO-2 needs the same one, "
                                       "micro-batch skipped", step + 1, ", ".join(kinds))
                        metrics.write({"event": "skipped_batch", "step": step + 1, "reason": "graph_mismatch",
                                       "graphs": kinds})
                        samples_log.write({"step": step + 1, "skipped": keys})
                        continue
                    bad = flags[:1]
                    if bad.item() > 0:
                        consecutive_skips += 1
                        result.skipped_batches += 1
                        logger.warning("step %d: non-finite loss on %d rank(s) (rank %d: %s); micro-batch skipped",
                                       step + 1, int(bad.item()), rank, out.loss.item())
                        metrics.write({"event": "skipped_batch", "step": step + 1, "reason": "non_finite_loss", "ranks": int(bad.item()),
                                       "loss": None if math.isfinite(out.loss.item()) else str(out.loss.item())})
                        samples_log.write({"step": step + 1, "skipped": keys})
                        if consecutive_skips >= config.max_consecutive_skips:
                            raise FloatingPointError(f"{consecutive_skips} micro-batches in a row had a NaN/inf loss")
                        continue
                    consecutive_skips = 0
                    samples_log.write({"step": step + 1, "keys": keys})
                    engine.backward(out.loss)
                    engine.step()  # steps the optimizer at the accumulation boundary only
                    done += 1
                    tokens = int((batch.document_ids >= 0).sum())  # host-device sync, for throughput
                    totals += torch.tensor([out.loss.item(), out.text_loss.item(), out.image_loss.item(), 1, tokens,
                                            batch.input_ids.shape[0]], dtype=torch.float64)
                step += 1
                # host-device sync (one per step): the step's losses averaged over ranks
                reduced = totals.to(device)
                dist.all_reduce(reduced)
                reduced = reduced.cpu()
                n = reduced[3].item()
                grad_norm = engine.get_global_grad_norm()
                record = {
                    "step": step,
                    "loss": reduced[0].item() / n,
                    "text_loss": reduced[1].item() / n,
                    "image_loss": reduced[2].item() / n,
                    "lr": dict(zip(group_names, (float(g["lr"]) for g in optimizer.param_groups))),
                    "grad_norm": None if grad_norm is None else float(grad_norm),
                    "tokens": int(reduced[4].item()),
                    "samples": int(reduced[5].item()),
                    "seconds": time.perf_counter() - start,
                    "time": time.time(),
                }
                metrics.write(record)
                result.metrics.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}")
                if step % config.checkpoint_every == 0 or step == config.max_steps:
                    result.checkpoint = _save(engine, model, config, step, world_size, data, record)
                    last_saved = step
                    metrics.write({"event": "checkpoint", "step": step, "path": str(result.checkpoint)})
            if last_saved != step:
                result.checkpoint = _save(engine, model, config, step, world_size, data, result.metrics[-1] if result.metrics else {})
        finally:
            bar.close()
            metrics.close()
            samples_log.close()
        result.step = step
        return result


def _save(engine, model, config: TrainConfig, step: int, world_size: int, data, record: dict[str, Any]) -> Path:
    data_state = data.state() if isinstance(data, EpochData) else {"epoch": 0, "position": 0}
    # every rank's epoch, so a resume on another number of ranks starts after all of them
    epochs = torch.tensor([data_state["epoch"]], dtype=torch.int64, device=engine.device)
    dist.all_reduce(epochs, op=dist.ReduceOp.MAX)
    trainer_state = {"step": step, "world_size": world_size, "max_epoch": int(epochs.item()), "metrics": record,
                     "train_config": config.to_dict()}
    return save_checkpoint(engine, model, config.run_dir, step, trainer_state, data_state, config.keep_checkpoints)


def _parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with ``value`` read as JSON when it parses (numbers, lists, true/false), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The command line of a training run (``weft train`` and ``python -m pipelines.training.train``)."""
    parser.add_argument("--config", required=True, help="JSON file with the fields of pipelines.training.train.TrainConfig")
    parser.add_argument("--set", action="append", type=_parse_override, metavar="KEY=VALUE",
                        help="override one config field (value parsed as JSON when possible); repeatable")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher's
    parser.set_defaults(run=run_from_arguments)
    return parser


def run_from_arguments(args: argparse.Namespace) -> int:
    """Train the run the parsed command line describes; a bad config file or key exits naming it."""
    try:
        config = TrainConfig.from_json(args.config, dict(args.set or []))
        result = train(config)
    except (ValueError, RunFolderLocked) as error:  # a bad config, a locked folder, a refused engine state
        raise SystemExit(str(error)) from None
    print(f"step {result.step}; checkpoint {result.checkpoint}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipelines.training.train --config cfg.json``: ``weft train`` under the name launchers
    (torchrun, deepspeed) expect."""
    offline_process()
    parser = add_arguments(argparse.ArgumentParser(prog="python -m pipelines.training.train", description=__doc__.split("\n\n")[0]))
    return run_from_arguments(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
