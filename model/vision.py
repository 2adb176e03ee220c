"""Image tokenizer: frozen open_clip ViT -> multi-scale feature pyramid -> Perceiver Resampler.

The paper uses a trainable ViT-Adapter for the multi-scale maps. weft uses a simpler, trainable
ViTDet-style pyramid over the last ViT layer's patch grid (transposed convolutions for 4x and
2x, a 1x1 projection for 1x, max-pooling for 1/2x, each followed by 1x1 + 3x3 convolutions).
The resampler reads the ViT's patch tokens and emits N visual tokens in the LLM's width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from model.config import VisionConfig
from model.resampler import PerceiverResampler

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip_vision_tower(clip_model: str | dict, checkpoint: str | None) -> nn.Module:
    """The open_clip ``VisionTransformer`` of a model name or config dict, weights from a local file."""
    if isinstance(clip_model, str):
        model_cfg = open_clip.get_model_config(clip_model)
        if model_cfg is None:
            raise ValueError(f"open_clip has no model config named {clip_model!r} (use open_clip.add_model_config or pass a dict)")
    else:
        model_cfg = dict(clip_model)
    clip = open_clip.CLIP(**{k: v for k, v in model_cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")})
    visual = clip.visual
    if not isinstance(visual, open_clip.transformer.VisionTransformer):
        raise ValueError("the image tokenizer needs an open_clip VisionTransformer (a ViT config)")
    if checkpoint is not None:
        visual.load_state_dict(load_clip_visual_state_dict(checkpoint))
    return visual


def load_clip_visual_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The ``visual.*`` weights of an open_clip state dict (``.safetensors`` or a ``weights_only`` pickle)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ValueError(f"{path} holds no 'visual.*' weights of an open_clip model")
    return visual


class PyramidLevel(nn.Module):
    """One pyramid level: resample the patch grid by ``scale``, then 1x1 + 3x3 convolutions."""

    def __init__(self, in_channels: int, out_channels: int, scale: float) -> None:
        super().__init__()
        if scale == 4.0:
            mid = max(in_channels // 4, 8)
            self.resample = nn.Sequential(
                nn.ConvTranspose2d(in_channels, in_channels // 2, 2, stride=2),
                nn.GroupNorm(1, in_channels // 2),
                nn.GELU(),
                nn.ConvTranspose2d(in_channels // 2, mid, 2, stride=2),
            )
        elif scale == 2.0:
            mid = in_channels // 2
            self.resample = nn.ConvTranspose2d(in_channels, mid, 2, stride=2)
        elif scale == 1.0:
            mid = in_channels
            self.resample = nn.Identity()
        else:
            mid = in_channels
            self.resample = nn.MaxPool2d(2)
        self.project = nn.Sequential(
            nn.Conv2d(mid, out_channels, 1),
            nn.GroupNorm(1, out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.GroupNorm(1, out_channels),
        )

    def forward(self, grid: Tensor) -> Tensor:
        return self.project(self.resample(grid))


@dataclass
class VisionOutput:
    """Attributes:
    visual_tokens: ``(K, N, llm_dim)`` the tokens that replace each image's placeholders.
    feature_maps: pyramid levels, largest first, each ``(K, C, H_l, W_l)``.
    """

    visual_tokens: Tensor
    feature_maps: list[Tensor]


class ImageTokenizer(nn.Module):
    """Images ``(K, 3, H, W)`` in ``[0, 1]`` -> visual tokens and multi-scale feature maps."""

    def __init__(self, config: VisionConfig, output_dim: int) -> None:
        super().__init__()
        self.config = config
        self.vit = build_clip_vision_tower(config.clip_model, config.clip_checkpoint)
        self.vit.requires_grad_(False)
        self.vit.eval()
        width = self.vit.conv1.out_channels
        self.image_size = tuple(self.vit.image_size)
        self.pyramid = nn.ModuleList(PyramidLevel(width, config.pyramid_channels, s) for s in config.pyramid_scales)
        self.resampler = PerceiverResampler(config.resampler, width, output_dim)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "ImageTokenizer":
        super().train(mode)
        self.vit.eval()  # frozen: no dropout, whatever the mode of the rest
        return self

    @property
    def feature_channels(self) -> int:
        return self.config.pyramid_channels

    def forward(self, images: Tensor) -> VisionOutput:
        """``images: (K, 3, H, W)`` in ``[0, 1]``."""
        # 1. frozen ViT on CLIP-normalised images at its own resolution
        x = images.to(self.mean.dtype)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        with torch.no_grad():
            grid = self.vit.forward_intermediates(x, indices=1, intermediates_only=True)["image_intermediates"][-1]
        # 2. trainable pyramid over the patch grid (K, C, g, g)
        maps = [level(grid) for level in self.pyramid]
        # 3. resampler over the patch tokens
        tokens = self.resampler(grid.flatten(2).transpose(1, 2))
        return VisionOutput(visual_tokens=tokens, feature_maps=maps)
