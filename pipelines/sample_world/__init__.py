"""The sample world: a seeded corpus of scenes, captions, stories and eval splits (see world.py)."""

from pipelines.sample_world.formats import write_metadata
from pipelines.sample_world.parse import parse_image
from pipelines.sample_world.scenes import Glyph, Scene, Shape, render, render_segmentation
from pipelines.sample_world.world import SampleWorld, WorldConfig, caption, generate_world

__all__ = [
    "Glyph", "SampleWorld", "Scene", "Shape", "WorldConfig", "caption", "generate_world", "parse_image", "render",
    "render_segmentation", "write_metadata",
]
