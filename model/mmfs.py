"""Multi-Modal Feature Synchronizer (MMFS), paper Sec. 3.2.

For each query (a text token in the LLM, a pixel in the UNet) and each image it may see, MMFS
predicts sampling offsets and attention logits from the query, samples the image's multi-scale
feature maps with :func:`cuda_ops.ms_deform_sample`, and mixes everything with one softmax over
all visible images x levels x points. K images of L levels are handed to the op as K*L levels.

Differences from the public release, on purpose:

- The "no image" sink is one slot per (query, head) with logit 0 and a zero output. The release
  has one slot per (image, level) with logit ``-log(K*L)``: the same total sink mass
  (``K*L * exp(-log(K*L)) = 1 = exp(0)``), but ours is also well defined when a query sees no
  image at all: all weight goes to the sink, and the output is exactly zero (the output projection's
  bias is not added either), so a query without images is the same as no MMFS at all.
- Invisible images get ``-inf`` logits (exactly zero weight), not ``-1e4``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import MMFSConfig


def deform_sample():
    """:func:`cuda_ops.ms_deform_sample`, imported at call time so that building a model never triggers the kernel's
    JIT build."""
    from cuda_ops import ms_deform_sample

    return ms_deform_sample


def sincos_1d(positions: Tensor, dim: int) -> Tensor:
    """Sine-cosine embedding. ``positions: (...)`` float -> ``(..., dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=positions.device, dtype=torch.float32) / max(half, 1))
    angles = positions.float()[..., None] * freqs
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def sincos_2d(height: int, width: int, dim: int, device: torch.device | None = None, cell: float = 1.0) -> Tensor:
    """2-D sine-cosine embedding of a ``height x width`` grid -> ``(height * width, dim)`` at the cells' centres in units
    of ``cell`` cells (the centre of cell ``i`` is at ``(i + 0.5) * cell - 0.5``): maps of one image at several
    resolutions share positions with ``cell`` = 1 / their scale; ``cell`` = 1 puts cell ``i`` at ``i``."""
    ys, xs = torch.meshgrid(
        (torch.arange(height, device=device, dtype=torch.float32) + 0.5) * cell - 0.5,
        (torch.arange(width, device=device, dtype=torch.float32) + 0.5) * cell - 0.5,
        indexing="ij",
    )
    half = dim // 2
    return torch.cat([sincos_1d(ys.flatten(), half), sincos_1d(xs.flatten(), dim - half)], dim=-1)


def grid_reference_points(height: int, width: int, device: torch.device | None = None) -> Tensor:
    """Pixel-centre reference points of a ``height x width`` map, normalised ``(x, y)``: ``(H*W, 2)``."""
    ys, xs = torch.meshgrid(
        (torch.arange(height, device=device, dtype=torch.float32) + 0.5) / height,
        (torch.arange(width, device=device, dtype=torch.float32) + 0.5) / width,
        indexing="ij",
    )
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1)


def flatten_feature_maps(maps: list[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """``L`` maps ``(..., C, H_l, W_l)`` -> ``(..., S, C)``, spatial_shapes ``(L, 2)``, level_start_index ``(L,)``."""
    shapes = [m.shape[-2:] for m in maps]
    flat = torch.cat([m.flatten(-2).transpose(-1, -2) for m in maps], dim=-2)
    device = flat.device
    spatial_shapes = torch.tensor([list(s) for s in shapes], dtype=torch.long, device=device)
    sizes = spatial_shapes.prod(-1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    return flat, spatial_shapes, level_start_index


@dataclass
class ImageFeatures:
    """Multi-scale feature maps of the images a set of queries may look at.

    Attributes:
        values: ``(N, K, S, C)`` flattened maps of K image slots per query group (zero-padded
            slots are fine: they must be invisible).
        spatial_shapes: ``(L, 2)`` int64 ``(H_l, W_l)``.
        level_start_index: ``(L,)`` int64 offsets along S.
    """

    values: Tensor
    spatial_shapes: Tensor
    level_start_index: Tensor


class MMFS(nn.Module):
    """One MMFS attention: queries sample the feature maps of the images they may see.

    Args:
        config: heads, points, width, offset init, base spatial shape, relative-position range.
        query_dim: width of the queries.
        value_dim: channels of the image feature maps.
        output_dim: width of the output.
        num_levels: feature levels L per image.
    """

    def __init__(self, config: MMFSConfig, query_dim: int, value_dim: int, output_dim: int, num_levels: int) -> None:
        super().__init__()
        self.config = config
        self.num_levels = num_levels
        heads, points = config.num_heads, config.num_points
        self.relative_position = nn.Embedding(config.max_images + 1, query_dim)
        self.dynamic_query = nn.Linear(query_dim, query_dim)
        self.sampling_offsets = nn.Linear(query_dim, heads * points * 2)
        self.attention_logits = nn.Linear(query_dim, heads * num_levels * points)
        self.value_proj = nn.Linear(value_dim, config.hidden_size)
        self.output_proj = nn.Linear(config.hidden_size, output_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The release's init: offsets start at their bias alone (uniform within ``offset_init`` base pixels), the
        attention logits at ``nn.Linear``'s default weights with a zero bias, the projections Xavier."""
        nn.init.zeros_(self.sampling_offsets.weight)
        nn.init.uniform_(self.sampling_offsets.bias, -self.config.offset_init, self.config.offset_init)
        self.attention_logits.reset_parameters()
        nn.init.zeros_(self.attention_logits.bias)
        nn.init.normal_(self.relative_position.weight, std=0.02)
        for linear in (self.value_proj, self.output_proj, self.dynamic_query):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        features: ImageFeatures,
        visible: Tensor,
        relative_position: Tensor,
        query_shape: tuple[int, int] | None = None,
    ) -> Tensor:
        """Sample and mix the visible images' features.

        Args:
            query: ``(N, Lq, Dq)``.
            reference_points: ``(N, Lq, 2)`` or ``(Lq, 2)`` normalised ``(x, y)``.
            features: values ``(N, K, S, C)`` and their level layout (L levels).
            visible: ``(N, Lq, K)`` bool, which image slots each query may see.
            relative_position: ``(N, Lq, K)`` int64, 1 = most recent visible image, 0 = invisible.
            query_shape: ``(h, w)`` of the map whose pixels the queries are (``Lq = h * w``); offsets are in its
                pixels when ``config.base_spatial_shape`` is ``None``.

        Returns:
            ``(N, Lq, output_dim)``.
        """
        n, lq, _ = query.shape
        k = features.values.shape[1]
        heads, points, levels = self.config.num_heads, self.config.num_points, self.num_levels
        head_dim = self.config.hidden_size // heads
        if k == 0:
            return query.new_zeros(n, lq, self.output_proj.out_features)

        # 1. one query per (token, image): dynamic query + relative image position
        rel = relative_position.clamp(0, self.config.max_images)
        per_image = self.dynamic_query(query)[:, :, None] + self.relative_position(rel)  # (N, Lq, K, Dq)

        # 2. offsets: one normalised offset per (image, head, point), shared by every level
        offsets = self.sampling_offsets(per_image).view(n, lq, k, heads, 1, points, 2)
        if reference_points.dim() == 2:
            reference_points = reference_points.expand(n, lq, 2)
        locations = reference_points[:, :, None, None, None, None, :] + offsets / self._offset_normaliser(query_shape, offsets)
        locations = locations.expand(n, lq, k, heads, levels, points, 2)
        locations = locations.permute(0, 1, 3, 2, 4, 5, 6).reshape(n, lq, heads, k * levels, points, 2)

        # 3. one softmax over visible images x levels x points, plus the zero-output sink
        logits = self.attention_logits(per_image).view(n, lq, k, heads, levels, points).permute(0, 1, 3, 2, 4, 5)
        logits = logits.masked_fill(~visible[:, :, None, :, None, None], float("-inf"))
        logits = torch.cat([logits.reshape(n, lq, heads, k * levels * points), logits.new_zeros(n, lq, heads, 1)], dim=-1)
        weights = logits.float().softmax(-1)[..., :-1].view(n, lq, heads, k * levels, points)

        # 4. deformable sampling of the K*L "levels"
        values = self.value_proj(features.values)  # (N, K, S, hidden)
        s = values.shape[2]
        values = values.reshape(n, k * s, heads, head_dim)
        spatial_shapes = features.spatial_shapes.repeat(k, 1)
        level_start_index = (
            torch.arange(k, device=values.device, dtype=torch.long)[:, None] * s + features.level_start_index[None]
        ).flatten()
        sampled = deform_sample()(
            values,
            spatial_shapes,
            level_start_index,
            locations.to(values.dtype).contiguous(),
            weights.to(values.dtype).contiguous(),
        )  # (N, Lq, hidden)
        return self.output_proj(sampled) * visible.any(-1, keepdim=True).to(sampled.dtype)

    def _offset_normaliser(self, query_shape: tuple[int, int] | None, offsets: Tensor) -> Tensor | int:
        """What offsets in pixels are divided by to be normalised: ``base_spatial_shape``, or the query map's
        ``(w, h)`` (as ``(x, y)``)."""
        if self.config.base_spatial_shape is not None:
            return self.config.base_spatial_shape
        if query_shape is None:
            raise ValueError("MMFS base_spatial_shape is None (offsets in the query map's pixels) but no query_shape was given")
        h, w = query_shape
        return torch.tensor([w, h], dtype=offsets.dtype, device=offsets.device)


def visibility_and_relative_position(
    query_document: Tensor,
    query_position: Tensor,
    image_document: Tensor,
    image_start: Tensor,
    image_valid: Tensor,
) -> tuple[Tensor, Tensor]:
    """Which image slots each query sees, and their relative image positions.

    A query sees an image iff both are in the same document and the image starts at or before
    the query. Slots must be ordered by ``image_start``.

    Args:
        query_document: ``(N, Lq)`` document id of each query (< 0: padding, sees nothing).
        query_position: ``(N, Lq)`` position of each query in the packed sequence.
        image_document: ``(N, K)`` document id of each image slot.
        image_start: ``(N, K)`` position of each image's first token.
        image_valid: ``(N, K)`` bool, False for padded slots.

    Returns:
        visible ``(N, Lq, K)`` bool and relative_position ``(N, Lq, K)`` int64 (most recent
        visible image = 1, invisible = 0).
    """
    visible = (
        image_valid[:, None, :]
        & (query_document[:, :, None] >= 0)
        & (query_document[:, :, None] == image_document[:, None, :])
        & (query_position[:, :, None] >= image_start[:, None, :])
    )
    counts = visible.long()
    relative = counts.flip(-1).cumsum(-1).flip(-1) * counts
    return visible, relative
