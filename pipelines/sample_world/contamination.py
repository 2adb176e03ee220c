"""The sample world's evaluation splits as decontamination checks training data against them."""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.data.decontamination import EvaluationSplits
from pipelines.sample_world.scenes import Scene, encode, render
from pipelines.sample_world.world import WorldConfig, generate_world


@dataclass(frozen=True)
class WorldEvaluationSplits:
    """The held-out splits of the world ``world`` generates (the ones its evaluation report scores): every image a
    prompt shows or a task asks for (captioning and VQA images, text-to-image and segmentation-to-image targets,
    story frames) and every text (reference captions, questions, text-to-image prompts, story sentences)."""

    world: WorldConfig

    def build(self) -> EvaluationSplits:
        world = generate_world(self.world)
        size = self.world.image_size
        splits = world.eval_splits
        images: list[tuple[str, str, bytes]] = []
        texts: list[tuple[str, str, str]] = []
        for item in splits["captioning"]:
            images.append(("captioning", item["image_id"], world.image_bytes(item["image_id"])))
            texts += [("captioning", item["image_id"], reference) for reference in item["references"]]
        for item in splits["vqa"]:
            texts.append(("vqa", item["image_id"], item["question"]))
        for i, item in enumerate(splits["text_to_image"]):
            target = Scene.from_dict(item["scene"])
            images.append(("text_to_image", target.scene_id, encode(render(target, size), "jpeg")))
            texts.append(("text_to_image", f"prompt {i}", item["prompt"]))
        for item in splits["seg_to_image"]:
            images.append(("seg_to_image", item["image_id"], world.image_bytes(item["image_id"])))
        for item in splits["story_continuation"]:
            frames = [c["image_id"] for c in item["context"]] + [item["next_image_id"]]
            images += [("story_continuation", frame, world.image_bytes(frame)) for frame in frames]
            texts += [("story_continuation", item["story_id"], c["sentence"]) for c in item["context"]]
            texts.append(("story_continuation", item["story_id"], item["next_sentence"]))
        return EvaluationSplits.build(f"sample world (seed {self.world.seed}, {self.world.n_eval} items a split)",
                                      images, texts)
