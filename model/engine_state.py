"""DeepSpeed's engine state (module, optimizer and ZeRO partitions, counters) as safetensors: no pickle.

DeepSpeed writes and reads its checkpoint files through a checkpoint engine; its default one is
``torch.save`` / ``torch.load(weights_only=False)``, so a crafted file in a run folder runs code when training
resumes there. :class:`SafetensorsCheckpointEngine` keeps DeepSpeed's file names (``mp_rank_00_model_states.pt``,
``zero_pp_rank_*_optim_states.pt``) but writes each as a safetensors file: the tensors as tensors, everything
else as a typed JSON tree in the header's metadata. Reading one builds nothing but tensors, JSON values and
instances of the few DeepSpeed classes in :data:`ALLOWED_CLASSES` (filled field by field, never called with
code from the file); a file that is not such a safetensors file (a pickle above all) is refused unread.

Tree nodes: JSON scalars as themselves; ``{"list": [...]}``, ``{"tuple": [...]}``, ``{"dict": [[key, value],
...]}`` (keys may be ints); ``{"tensor": name}``; ``{"size": [...]}``; ``{"dtype": "float32"}``; ``{"float":
"inf"}`` for non-finite floats; ``{"enum": class, "value": v}``; ``{"object": class, "fields": {...}}``.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import json
import math
import os
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

METADATA_KEY = "weft_engine_state"
ALLOWED_CLASSES = {
    "deepspeed.runtime.zero.config:ZeroStageEnum",
    "deepspeed.utils.tensor_fragment:fragment_address",
    "deepspeed.runtime.fp16.loss_scaler:LossScaler",
    "deepspeed.runtime.fp16.loss_scaler:DynamicLossScaler",
}
"""The only classes an engine state may hold besides tensors and JSON values: ZeRO's stage, its parameter-slice
map and the fp16 loss scalers (objects whose fields are plain values)."""


class UnsafeEngineState(ValueError):
    """A file in an engine-state folder that is not a weft safetensors engine state (or holds a class not allowed)."""


def _class_name(kind: type) -> str:
    return f"{kind.__module__}:{kind.__qualname__}"


def _allowed_class(name: str, path: str) -> type:
    if name not in ALLOWED_CLASSES:
        raise UnsafeEngineState(f"{path}: class {name} is not one an engine state may hold ({sorted(ALLOWED_CLASSES)})")
    module, _, qualname = name.partition(":")
    return getattr(importlib.import_module(module), qualname)


def encode(value: Any, tensors: dict[str, torch.Tensor], where: str = "state") -> Any:
    """``value`` as a JSON tree; its tensors are added to ``tensors`` (CPU copies) under the names the tree gives."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, enum.Enum):
        return {"enum": _class_name(type(value)), "value": value.value}
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()  # own storage: safetensors refuses sharing
        return {"tensor": name}
    if isinstance(value, torch.Size):
        return {"size": list(value)}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, (list, tuple)):
        items = [encode(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
        return {"list" if isinstance(value, list) else "tuple": items}
    if isinstance(value, dict):
        return {"dict": [[encode(k, tensors, f"{where} key"), encode(v, tensors, f"{where}.{k}")] for k, v in value.items()]}
    name = _class_name(type(value))
    if name in ALLOWED_CLASSES:
        fields = ({f.name: getattr(value, f.name) for f in dataclasses.fields(value)} if dataclasses.is_dataclass(value)
                  else vars(value))
        return {"object": name, "fields": {k: encode(v, tensors, f"{where}.{k}") for k, v in fields.items()}}
    raise TypeError(f"{where}: cannot store a {name} in an engine state without pickle (allowed: tensors, JSON "
                    f"values, containers and {sorted(ALLOWED_CLASSES)})")


def decode(tree: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """The value :func:`encode` made ``tree`` from."""
    if tree is None or isinstance(tree, (bool, int, float, str)):
        return tree
    if isinstance(tree, dict) and len(tree) in (1, 2):
        kind = next(iter(tree))
        if kind == "list":
            return [decode(v, tensors, path) for v in tree["list"]]
        if kind == "tuple":
            return tuple(decode(v, tensors, path) for v in tree["tuple"])
        if kind == "dict":
            return {decode(k, tensors, path): decode(v, tensors, path) for k, v in tree["dict"]}
        if kind == "tensor":
            return tensors[tree["tensor"]]
        if kind == "size":
            return torch.Size(tree["size"])
        if kind == "dtype" and isinstance(getattr(torch, tree["dtype"], None), torch.dtype):
            return getattr(torch, tree["dtype"])
        if kind == "float":
            return float(tree["float"])
        if kind == "enum":
            return _allowed_class(tree["enum"], path)(tree["value"])
        if kind == "object":
            instance = object.__new__(_allowed_class(tree["object"], path))
            instance.__dict__.update({k: decode(v, tensors, path) for k, v in tree["fields"].items()})
            return instance
    raise UnsafeEngineState(f"{path}: unknown engine-state node {str(tree)[:80]}")


def save_engine_state(state: Any, path: str | os.PathLike) -> None:
    tensors: dict[str, torch.Tensor] = {}
    tree = encode(state, tensors)
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(tree)})


def load_engine_state(path: str | os.PathLike, map_location: Any = None) -> Any:
    """The state saved at ``path`` by :func:`save_engine_state`; anything else is refused without being run."""
    path = str(path)
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK") or head[:1] == b"\x80":
        raise UnsafeEngineState(f"{path} is a pickle (torch.save): weft never loads one from a run folder, it could "
                                "run code; delete the checkpoint or train in a fresh run folder")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as error:  # noqa: BLE001 (safetensors raises its own error type for a bad header)
        raise UnsafeEngineState(f"{path} is not a safetensors engine state ({error})") from None
    if METADATA_KEY not in metadata:
        raise UnsafeEngineState(f"{path} is a safetensors file without weft's engine-state tree")
    if isinstance(map_location, (str, torch.device)) and torch.device(map_location).type != "cpu":
        tensors = {name: t.to(map_location) for name, t in tensors.items()}
    return decode(json.loads(metadata[METADATA_KEY]), tensors, path)


def safetensors_checkpoint_engine():
    """A DeepSpeed checkpoint engine that saves and loads through :func:`save_engine_state` /
    :func:`load_engine_state` (DeepSpeed is imported only here, when an engine is given one)."""
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    class SafetensorsCheckpointEngine(CheckpointEngine):
        def __init__(self) -> None:
            super().__init__()
            self.name = "SafetensorsCheckpointEngine"

        def create(self, info) -> None:
            pass

        def save(self, state_dict, path: str) -> None:
            save_engine_state(state_dict, path)

        def load(self, path: str, map_location=None):
            return load_engine_state(path, map_location)

        def commit(self, info) -> bool:
            return True

        def preserves_storage_sharing(self) -> bool:
            return False  # every tensor is saved as its own copy: DeepSpeed need not clone first

    return SafetensorsCheckpointEngine()
