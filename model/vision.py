"""Image tokenizer: frozen open_clip ViT -> multi-scale feature pyramid -> Perceiver Resampler.

The pyramid is chosen by :attr:`VisionConfig.pyramid` from :data:`PYRAMID_BUILDERS`: the paper's trainable
ViT-Adapter (:mod:`model.vit_adapter`: a convolutional stem on the pixels interacting with the frozen ViT's layers),
or a simpler ViTDet-style pyramid over the last ViT layer's patch grid (:class:`SimplePyramid`), which has no detail
finer than a patch. Either gives the ViT's last patch tokens, which the resampler turns into N visual tokens in the LLM's
width.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from model.clip_weights import load_clip_vision_weights, read_clip_vision_checkpoint
from model.config import VisionConfig
from model.recompute import maybe_checkpoint
from model.resampler import PerceiverResampler
from model.vit_adapter import ViTAdapter

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def build_clip_vision_tower(clip_model: str | dict, checkpoint: str | Path | None) -> VisionTransformer:
    """The open_clip ``VisionTransformer`` of ``clip_model``, weights from a local checkpoint.

    ``clip_model`` (an open_clip config name or dict) decides the architecture, activation included.
    ``checkpoint`` is an open_clip state-dict file (or hub folder) or a Hugging Face ``CLIPModel`` /
    ``CLIPVisionModel`` folder (:mod:`model.clip_weights`); ``None`` keeps the random initialisation
    (models trained from scratch, as :meth:`MMInterleavedConfig.tiny`).

    The checkpoint never changes the architecture silently: where its config states the activation
    (Hugging Face ``hidden_act``, open_clip's ``open_clip_config.json``), the heads or the LayerNorm
    eps and ``clip_model`` built something else, :class:`~model.clip_weights.CheckpointConfigError`
    says so. OpenAI's weights (``openai/clip-vit-large-patch14``, the paper's) need QuickGELU: open_clip's
    ``-quickgelu`` configs, e.g. ``ViT-L-14-quickgelu``; without it their features degrade. A checkpoint
    that states no activation (a bare open_clip file) is loaded into ``clip_model``'s with a warning.
    A Hugging Face ``CLIPVisionModel`` has no image projection, so its tower has ``proj = None``
    (the image tokenizer reads the patch tokens only).

    Raises ``FileNotFoundError`` naming a path that does not exist, and
    :class:`~model.clip_weights.CheckpointKeysError` / ``CheckpointShapeError`` naming the file and the
    missing, unexpected or mis-shaped keys.
    """
    visual = _open_clip_vision_tower(clip_model)
    if checkpoint is not None:
        load_clip_vision_weights(visual, read_clip_vision_checkpoint(checkpoint))
    return visual


def _open_clip_vision_tower(clip_model: str | dict) -> VisionTransformer:
    """The randomly initialised ``VisionTransformer`` of an open_clip config name or dict."""
    if isinstance(clip_model, str):
        model_cfg = open_clip.get_model_config(clip_model)
        if model_cfg is None:
            raise ValueError(f"open_clip has no model config named {clip_model!r} (use open_clip.add_model_config or pass a dict)")
    else:
        model_cfg = dict(clip_model)
    clip = open_clip.CLIP(**{k: v for k, v in model_cfg.items() if k in ("embed_dim", "vision_cfg", "text_cfg", "quick_gelu")})
    if not isinstance(clip.visual, VisionTransformer):
        raise ValueError("the image tokenizer needs an open_clip VisionTransformer (a ViT config)")
    return clip.visual


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


class SimplePyramid(nn.Module):
    """The ViT (without autograd unless :attr:`VisionConfig.train_vit`) -> its last layer's patch grid -> one
    :class:`PyramidLevel` per scale (transposed convolutions for 4x and 2x, a 1x1 projection for 1x, max-pooling for 1/2x).

    Args:
        config: the levels' scales and channels, whether the ViT trains.
        vit: the ViT, read here for its width only (it is passed to :meth:`forward`, not kept).
        channels: channels of the output maps.
    """

    def __init__(self, config: VisionConfig, vit: VisionTransformer, channels: int) -> None:
        super().__init__()
        width = vit.conv1.out_channels
        self.levels = nn.ModuleList(PyramidLevel(width, channels, s) for s in config.pyramid_scales)
        self.train_vit = config.train_vit
        self.gradient_checkpointing = False

    def forward(self, vit: VisionTransformer, pixels: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``pixels: (K, 3, H, W)`` normalised -> patch tokens ``(K, g_h * g_w, width)``, maps ``(K, C, s * g_h, s * g_w)``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_vit):
            grid = vit.forward_intermediates(pixels, indices=1, intermediates_only=True)["image_intermediates"][-1]
        maps = [maybe_checkpoint(self.gradient_checkpointing, level, grid) for level in self.levels]
        return grid.flatten(2).transpose(1, 2), maps


PYRAMID_BUILDERS = {
    "vit_adapter": lambda config, vit, channels: ViTAdapter(config.adapter, vit, channels),
    "simple": SimplePyramid,
}
"""Pyramid builders by :attr:`VisionConfig.pyramid`: ``(config, vit, channels) -> module``."""


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
        self.vit.requires_grad_(config.train_vit)
        self.vit.eval()
        width = self.vit.conv1.out_channels
        self.image_size = tuple(self.vit.image_size)
        self.pyramid = PYRAMID_BUILDERS[config.pyramid](config, self.vit, config.pyramid_channels)
        self.resampler = PerceiverResampler(config.resampler, width, output_dim)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> "ImageTokenizer":
        super().train(mode)
        self.vit.eval()  # no dropout, whatever the mode of the rest (frozen or not: the release's ViT has none)
        return self

    @property
    def feature_channels(self) -> int:
        return self.config.pyramid_channels

    def enable_gradient_checkpointing(self) -> None:
        """Recompute the pyramid (the ViT-Adapter's stem and interactions, the ViT blocks they run included; the simple
        pyramid's levels, whose ViT keeps no activations) and the resampler's layers in the backward."""
        self.pyramid.gradient_checkpointing = True
        self.resampler.gradient_checkpointing = True

    def forward(self, images: Tensor) -> VisionOutput:
        """``images: (K, 3, H, W)`` in ``[0, 1]``."""
        # 1. frozen ViT on CLIP-normalised images at its own resolution
        x = images.to(self.mean.dtype)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False)
        x = (x - self.mean) / self.std
        # 2. trainable pyramid with the ViT: its last patch tokens (K, g_h * g_w, width) and the maps
        patches, maps = self.pyramid(self.vit, x)
        # 3. resampler over the patch tokens
        tokens = self.resampler(patches)
        return VisionOutput(visual_tokens=tokens, feature_maps=maps)
