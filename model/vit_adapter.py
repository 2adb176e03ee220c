"""ViT-Adapter (Chen et al. 2022, "Vision Transformer Adapter for Dense Predictions"), the paper's image pyramid.

A convolutional stem on the pixels (the spatial prior) gives maps at 1/4, 1/8, 1/16 and 1/32 of its input, which is
the image resized to 16 pixels per ViT patch (the release's 224 -> 256 px for ViT-L/14), so the levels are 4x, 2x, 1x
and 1/2x the patch grid. The 1/8..1/32 maps interact with the frozen ViT, split into segments ending at the configured
layers (the release: 5, 11, 17, 23 of 24):

1. injector: the ViT's patch tokens cross-attend to the spatial maps (deformable attention), gated by a zero-initialised
   ``gamma``, so an untrained adapter leaves the ViT's features exactly as they were;
2. the segment's frozen ViT blocks run on the injected tokens (autograd flows through them, their weights get none);
3. extractors: the spatial maps cross-attend to the segment's output tokens, then a convolutional FFN.

The output maps are the spatial maps (the 1/4 one plus a learned 2x upsampling of the 1/8 one), each plus one
interaction's patch grid resized to it and a 2-D sine-cosine position in patch-grid units
(:func:`model.mmfs.sincos_2d`). The release's ``InteractionBlockWithCls`` and ``SpatialPriorModule`` are the model;
this code is weft's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import Tensor, nn

from model.config import ViTAdapterConfig
from model.deformable_attention import MultiScaleDeformableAttention
from model.mmfs import flatten_feature_maps, grid_reference_points, sincos_2d
from model.recompute import maybe_checkpoint

INTERACTIONS = 4
"""Interactions when :attr:`ViTAdapterConfig.layers` is ``None`` (the release's), fewer for a ViT of fewer layers."""
PIXELS_PER_PATCH = 16
"""The stem reads the image at this many pixels per patch-grid cell, so its 1/16 map is the patch grid."""


def interaction_segments(layers: tuple[int, ...] | None, num_layers: int) -> list[tuple[int, int]]:
    """``(first, last)`` ViT layer of each interaction; ``layers`` are the last ones (``None``: evenly spaced)."""
    if layers is None:
        count = min(INTERACTIONS, num_layers)
        layers = tuple((i + 1) * num_layers // count - 1 for i in range(count))
    if layers[-1] != num_layers - 1:
        raise ValueError(f"adapter layers {layers} must end at the ViT's last layer, {num_layers - 1}")
    firsts = (0, *(last + 1 for last in layers[:-1]))
    return list(zip(firsts, layers))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of ``(N, C, H, W)`` maps."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def conv_norm_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        LayerNorm2d(out_channels, eps=1e-6),
        nn.ReLU(),
    )


class SpatialPrior(nn.Module):
    """The convolutional stem: pixels ``(K, 3, H, W)`` -> 4 maps ``(K, width, H / s, W / s)`` for s = 4, 8, 16, 32.

    Args:
        channels: channels of the 1/4 map (1/8: 2x, 1/16 and 1/32: 4x) before the 1x1 projections.
        width: channels of every output map.
    """

    def __init__(self, channels: int, width: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            conv_norm_relu(3, channels, 2),
            conv_norm_relu(channels, channels, 1),
            conv_norm_relu(channels, channels, 1),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        sizes = (channels, 2 * channels, 4 * channels, 4 * channels)
        self.downsamples = nn.ModuleList(conv_norm_relu(a, b, 2) for a, b in zip(sizes, sizes[1:]))
        self.projections = nn.ModuleList(nn.Conv2d(c, width, 1) for c in sizes)

    def forward(self, pixels: Tensor) -> list[Tensor]:
        maps = [self.stem(pixels)]
        for downsample in self.downsamples:
            maps.append(downsample(maps[-1]))
        return [project(m) for project, m in zip(self.projections, maps)]


@dataclass
class InteractionLayout:
    """Where the interactions' queries sit and how what they sample is laid out.

    Attributes:
        patch_points: ``(g_h * g_w, 2)`` the patch tokens' reference points (normalised ``(x, y)``).
        patch_shapes, patch_start: the patch grid as one level, ``(1, 2)`` and ``(1,)``.
        spatial_points: ``(S, 2)`` the flattened spatial maps' reference points.
        spatial_shapes, spatial_start: their levels, ``(3, 2)`` and ``(3,)``.
        spatial_sizes: the same sizes as Python ``(H_l, W_l)`` pairs.
    """

    patch_points: Tensor
    patch_shapes: Tensor
    patch_start: Tensor
    spatial_points: Tensor
    spatial_shapes: Tensor
    spatial_start: Tensor
    spatial_sizes: list[tuple[int, int]]

    @classmethod
    def of(cls, grid: tuple[int, int], spatial_sizes: list[tuple[int, int]], spatial_shapes: Tensor,
           spatial_start: Tensor) -> "InteractionLayout":
        device = spatial_shapes.device
        return cls(
            patch_points=grid_reference_points(*grid, device=device),
            patch_shapes=torch.tensor([grid], dtype=torch.long, device=device),
            patch_start=torch.zeros(1, dtype=torch.long, device=device),
            spatial_points=torch.cat([grid_reference_points(h, w, device=device) for h, w in spatial_sizes]),
            spatial_shapes=spatial_shapes,
            spatial_start=spatial_start,
            spatial_sizes=spatial_sizes,
        )


class ConvFFN(nn.Module):
    """Linear -> 3x3 depthwise convolution on each level's map -> GELU -> Linear: ``(N, S, dim)`` -> ``(N, S, dim)``."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.depthwise = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, sizes: list[tuple[int, int]]) -> Tensor:
        hidden = self.fc1(x)
        n, _, c = hidden.shape
        levels = hidden.split([h * w for h, w in sizes], dim=1)
        hidden = torch.cat([
            self.depthwise(level.transpose(1, 2).reshape(n, c, h, w)).flatten(2).transpose(1, 2)
            for level, (h, w) in zip(levels, sizes)
        ], dim=1)
        return self.fc2(F.gelu(hidden))


class AdapterAttention(nn.Module):
    """LayerNormed queries attend to LayerNormed features through :class:`MultiScaleDeformableAttention`."""

    def __init__(self, width: int, config: ViTAdapterConfig, num_levels: int) -> None:
        super().__init__()
        self.query_norm = nn.LayerNorm(width, eps=1e-6)
        self.feature_norm = nn.LayerNorm(width, eps=1e-6)
        value_dim = round(width * config.value_ratio)
        self.attention = MultiScaleDeformableAttention(width, value_dim, config.num_heads, num_levels, config.num_points)

    def attend(self, query: Tensor, points: Tensor, features: Tensor, shapes: Tensor, start: Tensor) -> Tensor:
        return self.attention(self.query_norm(query), points, self.feature_norm(features), shapes, start)


class Injector(AdapterAttention):
    """Patch tokens ``(K, g_h * g_w, width)`` gather the spatial maps, times ``gamma`` (zero at init)."""

    def __init__(self, width: int, config: ViTAdapterConfig) -> None:
        super().__init__(width, config, num_levels=3)
        self.gamma = nn.Parameter(torch.zeros(width))

    def forward(self, patches: Tensor, spatial: Tensor, layout: InteractionLayout) -> Tensor:
        gathered = self.attend(patches, layout.patch_points, spatial, layout.spatial_shapes, layout.spatial_start)
        return patches + self.gamma * gathered


class Extractor(AdapterAttention):
    """The flattened spatial maps ``(K, S, width)`` gather the patch tokens, then a residual convolutional FFN."""

    def __init__(self, width: int, config: ViTAdapterConfig) -> None:
        super().__init__(width, config, num_levels=1)
        self.ffn_norm = nn.LayerNorm(width, eps=1e-6)
        self.ffn = ConvFFN(width, round(width * config.ffn_ratio))

    def forward(self, spatial: Tensor, patches: Tensor, layout: InteractionLayout) -> Tensor:
        spatial = spatial + self.attend(spatial, layout.spatial_points, patches, layout.patch_shapes, layout.patch_start)
        return spatial + self.ffn(self.ffn_norm(spatial), layout.spatial_sizes)


class Interaction(nn.Module):
    """Inject into the ViT's tokens, run a segment of frozen ViT blocks, extract into the spatial maps."""

    def __init__(self, width: int, config: ViTAdapterConfig, num_extractors: int) -> None:
        super().__init__()
        self.injector = Injector(width, config)
        self.extractors = nn.ModuleList(Extractor(width, config) for _ in range(num_extractors))

    def forward(self, tokens: Tensor, spatial: Tensor, blocks: Sequence[nn.Module],
                layout: InteractionLayout) -> tuple[Tensor, Tensor]:
        """``tokens: (K, 1 + g_h * g_w, width)`` (class token first), ``spatial: (K, S, width)`` -> both updated."""
        tokens = torch.cat([tokens[:, :1], self.injector(tokens[:, 1:], spatial, layout)], dim=1)
        for block in blocks:
            tokens = block(tokens)
        for extractor in self.extractors:
            spatial = extractor(spatial, tokens[:, 1:], layout)
        return tokens, spatial


class ViTAdapter(nn.Module):
    """Pixels and a frozen open_clip ViT -> the ViT's last patch tokens and maps at 4x, 2x, 1x, 1/2x its patch grid.

    Args:
        config: interaction layers, attention heads and points, stem and FFN sizes.
        vit: the frozen ViT, read here for its sizes only (it is passed to :meth:`forward`, not kept).
        channels: channels of the output maps; the ViT's width (the adapter works at it).
    """

    def __init__(self, config: ViTAdapterConfig, vit: VisionTransformer, channels: int) -> None:
        super().__init__()
        width = vit.conv1.out_channels
        if channels != width:
            raise ValueError(f"the ViT-Adapter's maps have the ViT's width {width}; pyramid_channels is {channels}")
        if not vit.transformer.batch_first:
            raise ValueError("the ViT-Adapter runs the ViT's blocks batch-first; this open_clip ViT is not")
        self.segments = interaction_segments(config.layers, len(vit.transformer.resblocks))
        self.grid = tuple(vit.grid_size)
        self.spatial_prior = SpatialPrior(config.stem_channels, width)
        self.level_embed = nn.Parameter(torch.zeros(3, width))
        last = len(self.segments) - 1
        self.interactions = nn.ModuleList(
            Interaction(width, config, config.final_extractors if i == last else 1) for i in range(len(self.segments))
        )
        self.upsample = nn.ConvTranspose2d(width, width, 2, stride=2)
        self.gradient_checkpointing = False

    def forward(self, vit: VisionTransformer, pixels: Tensor) -> tuple[Tensor, list[Tensor]]:
        """``pixels: (K, 3, H, W)`` normalised, at the ViT's resolution -> patch tokens ``(K, g_h * g_w, width)`` of
        the ViT's last layer (the injections included) and maps ``(K, width, s * g_h, s * g_w)`` for s = 4, 2, 1, 1/2."""
        # 1. spatial prior on the pixels resized so that its 1/16 map is the patch grid
        stem_size = (self.grid[0] * PIXELS_PER_PATCH, self.grid[1] * PIXELS_PER_PATCH)
        stem_pixels = F.interpolate(pixels, size=stem_size, mode="bilinear", align_corners=False)
        finest, *coarser = maybe_checkpoint(self.gradient_checkpointing, self.spatial_prior, stem_pixels)
        spatial, spatial_shapes, spatial_start = flatten_feature_maps(
            [m + embed[:, None, None] for m, embed in zip(coarser, self.level_embed)])
        layout = InteractionLayout.of(self.grid, [tuple(m.shape[-2:]) for m in coarser], spatial_shapes, spatial_start)

        # 2. interactions with the frozen ViT's segments
        tokens = vit._embeds(pixels)  # (K, 1 + g_h * g_w, width): patches, class token, positions, ln_pre
        grids = []
        for (first, last), interaction in zip(self.segments, self.interactions):
            blocks = vit.transformer.resblocks[first:last + 1]
            tokens, spatial = maybe_checkpoint(self.gradient_checkpointing, interaction, tokens, spatial, blocks, layout)
            grids.append(self._as_grid(tokens[:, 1:], self.grid))

        # 3. maps: spatial levels + one interaction's grid each (the finest the earliest) + 2-D positions
        levels = spatial.split([h * w for h, w in layout.spatial_sizes], dim=1)
        c2, c3, c4 = (self._as_grid(level, size) for level, size in zip(levels, layout.spatial_sizes))
        maps = [finest + self.upsample(c2), c2, c3, c4]
        maps = [
            m + F.interpolate(grids[i * len(grids) // len(maps)], size=m.shape[-2:], mode="bilinear", align_corners=False)
            + self._position(m)
            for i, m in enumerate(maps)
        ]
        return tokens[:, 1:], maps

    @staticmethod
    def _as_grid(tokens: Tensor, size: tuple[int, int]) -> Tensor:
        """``(K, h * w, C)`` -> ``(K, C, h, w)``."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *size)

    def _position(self, m: Tensor) -> Tensor:
        """The 2-D sine-cosine position ``(C, h, w)`` of map ``m``'s cells, in patch-grid cells."""
        c, h, w = m.shape[-3:]
        return sincos_2d(h, w, c, m.device, cell=self.grid[0] / h).to(m.dtype).T.reshape(c, h, w)
