"""The sample world: a seeded, fully known corpus of pairs, stories and evaluation splits.

Everything derives from ``WorldConfig.seed``; each item draws from its own RNG stream
(``random.Random(f"{seed}:{kind}:{index}")``), so changing one count never changes other items.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from pipelines.sample_world.scenes import (
    COLOURS,
    Scene,
    encode,
    free_cells,
    move,
    random_scene,
    recolour,
    render,
)


@dataclass(frozen=True)
class WorldConfig:
    """Size and shape of a sample world."""

    seed: int = 0
    image_size: int = 64
    """Side of every rendered image in pixels (>= 48)."""
    n_pairs: int = 200
    """Image-text pairs; split between the LAION parquet and the CC-12M tsv."""
    n_stories: int = 30
    """Multi-image stories, written as MMC4 documents."""
    min_story_images: int = 2
    max_story_images: int = 6
    mismatch_rate: float = 0.1
    """Fraction of pairs (and of story images) whose text belongs to another scene."""
    alt_text_rate: float = 0.7
    """Fraction of pairs whose text is a noisy web alt-text rather than the true caption."""
    n_eval: int = 40
    """Items per evaluation split."""

    def __post_init__(self) -> None:
        if self.image_size < 48:
            raise ValueError(f"image_size must be >= 48, got {self.image_size}")
        if not 2 <= self.min_story_images <= self.max_story_images <= 6:
            raise ValueError("story images must satisfy 2 <= min_story_images <= max_story_images <= 6")
        for name in ("mismatch_rate", "alt_text_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")


def caption(scene: Scene) -> str:
    """The true caption: every object with colour, size and position, and the digit."""
    parts = [f"{o.describe()} {'in the' if o.position == 'center' else 'at the'} {o.position}" for o in scene.objects]
    text = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    if scene.glyph is not None:
        text += f", with the digit {scene.glyph.digit} at the {scene.glyph.position}"
    return text[0].upper() + text[1:] + "."


_ALT_TEMPLATES = (
    "IMG_{n}.jpg",
    "{colour} {shape} stock photo",
    "free {shape} clipart download | best {colour} shapes {year}",
    "{colour} {shape}s - Shop now and save!!",
    "abstract {shape} background wallpaper hd",
    "DSC{n} {shape}",
    "click here for more {colour} designs",
)


def alt_text(scene: Scene, rng: random.Random) -> str:
    """A web-style alt-text: partly true at best, with typos (the recaptioning stage's input)."""
    obj = rng.choice(scene.objects)
    text = rng.choice(_ALT_TEMPLATES).format(
        n=rng.randint(1000, 9999), colour=obj.colour, shape=obj.shape, year=rng.randint(2009, 2023)
    )
    if rng.random() < 0.3 and len(text) > 4:
        i = rng.randrange(len(text) - 1)
        text = text[:i] + text[i + 1] + text[i] + text[i + 2 :]
    return text


def _sim(rng: random.Random, matched: bool) -> float:
    """A plausible CLIP ViT-L/14 similarity: matched texts above MMC4's 0.24, mismatched below."""
    return round(rng.uniform(0.26, 0.36) if matched else rng.uniform(0.08, 0.2), 4)


@dataclass
class Pair:
    image_id: str
    scene: Scene
    caption: str
    """True caption of the image."""
    text: str
    """The text written into the metadata (caption, alt-text or another scene's caption)."""
    text_kind: str
    """``caption`` | ``alt_text`` | ``mismatched``."""
    similarity: float

    @property
    def mismatched(self) -> bool:
        return self.text_kind == "mismatched"


@dataclass
class StoryImage:
    image_id: str
    scene: Scene
    matched_text_index: int
    matched_sim: float
    mismatched: bool


@dataclass
class Story:
    story_id: str
    sentences: list[str]
    images: list[StoryImage]
    frames: list[Scene]
    """The story's own scenes in order (a mismatched image is not one of them)."""


def _story(rng: random.Random, story_id: str, n_images: int, mismatch_rate: float) -> Story:
    scene = random_scene(rng, f"{story_id}-0", min_objects=1, max_objects=3)
    frames = [scene]
    sentences = [caption(scene)]
    for step in range(1, n_images):
        index = rng.randrange(len(scene.objects))
        obj = scene.objects[index]
        cells = free_cells(scene)
        if cells and rng.random() < 0.6:
            row, col = rng.choice(cells)
            scene = move(scene, index, row, col, f"{story_id}-{step}")
            new = next(o for o in scene.objects if (o.row, o.col) == (row, col))
            sentence = f"Then the {obj.colour} {obj.shape} moves to the {new.position}."
        else:
            colour = rng.choice([c for c in COLOURS if c != obj.colour])
            scene = recolour(scene, index, colour, f"{story_id}-{step}")
            sentence = f"Then the {obj.colour} {obj.shape} turns {colour}."
        frames.append(scene)
        sentences.append(sentence)
    images = []
    for i, frame in enumerate(frames):
        mismatched = i > 0 and rng.random() < mismatch_rate
        shown = random_scene(rng, f"{story_id}-x{i}") if mismatched else frame
        images.append(StoryImage(f"{story_id}-{i}", shown, i, _sim(rng, not mismatched), mismatched))
    sentences.append(rng.choice(["The end.", "That is all for today.", "Thanks for reading!"]))
    return Story(story_id, sentences, images, frames)


@dataclass
class SampleWorld:
    config: WorldConfig
    pairs: list[Pair] = field(default_factory=list)
    stories: list[Story] = field(default_factory=list)
    eval_splits: dict[str, list[dict]] = field(default_factory=dict)
    eval_scenes: dict[str, Scene] = field(default_factory=dict)

    def scenes(self) -> dict[str, Scene]:
        """Every image the server serves (training pairs and story images), by image id."""
        out = {p.image_id: p.scene for p in self.pairs}
        for story in self.stories:
            out.update({image.image_id: image.scene for image in story.images})
        return out

    def image_bytes(self, image_id: str) -> bytes:
        scenes = self.scenes()
        scenes.update(self.eval_scenes)
        return encode(render(scenes[image_id], self.config.image_size), "jpeg")

    def routes(self) -> dict[str, bytes]:
        """``/images/<id>.jpg`` → JPEG bytes, for :class:`pipelines.sample_world.image_server.ImageServer`."""
        return {image_path(i): encode(render(s, self.config.image_size), "jpeg") for i, s in self.scenes().items()}


def image_path(image_id: str) -> str:
    return f"/images/{image_id}.jpg"


def generate_world(config: WorldConfig = WorldConfig()) -> SampleWorld:
    seed = config.seed
    world = SampleWorld(config)
    for i in range(config.n_pairs):
        rng = random.Random(f"{seed}:pair:{i}")
        scene = random_scene(rng, f"p{i:06d}")
        true = caption(scene)
        draw = rng.random()
        if draw < config.mismatch_rate:
            other = random_scene(rng, "other", min_objects=1, max_objects=3)
            while {(o.colour, o.shape) for o in other.objects} & {(o.colour, o.shape) for o in scene.objects}:
                other = random_scene(rng, "other", min_objects=1, max_objects=3)
            text, kind = caption(other), "mismatched"
        elif draw < config.mismatch_rate + (1 - config.mismatch_rate) * config.alt_text_rate:
            text, kind = alt_text(scene, rng), "alt_text"
        else:
            text, kind = true, "caption"
        world.pairs.append(Pair(scene.scene_id, scene, true, text, kind, _sim(rng, kind != "mismatched")))
    for i in range(config.n_stories):
        rng = random.Random(f"{seed}:story:{i}")
        n_images = rng.randint(config.min_story_images, config.max_story_images)
        world.stories.append(_story(rng, f"s{i:05d}", n_images, config.mismatch_rate))
    _eval_splits(world)
    return world


def scene_questions(scene: Scene) -> list[dict]:
    """The questions the world can answer exactly about ``scene``: ``{"question", "answer", "type"}`` each, ``type``
    one of count, colour, position, size, digit (the VQA split asks them; so does the instruction data)."""
    questions = [{"question": "How many shapes are there?", "answer": str(len(scene.objects)), "type": "count"}]
    for obj in scene.objects:
        if sum(o.shape == obj.shape for o in scene.objects) == 1:
            questions.append({"question": f"What colour is the {obj.shape}?", "answer": obj.colour, "type": "colour"})
        if sum((o.shape, o.colour) == (obj.shape, obj.colour) for o in scene.objects) == 1:
            questions.append({"question": f"Where is the {obj.colour} {obj.shape}?", "answer": obj.position,
                              "type": "position"})
            questions.append({"question": f"Is the {obj.colour} {obj.shape} large or small?", "answer": obj.size,
                              "type": "size"})
    if scene.glyph is not None:
        questions.append({"question": "Which digit is written in the image?", "answer": str(scene.glyph.digit),
                          "type": "digit"})
        questions.append({"question": f"Which digit is written at the {scene.glyph.position}?",
                          "answer": str(scene.glyph.digit), "type": "digit"})
    return questions


def _eval_splits(world: SampleWorld) -> None:
    """Held-out splits: their scenes come from separate RNG streams and never appear in metadata."""
    seed, n = world.config.seed, world.config.n_eval
    splits: dict[str, list[dict]] = {name: [] for name in ("captioning", "vqa", "text_to_image", "seg_to_image",
                                                            "story_continuation")}
    for i in range(n):
        rng = random.Random(f"{seed}:eval:{i}")
        scene = random_scene(rng, f"e{i:05d}", glyph_probability=0.7)
        world.eval_scenes[scene.scene_id] = scene
        splits["captioning"].append({"image_id": scene.scene_id, "references": [caption(scene)],
                                     "scene": scene.to_dict()})
        for q in scene_questions(scene):
            splits["vqa"].append({"image_id": scene.scene_id, **q})
        prompt_scene = random_scene(rng, f"t{i:05d}", glyph_probability=0.0)
        splits["text_to_image"].append({"prompt": caption(prompt_scene), "scene": prompt_scene.to_dict()})
        seg_scene = random_scene(rng, f"g{i:05d}", glyph_probability=0.0)
        world.eval_scenes[seg_scene.scene_id] = seg_scene
        splits["seg_to_image"].append({"image_id": seg_scene.scene_id, "scene": seg_scene.to_dict()})
        story = _story(rng, f"es{i:05d}", rng.randint(3, 6), mismatch_rate=0.0)
        for image in story.images:
            world.eval_scenes[image.image_id] = image.scene
        splits["story_continuation"].append(story_continuation_record(story))
    world.eval_splits = splits


def story_continuation_record(story: Story) -> dict:
    """The story benchmark's item of ``story``: its frames but the last, each with its sentence, then the last frame's
    sentence, image id and scene (the target)."""
    last = len(story.images) - 1
    return {
        "story_id": story.story_id,
        "context": [{"image_id": im.image_id, "sentence": story.sentences[k]} for k, im in enumerate(story.images[:last])],
        "next_sentence": story.sentences[last],
        "next_image_id": story.images[last].image_id,
        "next_scene": story.frames[last].to_dict(),
    }
