"""Input builders and an independent loop implementation for the deformable-sampling tests."""

from __future__ import annotations

import math

import torch


def make_inputs(
    shapes=((6, 5), (3, 3), (2, 1), (1, 1)),
    n=2,
    lq=7,
    m=3,
    d=5,
    p=4,
    dtype=torch.float64,
    device="cpu",
    spread=(-0.2, 1.2),
    seed=0,
):
    """Random inputs for ``ms_deform_sample``; locations spread beyond [0, 1] by default."""
    generator = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)
    sizes = spatial_shapes.prod(1)
    level_start_index = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    s, levels = int(sizes.sum()), len(spatial_shapes)
    low, high = spread
    value = torch.randn(n, s, m, d, generator=generator, dtype=torch.float64)
    locations = torch.rand(n, lq, m, levels, p, 2, generator=generator, dtype=torch.float64) * (high - low) + low
    weights = torch.rand(n, lq, m, levels, p, generator=generator, dtype=torch.float64)
    cast = dict(dtype=dtype, device=device)
    return (
        value.to(**cast),
        spatial_shapes.to(device),
        level_start_index.to(device),
        locations.to(**cast),
        weights.to(**cast),
    )


def naive_ms_deform_sample(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
    """Scalar loops straight from the definition (pixel = loc * size - 0.5, zeros outside)."""
    n, _, m, d = value.shape
    _, lq, _, levels, points, _ = sampling_locations.shape
    out = torch.zeros(n, lq, m, d, dtype=torch.float64)
    v = value.double()
    for b in range(n):
        for q in range(lq):
            for head in range(m):
                for level in range(levels):
                    h, w = (int(x) for x in spatial_shapes[level])
                    start = int(level_start_index[level])
                    for pt in range(points):
                        x = float(sampling_locations[b, q, head, level, pt, 0]) * w - 0.5
                        y = float(sampling_locations[b, q, head, level, pt, 1]) * h - 0.5
                        a = float(attention_weights[b, q, head, level, pt])
                        x0, y0 = math.floor(x), math.floor(y)
                        for yi in (y0, y0 + 1):
                            for xi in (x0, x0 + 1):
                                if 0 <= xi < w and 0 <= yi < h:
                                    corner = (1 - abs(x - xi)) * (1 - abs(y - yi))
                                    out[b, q, head] += a * corner * v[b, start + yi * w + xi, head]
    return out.reshape(n, lq, m * d)
