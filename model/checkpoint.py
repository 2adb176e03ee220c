"""Training checkpoints: one folder per saved step, written atomically, with a ``latest`` pointer.

Layout of ``{run_dir}/checkpoints/step-{step:08d}/``:

- ``model/``: :meth:`MMInterleaved.save_pretrained` (``config.json``, ``model.safetensors``,
  ``tokenizer/``): what evaluation, generation and the Dagster asset load with ``from_pretrained``;
- ``trainer_state.json``: step, world size, the training config, the last step's metrics;
- ``rank{r}.safetensors``: rank ``r``'s RNG states (tensors) and its data position (metadata);
- ``engine/``: the DeepSpeed engine state (optimizer partitions and fp32 master weights per rank,
  engine counters) as written by ``engine.save_checkpoint``, in DeepSpeed's file names but through
  :mod:`model.engine_state`: safetensors with a JSON tree, never a pickle, so a run folder copied from
  elsewhere cannot run code when training resumes there (a pickle found there is refused unread). It
  loads into the same number of ranks only (DeepSpeed's elastic ZeRO checkpoints need a ``step`` in the
  param groups, which torch's AdamW does not keep). The learning-rate schedule is a pure function of the
  step, so it has no state here.

Every rank writes into ``.step-{step:08d}.tmp/``; after a barrier rank 0 renames it and then
rewrites ``latest`` (atomically), so a crash at any point leaves the previous checkpoint intact.
The folders must be on a filesystem shared by all ranks (multi-node: a network filesystem).
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from model.engine_state import safetensors_checkpoint_engine

CHECKPOINTS = "checkpoints"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
MODEL_DIR = "model"
ENGINE_DIR = "engine"
ENGINE_TAG = "state"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The folder ``latest`` points to, or ``None`` when the run has saved no checkpoint."""
    root = Path(run_dir) / CHECKPOINTS
    pointer = root / LATEST
    if not pointer.exists():
        return None
    path = root / pointer.read_text().strip()
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"{pointer} names {path.name}, which is incomplete or missing")
    return path


def model_dir(path: str | os.PathLike) -> Path:
    """The ``model/`` folder (``MMInterleaved.from_pretrained``) named by ``path``: a run folder
    (its latest checkpoint), a ``step-*`` checkpoint folder, or a ``model/`` folder itself."""
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    if (path / MODEL_DIR / "config.json").is_file():
        return path / MODEL_DIR
    if (path / CHECKPOINTS).is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise FileNotFoundError(f"{path} is a run folder with no saved checkpoint yet")
        return latest / MODEL_DIR
    raise FileNotFoundError(f"{path}: not a model folder (no config.json), a step-* checkpoint or a run folder")


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states as tensors (torch CPU and CUDA, Python, NumPy)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    version, words, gauss = random.getstate()
    state["python"] = torch.tensor([version, *words], dtype=torch.int64)
    _, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.int64))
    state["numpy_extra"] = torch.tensor([pos, has_gauss, cached], dtype=torch.float64)
    state["python_gauss"] = torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64)
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    words = state["python"].tolist()
    gauss = float(state["python_gauss"][0])
    random.setstate((words[0], tuple(words[1:]), None if np.isnan(gauss) else gauss))
    pos, has_gauss, cached = state["numpy_extra"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), cached))


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _without_pickle(engine) -> None:
    """Give the DeepSpeed engine the safetensors checkpoint engine (:mod:`model.engine_state`) once."""
    if getattr(engine.checkpoint_engine, "name", None) != "SafetensorsCheckpointEngine":
        engine.checkpoint_engine = safetensors_checkpoint_engine()


def save_checkpoint(engine, model, run_dir: str | os.PathLike, step: int, trainer_state: dict[str, Any],
                    data_state: dict[str, Any], keep: int = 0) -> Path:
    """Collective: every rank calls it. Returns the final folder. ``keep`` > 0 prunes older ones."""
    _without_pickle(engine)
    rank = dist.get_rank() if dist.is_initialized() else 0
    root = Path(run_dir) / CHECKPOINTS
    final = root / checkpoint_name(step)
    tmp = root / f".{final.name}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    engine.save_checkpoint(str(tmp / ENGINE_DIR), tag=ENGINE_TAG, save_latest=False, exclude_frozen_parameters=True)
    save_file(rng_state(), str(tmp / f"rank{rank}.safetensors"), metadata={"data": json.dumps(data_state)})
    if rank == 0:
        model.save_pretrained(tmp / MODEL_DIR)
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1, sort_keys=True))
    _barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, root / LATEST)
        if keep > 0:
            for old in sorted(root.glob("step-*"))[:-keep]:
                shutil.rmtree(old)
    _barrier()
    return final


def read_rank_state(path: Path, rank: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """Rank ``rank``'s RNG tensors and data position from a checkpoint, ``None`` if it has no such rank."""
    file = path / f"rank{rank}.safetensors"
    if not file.exists():
        return None
    with safe_open(str(file), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        data = json.loads(f.metadata()["data"])
    return tensors, data


def load_checkpoint(engine, path: Path) -> None:
    """Collective: restore the engine (trainable weights, optimizer) from ``path``, saved by as many ranks.
    Raises :class:`model.engine_state.UnsafeEngineState` on a file that is not a safetensors engine state."""
    _without_pickle(engine)
    engine.load_checkpoint(str(path / ENGINE_DIR), tag=ENGINE_TAG, load_module_strict=False, load_lr_scheduler_states=False)
