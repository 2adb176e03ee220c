"""Read an image back into sample-world attributes by colour segmentation.

Each pixel is assigned to the nearest palette colour (shapes, digit ink, background); connected
regions of one colour become objects whose shape comes from how much of their bounding box they
fill (square ≈ 1, circle ≈ π/4, triangle ≈ ½), size from their extent, position from the 3x3 grid,
and the digit from its 3x5 bitmap. Works on generated images too: anything that is not a clean
shape simply fails to match, which is what a text-to-image score should see.
"""

from __future__ import annotations

from collections import deque

import numpy as np
from PIL import Image

from pipelines.sample_world.scenes import (
    BACKGROUND,
    COLOURS,
    DIGIT_BITMAPS,
    GLYPH_COLOUR,
    SIZES,
    Glyph,
    Scene,
    Shape,
)

_NAMES = list(COLOURS) + ["background", "glyph"]
_PALETTE = np.array(list(COLOURS.values()) + [BACKGROUND, GLYPH_COLOUR], dtype=np.float32)


def components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, each as an (n, 2) array of (row, col)."""
    seen = np.zeros_like(mask, dtype=bool)
    height, width = mask.shape
    found = []
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue = deque([start])
        pixels = []
        while queue:
            r, c = queue.popleft()
            pixels.append((r, c))
            for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
                if 0 <= nr < height and 0 <= nc < width and mask[nr, nc] and not seen[nr, nc]:
                    seen[nr, nc] = True
                    queue.append((nr, nc))
        found.append(np.array(pixels))
    return found


def _cell(center: float, size: int) -> int:
    return min(2, max(0, int(center / (size / 3))))


def _read_digit(crop: np.ndarray) -> int | None:
    height, width = crop.shape
    rows = ((np.arange(5) + 0.5) * height / 5).astype(int)
    cols = ((np.arange(3) + 0.5) * width / 3).astype(int)
    sampled = crop[np.ix_(rows, cols)]
    best, best_errors = None, 16
    for digit, bitmap in DIGIT_BITMAPS.items():
        errors = int(np.sum(bitmap != sampled))
        if errors < best_errors:
            best, best_errors = digit, errors
    return best if best_errors <= 1 else None


def parse_image(image: Image.Image | np.ndarray, *, min_area_fraction: float = 0.005) -> Scene:
    """Segment ``image`` into a :class:`Scene` (objects sorted by grid cell)."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    size = pixels.shape[0]
    distances = ((pixels[:, :, None, :] - _PALETTE[None, None]) ** 2).sum(-1)
    labels = distances.argmin(-1)
    min_area = max(4, int(min_area_fraction * pixels.shape[0] * pixels.shape[1]))
    threshold = (SIZES["small"] + SIZES["large"]) / 2 * size
    objects = []
    for index, name in enumerate(_NAMES[: len(COLOURS)]):
        for region in components(labels == index):
            if len(region) < min_area:
                continue
            (r0, c0), (r1, c1) = region.min(0), region.max(0)
            height, width = r1 - r0 + 1, c1 - c0 + 1
            fill = len(region) / (height * width)
            shape = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"
            objects.append(
                Shape(shape, name, "large" if max(height, width) > threshold else "small",
                      _cell((r0 + r1) / 2, size), _cell((c0 + c1) / 2, size))
            )
    glyph = None
    ink = labels == len(_NAMES) - 1
    regions = [r for r in components(ink) if len(r) >= 4]
    if regions:
        region = np.concatenate(regions)
        (r0, c0), (r1, c1) = region.min(0), region.max(0)
        digit = _read_digit(ink[r0 : r1 + 1, c0 : c1 + 1])
        if digit is not None:
            glyph = Glyph(digit, _cell((r0 + r1) / 2, size), _cell((c0 + c1) / 2, size))
    return Scene(objects=tuple(sorted(objects, key=lambda o: (o.row, o.col))), glyph=glyph)
