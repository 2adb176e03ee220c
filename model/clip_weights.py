"""CLIP vision weights for the image tokenizer's frozen ViT, read from either format they ship in.

- **open_clip**: one state dict with ``visual.*`` keys, ``.safetensors`` or a weights-only torch pickle
  (``.bin`` / ``.pt`` / ``.pth``; a ``{"state_dict": ...}`` wrapper and DDP's ``module.`` prefix are
  accepted). open_clip's hub layout keeps ``open_clip_config.json`` beside the weights; a folder in that
  layout can be given instead of the file.
- **Hugging Face**: a ``CLIPModel``, ``CLIPVisionModel`` or ``CLIPVisionModelWithProjection`` folder
  (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``), e.g. ``openai/clip-vit-large-patch14``.
  Its names are converted to open_clip's by plain tensor ops (:func:`hf_to_open_clip`).

:func:`load_clip_vision_weights` copies them into an open_clip ``VisionTransformer`` only after
checking that they are the same network, and every refusal names the file and the keys:
what the checkpoint's config states (activation, heads, LayerNorm eps) must be what was built
(:class:`CheckpointConfigError`), the keys must be the tower's (:class:`CheckpointKeysError`) and so
must the shapes (:class:`CheckpointShapeError`). Nothing is ever downloaded.
"""

from __future__ import annotations

import errno
import json
import pickle
import re
import warnings
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from open_clip.model import CLIPVisionCfg
from open_clip.transformer import QuickGELU, VisionTransformer
from safetensors import safe_open
from torch import Tensor
from transformers import CLIPVisionConfig

OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
"""open_clip's hub file names, in the order a folder is searched."""
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
"""Hugging Face's single-file weight names, in the order a folder is searched (sharded folders are not read)."""
HF_CLIP_TYPES = ("clip", "clip_vision_model")
HF_ACTIVATIONS = {"quick_gelu": True, "gelu": False}
"""Hugging Face ``hidden_act`` -> open_clip ``quick_gelu`` (the two activations open_clip's ViT can build)."""
HF_NOT_VISION = ("text_model.", "text_projection.", "logit_scale")
"""Parts of a ``CLIPModel`` file that are not the vision tower: never read."""

_HF_RENAMES = [  # Hugging Face vision name (without "vision_model.") -> open_clip VisionTransformer name
    (r"embeddings\.class_embedding", r"class_embedding"),
    (r"embeddings\.patch_embedding\.weight", r"conv1.weight"),
    (r"embeddings\.position_embedding\.weight", r"positional_embedding"),
    (r"pre_layrnorm\.(weight|bias)", r"ln_pre.\1"),
    (r"post_layernorm\.(weight|bias)", r"ln_post.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"transformer.resblocks.\1.ln_1.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"transformer.resblocks.\1.ln_2.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"transformer.resblocks.\1.attn.out_proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc1\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_fc.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.fc2\.(weight|bias)", r"transformer.resblocks.\1.mlp.c_proj.\2"),
]
_HF_QKV = re.compile(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)")
_HF_BUFFERS = ("embeddings.position_ids",)
"""Non-weight buffers older transformers versions saved; dropped."""


class CheckpointKeysError(ValueError):
    """The checkpoint's keys are not the tower's: some missing, some unexpected."""


class CheckpointShapeError(ValueError):
    """A checkpoint tensor has another shape than the tower's parameter of the same name."""


class CheckpointConfigError(ValueError):
    """The checkpoint's config states an architecture (activation, heads, eps) other than the tower's."""


@dataclass
class ClipVisionCheckpoint:
    """A CLIP ViT's weights in open_clip ``VisionTransformer`` names and what its files state about it.

    Attributes:
        state: open_clip names -> tensors. For width D, patch p, T = grid² + 1 tokens, MLP width F,
            projection E: ``class_embedding (D,)``, ``positional_embedding (T, D)``,
            ``conv1.weight (D, 3, p, p)``, ``ln_pre.{weight,bias} (D,)``, per block N
            ``transformer.resblocks.N.{ln_1, ln_2}.{weight,bias} (D,)``,
            ``attn.in_proj_weight (3D, D)`` / ``attn.in_proj_bias (3D,)`` (q, k, v stacked in that
            order), ``attn.out_proj.{weight (D, D), bias (D,)}``, ``mlp.c_fc.{weight (F, D), bias (F,)}``,
            ``mlp.c_proj.{weight (D, F), bias (D,)}``; then ``ln_post.{weight,bias} (D,)``, ``proj (D, E)``.
        weights_file: the file the tensors were read from.
        stated: what the checkpoint's config says, by the names of :func:`built_architecture`
            (``quick_gelu``, ``heads``, ``layer_norm_eps``); what it does not say is absent.
        config_file: the file ``stated`` comes from; ``None`` when the checkpoint has no config.
        has_projection: ``False`` for a format without an image projection (Hugging Face's
            ``CLIPVisionModel``): the tower is then loaded without ``proj``.
    """

    state: dict[str, Tensor]
    weights_file: Path
    stated: dict[str, Any]
    config_file: Path | None
    has_projection: bool = True


def read_clip_vision_checkpoint(path: str | Path) -> ClipVisionCheckpoint:
    """An open_clip file or folder, or a Hugging Face CLIP folder (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, "no CLIP vision checkpoint (open_clip file or Hugging Face folder) at",
                                str(path))
    if path.is_file():
        return read_open_clip_file(path)
    if _hf_clip_model_type(path) is not None:
        return read_hf_clip_folder(path)
    if (path / OPEN_CLIP_CONFIG).is_file():
        return read_open_clip_file(_first_existing(path, OPEN_CLIP_WEIGHTS))
    raise ValueError(f"{path} is neither a Hugging Face CLIP folder ({HF_CONFIG} with model_type in {HF_CLIP_TYPES}) "
                     f"nor an open_clip folder ({OPEN_CLIP_CONFIG} + one of {OPEN_CLIP_WEIGHTS})")


def read_open_clip_file(path: Path) -> ClipVisionCheckpoint:
    """The ``visual.*`` tensors of an open_clip state dict; an ``open_clip_config.json`` beside it is its config."""
    state = _read_tensors(path, lambda name: name.removeprefix("module.").startswith("visual."))
    if not state:
        raise ValueError(f"{path} holds no 'visual.*' weights of an open_clip model")
    state = {name.removeprefix("module.").removeprefix("visual."): tensor for name, tensor in state.items()}
    config_file = path.parent / OPEN_CLIP_CONFIG
    if not config_file.is_file():
        return ClipVisionCheckpoint(state, path, stated={}, config_file=None)
    return ClipVisionCheckpoint(state, path, stated=_open_clip_stated(config_file), config_file=config_file)


def read_hf_clip_folder(folder: Path) -> ClipVisionCheckpoint:
    """The vision tower of a Hugging Face CLIP folder in open_clip names, with what its ``config.json`` states."""
    config_file = folder / HF_CONFIG
    config = CLIPVisionConfig.from_pretrained(folder)  # a CLIPModel's config yields its vision_config
    if config.hidden_act not in HF_ACTIVATIONS:
        raise CheckpointConfigError(f"{config_file}: hidden_act {config.hidden_act!r} has no open_clip ViT "
                                    f"equivalent (one of {sorted(HF_ACTIVATIONS)})")
    stated = {"quick_gelu": HF_ACTIVATIONS[config.hidden_act], "heads": config.num_attention_heads,
              "layer_norm_eps": config.layer_norm_eps}
    weights_file = _first_existing(folder, HF_WEIGHTS)
    hf_state = _read_tensors(weights_file, lambda name: not name.startswith(HF_NOT_VISION))
    has_projection = _hf_clip_model_type(folder) == "clip" or "visual_projection.weight" in hf_state
    return ClipVisionCheckpoint(hf_to_open_clip(hf_state), weights_file, stated, config_file, has_projection)


def hf_to_open_clip(hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Hugging Face CLIP vision names -> open_clip ``VisionTransformer`` names, by plain tensor ops.

    ``vision_model.`` prefixes are dropped; each layer's ``q_proj`` / ``k_proj`` / ``v_proj`` (weights
    ``(D, D)``, biases ``(D,)``) are concatenated in that order into ``attn.in_proj_weight (3D, D)`` /
    ``attn.in_proj_bias (3D,)`` (``nn.MultiheadAttention``'s layout); ``visual_projection.weight (E, D)``
    (a ``Linear``) becomes ``proj (D, E)`` (right-multiplied). A name it does not know, or a q/k/v set
    with a part missing, is kept under its Hugging Face name so that the key check reports it.
    """
    state: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, tuple[str, Tensor]]] = defaultdict(dict)
    for hf_name, tensor in hf_state.items():
        name = hf_name.removeprefix("vision_model.")
        if name in _HF_BUFFERS:
            continue
        if match := _HF_QKV.fullmatch(name):
            layer, part, kind = match.groups()
            qkv[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"][part] = (hf_name, tensor)
        elif name == "visual_projection.weight":
            state["proj"] = tensor.t()
        else:
            state[_hf_rename(name, default=hf_name)] = tensor
    for open_clip_name, parts in qkv.items():
        if parts.keys() == {"q", "k", "v"}:
            state[open_clip_name] = torch.cat([parts[p][1] for p in "qkv"])
        else:
            state.update(parts.values())
    return state


def load_clip_vision_weights(visual: VisionTransformer, checkpoint: ClipVisionCheckpoint) -> None:
    """Copy ``checkpoint`` into ``visual`` once it is shown to be the same network.

    Raises :class:`CheckpointConfigError`, :class:`CheckpointKeysError` or :class:`CheckpointShapeError`
    (each naming the file). A checkpoint that does not state its activation is loaded into the activation
    ``visual`` was built with, and a warning says so: open_clip files carry no activation of their own.
    """
    # 1. what the checkpoint's config states must be what was built
    check_stated_architecture(visual, checkpoint)
    # 2. a checkpoint with no image projection leaves the tower without one
    if not checkpoint.has_projection:
        visual.proj = None
    # 3. the same keys and shapes, then copy
    check_state_dict(visual.state_dict(), checkpoint.state, checkpoint.weights_file)
    visual.load_state_dict(checkpoint.state)


def built_architecture(visual: VisionTransformer) -> dict[str, Any]:
    """What shapes cannot tell about a built tower: activation, attention heads, LayerNorm eps."""
    return {
        "quick_gelu": any(isinstance(module, QuickGELU) for module in visual.modules()),
        "heads": visual.transformer.resblocks[0].attn.num_heads,
        "layer_norm_eps": visual.ln_post.eps,
    }


def check_stated_architecture(visual: VisionTransformer, checkpoint: ClipVisionCheckpoint) -> None:
    """Raise if the checkpoint's config states another activation, head count or eps than ``visual`` has."""
    built = built_architecture(visual)
    wrong = {name: value for name, value in checkpoint.stated.items() if value != built[name]}
    if wrong:
        listed = "; ".join(f"{name}: checkpoint {value!r}, tower {built[name]!r}" for name, value in wrong.items())
        hint = (" (OpenAI's CLIP weights need QuickGELU: open_clip's '-quickgelu' configs, e.g. 'ViT-L-14-quickgelu')"
                if "quick_gelu" in wrong else "")
        raise CheckpointConfigError(f"{checkpoint.config_file} states another architecture than the tower built "
                                    f"from clip_model: {listed}{hint}")
    if "quick_gelu" not in checkpoint.stated:
        activation = "QuickGELU" if built["quick_gelu"] else "GELU"
        warnings.warn(f"{checkpoint.weights_file} does not state its activation (no {OPEN_CLIP_CONFIG} beside it); "
                      f"loading it into clip_model's {activation}. OpenAI's CLIP weights need QuickGELU "
                      f"(open_clip's '-quickgelu' configs), most others GELU.", stacklevel=3)


def check_state_dict(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], source: Path) -> None:
    """Raise unless ``state`` has exactly ``expected``'s keys, each with the same shape."""
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    if missing or unexpected:
        raise CheckpointKeysError(f"{source} does not fit the tower (open_clip VisionTransformer names): "
                                  f"{len(missing)} missing {_some(missing)}, "
                                  f"{len(unexpected)} unexpected {_some(unexpected)}")
    wrong = [f"{name}: checkpoint {tuple(state[name].shape)}, tower {tuple(tensor.shape)}"
             for name, tensor in expected.items() if state[name].shape != tensor.shape]
    if wrong:
        raise CheckpointShapeError(f"{source}: {len(wrong)} tensors have another shape than the tower's: "
                                   f"{_some(wrong)}")


def _hf_rename(name: str, default: str) -> str:
    for pattern, replacement in _HF_RENAMES:
        renamed, count = re.subn(f"^{pattern}$", replacement, name)
        if count:
            return renamed
    return default


def _hf_clip_model_type(folder: Path) -> str | None:
    """The ``model_type`` of the folder's ``config.json`` if it is a CLIP one (timm folders have a config.json too)."""
    config_file = folder / HF_CONFIG
    if not config_file.is_file():
        return None
    model_type = json.loads(config_file.read_text()).get("model_type")
    return model_type if model_type in HF_CLIP_TYPES else None


def _open_clip_stated(config_file: Path) -> dict[str, Any]:
    """What an ``open_clip_config.json`` (``{"model_cfg": {...}, ...}``) states: a missing ``quick_gelu`` is GELU."""
    model_cfg = json.loads(config_file.read_text()).get("model_cfg")
    if model_cfg is None:
        raise ValueError(f"{config_file} has no 'model_cfg'")
    vision = CLIPVisionCfg(**model_cfg.get("vision_cfg", {}))
    return {"quick_gelu": bool(model_cfg.get("quick_gelu", False)), "heads": vision.width // vision.head_width}


def _first_existing(folder: Path, names: Sequence[str]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise FileNotFoundError(errno.ENOENT, f"none of {list(names)} in the CLIP checkpoint folder", str(folder))


def _read_tensors(path: Path, wanted: Callable[[str], bool]) -> dict[str, Tensor]:
    """The tensors of a state-dict file whose names ``wanted`` accepts (safetensors lazily, pickles weights-only)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys() if wanted(name)}
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as error:
        raise ValueError(f"{path} is not a weights-only torch state dict (OpenAI's TorchScript .pt files are not "
                         f"read: use open_clip's or Hugging Face's copy)") from error
    state = state.get("state_dict", state)
    return {name: tensor for name, tensor in state.items() if wanted(name)}


def _some(items: Sequence[str], shown: int = 5) -> str:
    """``[a, b, c, ...]`` with at most ``shown`` items and how many were left out."""
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return "[" + ", ".join(items[:shown]) + more + "]"
