"""Evaluate a checkpoint on the sample world's benchmarks: the entry point of ``weft eval`` and the report asset.

:func:`evaluate_checkpoint` loads a saved model (a run folder, a ``step-*`` checkpoint or its
``model/`` folder), runs the tasks of :mod:`pipelines.evaluation.sample_world_tasks` through
``MMInterleaved.generate`` and adds, for the text-to-image outputs, the CLIP score of the generated
images against their prompts (:mod:`pipelines.evaluation.clip_similarity`) and, only when local
Inception-v3 weights are given, their FID against the prompts' ground-truth renderings.

The prompts' images (captioning, VQA, story context) are the world's own: the world is generated
again from the config the sample world was written with (the ``sample_world`` manifest's ``config``)
and checked against the eval files, so nothing is read from a global.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from pipelines.compute import Compute
from pipelines.data.clip_score import ClipScorer
from pipelines.evaluation.clip_similarity import ClipScoreResult, clip_score
from pipelines.evaluation.fid import ClipFeatures, FIDResult, InceptionFeatures, fid
from pipelines.evaluation.intervals import Estimate
from pipelines.evaluation.sample_world_tasks import BOI, TASKS, Generation, TaskResult, evaluate_task, read_split
from pipelines.evaluation.scenes import score_scene
from pipelines.sample_world import Scene, WorldConfig, generate_world, parse_image, render
from pipelines.sample_world.formats import WORLD_CONFIG_FILE

IMAGE_TASKS = ("captioning", "vqa", "story_continuation")
"""Tasks whose prompts hold the world's images (text-to-image and seg-to-image prompts are drawn from scenes)."""


SAMPLERS: dict[str, dict[str, float | int | None]] = {
    "cpu": {"guidance_scale": None, "num_inference_steps": 10},
    "demo": {"guidance_scale": None, "num_inference_steps": None},
    "paper": {"guidance_scale": 3.5, "num_inference_steps": 250},
}
"""Named sampler settings (``None``: ``MMInterleaved.generate``'s default, 7.5 / 30 DDIM steps): ``cpu``, few steps so
that a CPU evaluates every sample-world task in about a minute; ``demo``, the release's demo; ``paper``, the paper's
COCO FID settings (the paper also draws 8 samples per prompt and keeps the best by CLIP score, which is not done)."""


@dataclass(frozen=True)
class EvaluationConfig:
    """What an evaluation runs and how it samples (the same for every checkpoint it compares)."""

    tasks: tuple[str, ...] = TASKS
    """Sample-world tasks to run (:data:`pipelines.evaluation.sample_world_tasks.TASKS`)."""
    limit: int | None = None
    """Records per task (``None``: all)."""
    sampler: str = "cpu"
    """Named sampler settings (:data:`SAMPLERS`: ``cpu``, ``demo``, ``paper``) for what is not set below."""
    num_inference_steps: int | None = None
    """DDIM steps per generated image; ``None``: the sampler's."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale; ``None``: the sampler's."""
    max_new_tokens: int = 24
    """Text tokens per answer or caption."""
    seed: int = 0
    """Seeds the diffusion sampling of every task (text is decoded greedily)."""
    image_size: int = 64
    """Pixels at which generated images are parsed back into scenes."""
    inception_weights: str | None = None
    """Local torchvision Inception-v3 state dict for FID proper; ``None``: FID on the CLIP scorer's image
    features (labelled as such) when a scorer is given."""

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; expected some of {TASKS}")
        object.__setattr__(self, "tasks", tuple(self.tasks))
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {sorted(SAMPLERS)}, got {self.sampler!r}")

    def sampling(self) -> dict[str, float | int | None]:
        """``guidance_scale`` and ``num_inference_steps``: as set, else the sampler's (``None``: ``generate``'s)."""
        preset = SAMPLERS[self.sampler]
        given = {"guidance_scale": self.guidance_scale, "num_inference_steps": self.num_inference_steps}
        return {name: preset[name] if value is None else value for name, value in given.items()}


def generation_arguments(generate: Callable[..., Any], **given: Any) -> dict[str, Any]:
    """The sampling arguments of ``generate`` (``MMInterleaved.generate``) named in ``given``: the value given,
    or ``generate``'s own default where it is ``None``."""
    parameters = inspect.signature(generate).parameters
    return {name: parameters[name].default if value is None else value for name, value in given.items()}


@dataclass
class EvaluationResult:
    """Scores of one checkpoint: per task, plus CLIP score and FID of the text-to-image outputs."""

    checkpoint: str
    """The ``model/`` folder that was evaluated."""
    step: int | None
    """Training step of the checkpoint (``None`` for a model saved outside a training run)."""
    tasks: list[TaskResult]
    clip: ClipScoreResult | None = None
    fid: FIDResult | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def metrics(self) -> dict[str, dict[str, float]]:
        """``{task: {metric: value}}``, with ``clip`` and ``fid`` as extra rows when computed."""
        return {task: {metric: e.value for metric, e in metrics.items()} for task, metrics in self.estimates().items()}

    def estimates(self) -> dict[str, dict[str, Estimate]]:
        """``{task: {metric: value with its 95% bootstrap interval}}``, ``clip`` and ``fid`` included."""
        out = {t.task: t.estimates() for t in self.tasks}
        if self.clip is not None:
            out["clip_score"] = {"clip_score": self.clip.estimate()}
        if self.fid is not None:
            f = self.fid
            out["fid"] = {f.features: Estimate(f.value, f.value if f.low is None else f.low,
                                               f.value if f.high is None else f.high, f.num_generated)}
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: scores, counts and examples' texts (images are replaced by ``"<image>"``)."""
        def element(e: Any) -> Any:
            return "<image>" if isinstance(e, Image.Image) else e

        tasks = [{"task": t.task, "metrics": t.metrics, "intervals": {m: [e.low, e.high] for m, e in t.estimates().items()},
                  "count": t.count,
                  "examples": [{"prompt": [element(e) for e in ex["prompt"]], "text": ex["text"],
                                "images": len(ex["images"])} for ex in t.examples]} for t in self.tasks]
        return {"checkpoint": self.checkpoint, "step": self.step, "tasks": tasks,
                "clip": None if self.clip is None else self.clip.to_dict(),
                "fid": None if self.fid is None else {**dataclasses.asdict(self.fid), "label": self.fid.label},
                "settings": self.settings, "seconds": self.seconds}


def resolve_model_dir(checkpoint: str | Path) -> Path:
    """The ``model/`` folder of a run folder (latest checkpoint), a ``step-*`` folder, or that folder itself."""
    from model.checkpoint import model_dir

    return model_dir(checkpoint)


def checkpoint_step(model_dir: Path) -> int | None:
    """The step in the ``trainer_state.json`` beside a checkpoint's ``model/`` folder."""
    from model.checkpoint import TRAINER_STATE

    state = model_dir.parent / TRAINER_STATE
    return json.loads(state.read_text())["step"] if state.is_file() else None


def written_world_config(eval_dir: str | Path) -> dict[str, Any] | None:
    """The ``WorldConfig`` fields the sample world wrote beside its eval splits, or ``None`` if it wrote none."""
    path = Path(eval_dir) / WORLD_CONFIG_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def world_image_loader(world: WorldConfig | Mapping[str, Any], eval_dir: str | Path) -> Callable[[str], Image.Image]:
    """``image_id -> RGB image`` of the sample world generated from ``world`` (a ``WorldConfig`` or
    the ``sample_world`` manifest's ``config``), after checking that it wrote the files in ``eval_dir``."""
    if not isinstance(world, WorldConfig):
        names = {f.name for f in dataclasses.fields(WorldConfig)}
        world = WorldConfig(**{k: v for k, v in world.items() if k in names})
    generated = generate_world(world)
    written = read_split(eval_dir, "captioning")
    expected = [{"image_id": r["image_id"], "references": r["references"]} for r in generated.eval_splits["captioning"]]
    if [{"image_id": r["image_id"], "references": r["references"]} for r in written] != expected:
        raise ValueError(f"{eval_dir}/captioning.jsonl was not written by the sample world of {world}; "
                         "pass the config of the world that wrote it (the sample_world manifest's config)")
    cache: dict[str, Image.Image] = {}

    def image_for(image_id: str) -> Image.Image:
        if image_id not in cache:
            cache[image_id] = Image.open(io.BytesIO(generated.image_bytes(image_id))).convert("RGB")
        return cache[image_id]

    return image_for


class _Recorder:
    """Wraps ``generate``: counts calls on a progress bar and keeps each output's first image and prompt text."""

    def __init__(self, generate: Callable[..., Generation], bar: tqdm) -> None:
        self.generate, self.bar = generate, bar
        self.texts: list[str] = []
        self.images: list[Image.Image | None] = []

    def __call__(self, prompt: list, **kwargs: Any) -> Generation:
        output = self.generate(prompt, **kwargs)
        last = prompt[-1] if isinstance(prompt[-1], str) else ""
        self.texts.append(last.removesuffix(BOI).strip())
        self.images.append(output.images[0] if output.images else None)
        self.bar.update(1)
        return output


def _no_image(image_id: str) -> Image.Image:
    raise ValueError(f"task needs the world's image {image_id!r}: pass world= (the sample_world manifest's config)")


def load_for_evaluation(checkpoint: str | Path, compute: Compute):
    """``(model, model_dir, step)``: the model of a run folder (latest checkpoint), a ``step-*`` folder or a
    ``model/`` folder, in eval mode on ``compute.device``, and its training step (None outside a run)."""
    from model.mm_interleaved import MMInterleaved  # transformers, diffusers and open_clip: ~5 s, only when used

    model_dir = resolve_model_dir(checkpoint)
    model = MMInterleaved.from_pretrained(model_dir, map_location=compute.device).eval()
    return model, model_dir, checkpoint_step(model_dir)


def evaluate_checkpoint(
    checkpoint: str | Path,
    eval_dir: str | Path,
    config: EvaluationConfig = EvaluationConfig(),
    *,
    world: WorldConfig | Mapping[str, Any] | None = None,
    clip_scorer: ClipScorer | None = None,
    compute: Compute = Compute(),
    progress: bool = True,
) -> EvaluationResult:
    """Run ``config.tasks`` (first ``config.limit`` records each) on a checkpoint and score them.

    Args:
        checkpoint: a run folder (its latest checkpoint), a ``step-*`` folder or a ``model/`` folder.
        eval_dir: the sample world's ``eval/`` folder (``<task>.jsonl``).
        world: config of the world that wrote ``eval_dir``; needed by captioning, VQA and story continuation
            (default: the ``world.json`` the sample world wrote beside its splits).
        clip_scorer: scores text-to-image outputs against their prompts (``None``: no CLIP score). With
            ``config.inception_weights`` unset it also gives the features of the FID (labelled as such); both
            need >= 2 text-to-image outputs.
    """
    world = world if world is not None else written_world_config(eval_dir)
    if world is None and set(config.tasks) & set(IMAGE_TASKS):
        raise ValueError(f"tasks {sorted(set(config.tasks) & set(IMAGE_TASKS))} need the world's images: pass world= "
                         "(the sample_world manifest's config)")
    start = time.perf_counter()
    with compute.threads():
        model, model_dir, step = load_for_evaluation(checkpoint, compute)
        image_for = world_image_loader(world, eval_dir) if world is not None else _no_image
        sampling = generation_arguments(model.generate, **config.sampling(), max_new_tokens=config.max_new_tokens)
        settings = {**dataclasses.asdict(config), **sampling, "device": compute.device}
        results, t2i = [], None
        for task in config.tasks:
            total = len(read_split(eval_dir, task, config.limit))
            with tqdm(total=total, desc=f"eval {task}", unit="prompt", disable=not progress) as bar:
                recorder = _Recorder(model.generate, bar)
                generator = torch.Generator(device=compute.device).manual_seed(config.seed)
                results.append(evaluate_task(task, recorder, eval_dir, image_for, limit=config.limit,
                                             image_size=config.image_size, text_nats=model.text_nats,
                                             generator=generator, **sampling))
            if task == "text_to_image":
                t2i = recorder
                results.append(vae_ceiling(model, eval_dir, config))
        clip_result, fid_result = _image_scores(t2i, eval_dir, config, clip_scorer, compute)
    return EvaluationResult(str(model_dir), step, results, clip_result, fid_result, settings,
                            time.perf_counter() - start)


VAE_CEILING = "vae_ceiling"
"""The task row of :func:`vae_ceiling`."""


@torch.no_grad()
def vae_ceiling(model, eval_dir: str | Path, config: EvaluationConfig) -> TaskResult:
    """What any generator through this model's VAE can score on text-to-image: attribute accuracy of the
    prompts' ground-truth renderings passed through ``encode -> decode`` (and of the renderings themselves,
    the parser's own ceiling, as ``rendered``)."""
    records = read_split(eval_dir, "text_to_image", config.limit)
    targets = [Scene.from_dict(r["scene"]) for r in records]
    height, width = model.image_size
    scores: dict[str, list[float]] = {"attribute_accuracy": [], "rendered": []}
    for start in range(0, len(targets), 32):
        batch = targets[start:start + 32]
        rendered = [render(t, config.image_size) for t in batch]
        pixels = torch.stack([torch.from_numpy(np.asarray(r.resize((width, height), Image.BICUBIC), dtype=np.float32) / 255)
                              .permute(2, 0, 1) for r in rendered]).to(model.device)
        decoded = model.decoder.decode_latents(model.decoder.encode_images(pixels))
        for target, image, original in zip(batch, decoded, rendered):
            array = (image.permute(1, 2, 0).float().cpu().numpy() * 255).round().astype(np.uint8)
            parsed = parse_image(Image.fromarray(array).resize((config.image_size,) * 2, Image.NEAREST))
            scores["attribute_accuracy"].append(score_scene(parsed, target).accuracy)
            small = original.resize((width, height), Image.BICUBIC).resize((config.image_size,) * 2, Image.NEAREST)
            scores["rendered"].append(score_scene(parse_image(small), target).accuracy)
    return TaskResult(VAE_CEILING, scores, len(targets))


def _image_scores(t2i: _Recorder | None, eval_dir: str | Path, config: EvaluationConfig, clip_scorer: ClipScorer | None,
                  compute: Compute) -> tuple[ClipScoreResult | None, FIDResult | None]:
    """CLIP score and FID of the text-to-image outputs (None where there is no scorer or weights)."""
    if t2i is None or (clip_scorer is None and config.inception_weights is None):
        return None, None
    size = config.image_size
    references = [render(Scene.from_dict(r["scene"]), size) for r in read_split(eval_dir, "text_to_image", config.limit)]
    blank = Image.new("RGB", (size, size), "white")  # no image generated: scored as a blank one
    generated = [image if image is not None else blank for image in t2i.images]
    clip_result = clip_score(clip_scorer, generated, t2i.texts, references) if clip_scorer is not None else None
    fid_result = None
    if len(generated) >= 2:  # a covariance needs two images
        extractor = (InceptionFeatures(config.inception_weights, compute.device) if config.inception_weights is not None
                     else ClipFeatures(clip_scorer))
        fid_result = fid(_tensors(references), _tensors(generated), extractor)
    return clip_result, fid_result


def _tensors(images: Sequence[Image.Image]) -> torch.Tensor:
    """``(B, 3, H, W)`` in [0, 1], resized to the first image's size."""
    size = images[0].size
    return torch.stack([torch.from_numpy(np.asarray(i.convert("RGB").resize(size), dtype=np.float32) / 255).permute(2, 0, 1)
                        for i in images])
