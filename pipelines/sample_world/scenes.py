"""Scenes of the sample world: coloured shapes on a 3x3 grid plus an optional small digit.

A scene is pure data (frozen dataclasses, JSON round-trip via ``to_dict``/``from_dict``);
:func:`render` draws it at any size and :func:`parse_image` (in ``parse.py``) reads it back.
Objects never share a grid cell, so every attribute — colour, shape, size, position, digit — is
exactly recoverable from the pixels.
"""

from __future__ import annotations

import io
import random
from dataclasses import asdict, dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 50),
    "blue": (35, 70, 215),
    "yellow": (240, 215, 30),
    "purple": (135, 50, 175),
    "orange": (245, 135, 25),
    "cyan": (35, 200, 215),
}
BACKGROUND = (238, 238, 238)
GLYPH_COLOUR = (15, 15, 15)
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 0.17, "large": 0.29}  # extent as a fraction of the image side
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")

# 3x5 digits; every digit touches all four sides of its box, so the box is found from pixels.
DIGITS = {
    0: ("###", "#.#", "#.#", "#.#", "###"),
    1: (".#.", "##.", ".#.", ".#.", "###"),
    2: ("###", "..#", "###", "#..", "###"),
    3: ("###", "..#", "###", "..#", "###"),
    4: ("#.#", "#.#", "###", "..#", "..#"),
    5: ("###", "#..", "###", "..#", "###"),
    6: ("###", "#..", "###", "#.#", "###"),
    7: ("###", "..#", "..#", ".#.", ".#."),
    8: ("###", "#.#", "###", "#.#", "###"),
    9: ("###", "#.#", "###", "..#", "###"),
}
DIGIT_BITMAPS = {d: np.array([[c == "#" for c in row] for row in rows]) for d, rows in DIGITS.items()}


def position_name(row: int, col: int) -> str:
    if (row, col) == (1, 1):
        return "center"
    if row == 1:
        return COLUMNS[col]
    if col == 1:
        return ROWS[row]
    return f"{ROWS[row]} {COLUMNS[col]}"


@dataclass(frozen=True)
class Shape:
    shape: str
    colour: str
    size: str
    row: int
    col: int

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)

    def describe(self) -> str:
        return f"a {self.size} {self.colour} {self.shape}"


@dataclass(frozen=True)
class Glyph:
    digit: int
    row: int
    col: int

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)


@dataclass(frozen=True)
class Scene:
    objects: tuple[Shape, ...]
    glyph: Glyph | None = None
    scene_id: str = ""
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def cells(self) -> set[tuple[int, int]]:
        used = {(o.row, o.col) for o in self.objects}
        if self.glyph is not None:
            used.add((self.glyph.row, self.glyph.col))
        return used

    def to_dict(self) -> dict:
        return {
            "scene_id": self.scene_id,
            "objects": [asdict(o) for o in self.objects],
            "glyph": None if self.glyph is None else asdict(self.glyph),
        }

    @staticmethod
    def from_dict(data: dict) -> "Scene":
        glyph = data.get("glyph")
        return Scene(
            objects=tuple(Shape(**o) for o in data["objects"]),
            glyph=None if glyph is None else Glyph(**glyph),
            scene_id=data.get("scene_id", ""),
        )


def random_scene(rng: random.Random, scene_id: str, *, min_objects: int = 1, max_objects: int = 3,
                 glyph_probability: float = 0.5) -> Scene:
    cells = [(r, c) for r in range(3) for c in range(3)]
    rng.shuffle(cells)
    n = rng.randint(min_objects, max_objects)
    objects = tuple(
        sorted(
            (Shape(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), r, c) for r, c in cells[:n]),
            key=lambda o: (o.row, o.col),
        )
    )
    glyph = None
    if rng.random() < glyph_probability:
        r, c = cells[n]
        glyph = Glyph(rng.randint(0, 9), r, c)
    return Scene(objects=objects, glyph=glyph, scene_id=scene_id)


def free_cells(scene: Scene) -> list[tuple[int, int]]:
    used = scene.cells()
    return [(r, c) for r in range(3) for c in range(3) if (r, c) not in used]


def move(scene: Scene, index: int, row: int, col: int, scene_id: str) -> Scene:
    objects = list(scene.objects)
    objects[index] = replace(objects[index], row=row, col=col)
    return replace(scene, objects=tuple(sorted(objects, key=lambda o: (o.row, o.col))), scene_id=scene_id)


def recolour(scene: Scene, index: int, colour: str, scene_id: str) -> Scene:
    objects = list(scene.objects)
    objects[index] = replace(objects[index], colour=colour)
    return replace(scene, objects=tuple(objects), scene_id=scene_id)


def render(scene: Scene, size: int = 64) -> Image.Image:
    """Draw the scene as an RGB image of ``size`` x ``size`` pixels (no anti-aliasing)."""
    if size < 48:
        raise ValueError(f"image size must be at least 48 px to keep shapes and digits legible, got {size}")
    image = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = size / 3
    for obj in scene.objects:
        cx, cy = (obj.col + 0.5) * cell, (obj.row + 0.5) * cell
        half = SIZES[obj.size] * size / 2
        box = (round(cx - half), round(cy - half), round(cx + half), round(cy + half))
        colour = COLOURS[obj.colour]
        if obj.shape == "circle":
            draw.ellipse(box, fill=colour)
        elif obj.shape == "square":
            draw.rectangle(box, fill=colour)
        elif obj.shape == "triangle":
            draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=colour)
        else:
            raise ValueError(f"unknown shape {obj.shape!r}")
    if scene.glyph is not None:
        scale = max(2, round(size / 32))
        bitmap = DIGIT_BITMAPS[scene.glyph.digit]
        cx, cy = (scene.glyph.col + 0.5) * cell, (scene.glyph.row + 0.5) * cell
        x0, y0 = round(cx - 1.5 * scale), round(cy - 2.5 * scale)
        for r, c in zip(*np.nonzero(bitmap)):
            draw.rectangle(
                (x0 + c * scale, y0 + r * scale, x0 + (c + 1) * scale - 1, y0 + (r + 1) * scale - 1),
                fill=GLYPH_COLOUR,
            )
    return image


def render_segmentation(scene: Scene, size: int = 64) -> np.ndarray:
    """Label map (H, W) uint8: 0 background, 1 + colour index for shapes, 255 for the digit."""
    colour_scene = render(scene, size)
    pixels = np.asarray(colour_scene)
    labels = np.zeros(pixels.shape[:2], dtype=np.uint8)
    for i, rgb in enumerate(COLOURS.values()):
        labels[np.all(pixels == rgb, axis=-1)] = i + 1
    labels[np.all(pixels == GLYPH_COLOUR, axis=-1)] = 255
    return labels


def label_map_image(scene: Scene, size: int) -> Image.Image:
    """The scene's segmentation map drawn in its label colours (the seg-to-image prompt, in evaluation and in the
    instruction data alike)."""
    labels = render_segmentation(scene, size)
    palette = np.array([(0, 0, 0), *COLOURS.values()], dtype=np.uint8)
    pixels = np.where(labels[..., None] == 255, np.array(GLYPH_COLOUR, np.uint8), palette[np.minimum(labels, len(palette) - 1)])
    return Image.fromarray(pixels.astype(np.uint8))


def encode(image: Image.Image, fmt: str = "jpeg", quality: int = 95) -> bytes:
    buffer = io.BytesIO()
    if fmt == "jpeg":
        image.save(buffer, format="JPEG", quality=quality)
    else:
        image.save(buffer, format=fmt.upper())
    return buffer.getvalue()
