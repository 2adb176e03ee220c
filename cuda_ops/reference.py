"""Pure-PyTorch reference of multi-scale deformable sampling (runs anywhere, differentiable).

This is the ground truth every kernel is tested against, and the backend used when no compiled
kernel is available. It follows Deformable-DETR's convention: bilinear interpolation with zero
padding and ``align_corners=False`` (pixel coordinate = ``loc * W - 0.5``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ms_deform_sample_reference(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted bilinear sampling of multi-level feature maps.

    Args:
        value: ``(N, S, M, D)`` flattened feature maps of all levels, ``S = sum(H_l * W_l)``;
            M heads of D channels.
        spatial_shapes: ``(L, 2)`` int64, ``(H_l, W_l)`` of each level.
        level_start_index: ``(L,)`` int64, offset of each level along S.
        sampling_locations: ``(N, Lq, M, L, P, 2)`` normalised ``(x, y)``; ``(0, 0)`` is the
            top-left corner of the map and ``(1, 1)`` the bottom-right one. Points outside
            ``[0, 1]`` are allowed and read zeros beyond the border.
        attention_weights: ``(N, Lq, M, L, P)`` weight of each sample (not normalised here).

    Returns:
        ``(N, Lq, M * D)``, contiguous, in the dtype of ``value``.
    """
    n, _, m, d = value.shape
    lq = sampling_locations.shape[1]
    grids, weights = _per_head(value, sampling_locations, attention_weights)
    output = value.new_zeros(n * m, d, lq)
    for level, level_value in enumerate(_level_maps(value, spatial_shapes, level_start_index)):
        sampled = F.grid_sample(level_value, grids[:, :, level], **_GRID_SAMPLE)  # (N*M, D, Lq, P)
        output = output + (sampled * weights[:, None, :, level]).sum(-1)
    return output.view(n, m, d, lq).permute(0, 3, 1, 2).reshape(n, lq, m * d).contiguous()


def ms_deform_sample_reference_backward(
    grad_output: torch.Tensor,
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: torch.Tensor,
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`ms_deform_sample_reference` without autograd (aten's grid-sample backward).

    Args:
        grad_output: ``(N, Lq, M * D)``; the other arguments as in the forward.

    Returns:
        ``(grad_value, grad_sampling_locations, grad_attention_weights)`` shaped like the inputs.
    """
    n, _, m, d = value.shape
    lq, num_levels, points = sampling_locations.shape[1], sampling_locations.shape[3], sampling_locations.shape[4]
    grids, weights = _per_head(value, sampling_locations, attention_weights)
    grad = grad_output.view(n, lq, m, d).permute(0, 2, 3, 1).reshape(n * m, d, lq, 1).to(value.dtype)
    grad_value = torch.zeros_like(value)
    grad_grids, grad_weights = [], []
    for level, level_value in enumerate(_level_maps(value, spatial_shapes, level_start_index)):
        grid = grids[:, :, level]
        sampled = F.grid_sample(level_value, grid, **_GRID_SAMPLE)  # (N*M, D, Lq, P)
        grad_weights.append((grad * sampled).sum(1))  # (N*M, Lq, P)
        grad_level, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
            grad * weights[:, None, :, level], level_value, grid, 0, 0, False, [True, True]
        )
        h, w = level_value.shape[-2:]
        start = int(level_start_index[level])
        grad_value[:, start : start + h * w] = grad_level.view(n, m, d, h * w).permute(0, 3, 1, 2)
        grad_grids.append(grad_grid)
    # d grid / d location = 2; undo the (N, M) -> N*M fold of the forward.
    grad_locations = (2 * torch.stack(grad_grids, 2)).view(n, m, lq, num_levels, points, 2).transpose(1, 2)
    grad_attention = torch.stack(grad_weights, 2).view(n, m, lq, num_levels, points).transpose(1, 2)
    return (
        grad_value,
        grad_locations.to(sampling_locations.dtype).contiguous(),
        grad_attention.to(attention_weights.dtype).contiguous(),
    )


_GRID_SAMPLE = dict(mode="bilinear", padding_mode="zeros", align_corners=False)


def _per_head(value, sampling_locations, attention_weights):
    """Fold heads into the batch, one grid_sample image per (n, m): grids ``(N*M, Lq, L, P, 2)``
    in grid_sample's [-1, 1] convention and weights ``(N*M, Lq, L, P)``."""
    grids = (2 * sampling_locations - 1).transpose(1, 2).flatten(0, 1).to(value.dtype)
    weights = attention_weights.transpose(1, 2).flatten(0, 1).to(value.dtype)
    return grids, weights


def _level_maps(value, spatial_shapes, level_start_index):
    """Yield each level of ``value (N, S, M, D)`` as a ``(N*M, D, H, W)`` image batch."""
    n, _, m, d = value.shape
    for (h, w), start in zip(spatial_shapes.tolist(), level_start_index.tolist()):
        yield value[:, start : start + h * w].permute(0, 2, 3, 1).reshape(n * m, d, h, w)
