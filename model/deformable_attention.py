"""Multi-scale deformable attention (Zhu et al. 2021, Deformable DETR), the ViT-Adapter's cross-attention.

Each query predicts, per head and level, ``P`` sampling offsets around its reference point and ``P`` attention logits;
one softmax over levels x points mixes the bilinearly sampled values. The sampling is :func:`cuda_ops.ms_deform_sample`,
the op MMFS uses (:mod:`model.mmfs` adds images, visibility and a sink on top of the same step).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.mmfs import deform_sample


class MultiScaleDeformableAttention(nn.Module):
    """Queries sample ``num_levels`` flattened feature maps around their reference points.

    Args:
        dim: width of the queries, the values and the output.
        value_dim: width of the projected values (``num_heads * head_dim``).
        num_heads: heads M.
        num_levels: feature levels L.
        num_points: sampling points P per head and level.
    """

    def __init__(self, dim: int, value_dim: int, num_heads: int, num_levels: int, num_points: int) -> None:
        super().__init__()
        if value_dim % num_heads:
            raise ValueError(f"deformable attention value width {value_dim} is not divisible by {num_heads} heads")
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_logits = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, value_dim)
        self.output_proj = nn.Linear(value_dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Deformable DETR's init: at first head ``m`` samples along its own direction ``2 pi m / M``, point ``p`` at
        ``p + 1`` cells of each level (the largest coordinate of the direction scaled to 1), with equal weights."""
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        angles = torch.arange(heads, dtype=torch.float32) * (2.0 * math.pi / heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        steps = torch.arange(1, points + 1, dtype=torch.float32)[:, None]
        offsets = directions[:, None, None, :] * steps  # (M, 1, P, 2)
        nn.init.zeros_(self.sampling_offsets.weight)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(offsets.expand(heads, levels, points, 2).flatten())
        nn.init.zeros_(self.attention_logits.weight)
        nn.init.zeros_(self.attention_logits.bias)
        for linear in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, query: Tensor, reference_points: Tensor, values: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor) -> Tensor:
        """Args:
            query: ``(N, Lq, dim)``.
            reference_points: ``(Lq, 2)`` normalised ``(x, y)``, shared by the batch.
            values: ``(N, S, dim)`` the L maps flattened (:func:`model.mmfs.flatten_feature_maps`).
            spatial_shapes: ``(L, 2)`` int64 ``(H_l, W_l)``.
            level_start_index: ``(L,)`` int64 offsets along S.

        Returns:
            ``(N, Lq, dim)``.
        """
        n, lq, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        # 1. locations: offsets are in cells of their level, (x, y) / (W_l, H_l)
        offsets = self.sampling_offsets(query).view(n, lq, heads, levels, points, 2)
        cells = spatial_shapes.flip(-1).to(offsets.dtype)[:, None, :]  # (L, 1, 2) as (W, H)
        locations = reference_points[None, :, None, None, None, :].to(offsets.dtype) + offsets / cells
        # 2. one softmax over levels x points per head
        weights = self.attention_logits(query).view(n, lq, heads, levels * points).float().softmax(-1)
        # 3. sample the projected values
        projected = self.value_proj(values)
        projected = projected.view(n, projected.shape[1], heads, -1)
        sampled = deform_sample()(
            projected,
            spatial_shapes,
            level_start_index,
            locations.to(projected.dtype).contiguous(),
            weights.view(n, lq, heads, levels, points).to(projected.dtype).contiguous(),
        )  # (N, Lq, value_dim)
        return self.output_proj(sampled)
