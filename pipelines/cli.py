"""``weft``: train, generate and evaluate outside Dagster, on the same stage functions as the assets.

::

    weft train --config train.json [--set max_steps=200 --set run_dir=runs/a]
    weft generate --checkpoint runs/a --image cat.png --prompt "a cat. next," --out out/ [--max-new-images 1]
    weft eval --checkpoint runs/a --eval-dir data/raw/eval --out reports/a [--limit 16]
    weft eval --checkpoint runs/a --benchmark coco --annotations dataset_coco.json --images coco/ --out reports/coco

``--checkpoint`` is a run folder (its latest checkpoint), a ``step-*`` checkpoint or a ``model/``
folder. ``generate`` keeps ``--prompt`` and ``--image`` in command-line order as one interleaved
prompt and writes ``generation.md``, ``generation.json`` (prompt, output and the sampling settings used)
and ``image-XX.png`` into ``--out`` (written atomically, so ``--out`` is complete or absent). Sampling
options left out take ``MMInterleaved.generate``'s defaults; evaluation options left out take
:class:`pipelines.evaluation.run.EvaluationConfig`'s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipelines.compute import Compute, offline_process
from pipelines.evaluation.benchmarks import BENCHMARKS, BenchmarkFiles
from pipelines.evaluation.run import SAMPLERS, EvaluationConfig, generation_arguments
from pipelines.files import atomic_path
from pipelines.training import train as training

GENERATION_OPTIONS = {"max_new_tokens": "max_new_tokens", "max_new_images": "max_new_images",
                      "guidance_scale": "guidance_scale", "steps": "num_inference_steps"}
"""``weft generate`` option (argparse dest) -> ``MMInterleaved.generate`` argument."""


class _PromptElement(argparse.Action):
    """Appends ``("text", value)`` or ``("image", value)`` to one shared, ordered list."""

    def __call__(self, parser, namespace, value, option_string=None):
        elements = getattr(namespace, "elements", None) or []
        elements.append(("image" if option_string == "--image" else "text", value))
        namespace.elements = elements


def _model_dir(checkpoint: str) -> Path:
    """The ``model/`` folder ``--checkpoint`` names, or exit naming what it is not (before any model loads)."""
    from model.checkpoint import model_dir

    try:
        return model_dir(checkpoint)
    except FileNotFoundError as error:
        raise SystemExit(f"--checkpoint {error}") from None


def _load_model(checkpoint: str, device: str):
    from model.mm_interleaved import MMInterleaved

    return MMInterleaved.from_pretrained(_model_dir(checkpoint), map_location=device).eval()


def _check_eval_dir(eval_dir: str) -> None:
    """``--eval-dir`` must be a sample world's ``eval/`` folder: its splits and the world that wrote them."""
    from pipelines.sample_world.formats import WORLD_CONFIG_FILE

    folder = Path(eval_dir)
    if not folder.is_dir():
        raise SystemExit(f"--eval-dir {eval_dir}: no such folder (the sample world writes it as <data root>/raw/eval)")
    if not (folder / WORLD_CONFIG_FILE).is_file() or not any(folder.glob("*.jsonl")):
        raise SystemExit(f"--eval-dir {eval_dir}: not a sample world eval folder (it needs {WORLD_CONFIG_FILE} and "
                         "<task>.jsonl splits, as the sample_world asset writes under <data root>/raw/eval)")


def _prompt(elements: Sequence[tuple[str, str]]) -> list:
    from PIL import Image

    prompt: list = []
    for kind, value in elements:
        if kind == "text":
            prompt.append(value)
            continue
        try:
            with Image.open(value) as image:
                prompt.append(image.convert("RGB"))
        except (OSError, ValueError) as error:
            raise SystemExit(f"--image {value}: cannot read it as an image ({error})") from None
    return prompt


def _refuse_to_clobber(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SystemExit(f"{out} exists and is not empty (pass --overwrite to replace it)")


def _write_generation(out: Path, elements: Sequence[tuple[str, str]], output, settings: dict[str, Any]) -> Path:
    """The prompt, the generated continuation and the settings as markdown + JSON + PNGs, written atomically."""
    with atomic_path(out) as tmp:
        tmp.mkdir()
        generated: list[dict[str, str]] = []
        for element in output.elements:
            if isinstance(element, str):
                generated.append({"type": "text", "text": element})
            else:
                name = f"image-{sum(e['type'] == 'image' for e in generated):02d}.png"
                element.save(tmp / name)
                generated.append({"type": "image", "path": name})
        prompt = [{"type": kind, ("text" if kind == "text" else "path"): value} for kind, value in elements]
        (tmp / "generation.json").write_text(json.dumps({"prompt": prompt, "generated": generated,
                                                         "settings": settings}, indent=1))
        lines = ["# weft generate", "", "## Prompt", ""]
        lines += [e["text"] if e["type"] == "text" else f"`{e['path']}`" for e in prompt]
        lines += ["", "## Generated", ""]
        lines += [e["text"] if e["type"] == "text" else f"![{e['path']}]({e['path']})" for e in generated]
        (tmp / "generation.md").write_text("\n\n".join(lines) + "\n")
    return out


def _generate(args: argparse.Namespace) -> int:
    import torch

    elements = args.elements or []
    if not elements:
        raise SystemExit("give the prompt with --prompt and/or --image (in order)")
    _refuse_to_clobber(Path(args.out), args.overwrite)  # before minutes of generation, not after
    model = _load_model(args.checkpoint, args.device)
    settings = {**generation_arguments(model.generate, **{GENERATION_OPTIONS[dest]: getattr(args, dest)
                                                         for dest in GENERATION_OPTIONS}), "seed": args.seed}
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    with torch.no_grad():
        output = model.generate(_prompt(elements), generator=generator,
                                **{k: v for k, v in settings.items() if k != "seed"})
    out = _write_generation(Path(args.out), elements, output, settings)
    images = sum(not isinstance(e, str) for e in output.elements)
    print(f"{out}/generation.md: {len(output.text.split())} words, {images} image(s)")
    print(output.text)
    return 0


def evaluation_config(args: argparse.Namespace) -> EvaluationConfig:
    """:class:`EvaluationConfig` with the options given on the command line (the rest: its defaults)."""
    given = {"tasks": tuple(args.tasks) if args.tasks else None, "limit": args.limit, "sampler": args.sampler,
             "num_inference_steps": args.steps,
             "guidance_scale": args.guidance_scale, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
             "inception_weights": args.inception_weights}
    try:
        return EvaluationConfig(**{k: v for k, v in given.items() if v is not None})
    except ValueError as error:
        raise SystemExit(f"weft eval: {error}") from None


def _benchmark_files(args: argparse.Namespace) -> BenchmarkFiles:
    if args.annotations is None or args.images is None:
        raise SystemExit(f"--benchmark {args.benchmark} needs --annotations and --images")
    given = {"questions": args.questions, "split": args.split, "image_pattern": args.image_pattern}
    try:
        return BenchmarkFiles(args.benchmark, Path(args.annotations), Path(args.images),
                              **{k: v for k, v in given.items() if v is not None})
    except (ValueError, FileNotFoundError) as error:
        raise SystemExit(str(error)) from None


def _eval(args: argparse.Namespace) -> int:
    from pipelines.evaluation.benchmarks import evaluate_benchmark
    from pipelines.evaluation.report import write_report
    from pipelines.evaluation.run import evaluate_checkpoint
    from pipelines.lineage import git_commit

    if (args.eval_dir is None) == (args.benchmark is None):
        raise SystemExit("give either --eval-dir (the sample world's benchmarks) or --benchmark")
    _model_dir(args.checkpoint)
    if args.eval_dir is not None:
        _check_eval_dir(args.eval_dir)
    config, compute = evaluation_config(args), Compute(device=args.device)
    if args.benchmark is not None:
        files = _benchmark_files(args)
        result = evaluate_benchmark(args.checkpoint, files, config, compute)
        source = {"benchmark": args.benchmark, "annotations": str(files.annotations), "images": str(files.images)}
    else:
        scorer = None
        if args.clip_scorer:
            from pipelines.data.clip_score import ClipScorer

            scorer = ClipScorer.load(args.clip_scorer, device=args.device)
        result = evaluate_checkpoint(args.checkpoint, args.eval_dir, config, clip_scorer=scorer, compute=compute)
        source = {"eval split": args.eval_dir}
    lineage = {"checkpoint": result.checkpoint, "step": result.step, **source, "git commit": git_commit()}
    report = write_report(args.out, {f"step {result.step}": result}, lineage=lineage,
                          title=f"MM-Interleaved evaluation: {args.checkpoint}")
    for task, metrics in result.metrics().items():
        print(task, json.dumps(metrics, sort_keys=True))
    print(f"report: {report / 'report.md'}")
    return 0


def _default(cls, name: str) -> Any:
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weft", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    training.add_arguments(commands.add_parser(
        "train", help="train from packed shards (pipelines.training.train; run under torchrun for several ranks)"))

    generate = commands.add_parser("generate", help="continue an interleaved prompt with text and images")
    generate.add_argument("--checkpoint", required=True, help="run folder, step-* checkpoint or model/ folder")
    generate.add_argument("--prompt", action=_PromptElement, dest="elements", help="a text element; repeatable")
    generate.add_argument("--image", action=_PromptElement, dest="elements", help="an image file; repeatable")
    generate.add_argument("--out", required=True, help="output folder")
    generate.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    model_default = " (default: MMInterleaved.generate's)"
    generate.add_argument("--max-new-tokens", type=int, default=None, help="text tokens at most" + model_default)
    generate.add_argument("--max-new-images", type=int, default=None, help="images at most" + model_default)
    generate.add_argument("--steps", type=int, default=None, help="diffusion inference steps per image" + model_default)
    generate.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance" + model_default)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--device", default="cpu")
    generate.set_defaults(run=_generate)

    defaults = EvaluationConfig()
    evaluate = commands.add_parser("eval", help="run the sample world's benchmarks, or a real one, on a checkpoint "
                                                "and write a report")
    evaluate.add_argument("--checkpoint", required=True, help="run folder, step-* checkpoint or model/ folder")
    evaluate.add_argument("--out", required=True, help="report folder")
    evaluate.add_argument("--eval-dir", default=None, help="the sample world's eval/ folder (<task>.jsonl splits)")
    evaluate.add_argument("--tasks", nargs="+", default=None, help="subset of the sample world's tasks (default: all)")
    evaluate.add_argument("--clip-scorer", default=None,
                          help="a saved CLIP scorer folder (e.g. data/clip_scorer/<version>): CLIP score and CLIP-feature FID")
    evaluate.add_argument("--inception-weights", default=None, help="torchvision Inception-v3 state dict: FID proper")
    evaluate.add_argument("--benchmark", choices=BENCHMARKS, default=None, help="a real benchmark on local disk")
    evaluate.add_argument("--annotations", default=None, help="coco: dataset_coco.json (Karpathy split); vqav2, okvqa: "
                                                              "the annotations file; textvqa: TextVQA_0.5.1_val.json")
    evaluate.add_argument("--questions", default=None, help="vqav2, okvqa: the questions file")
    evaluate.add_argument("--images", default=None, help="the benchmark's image folder (coco: the one holding each "
                                                         "image's filepath, e.g. val2014/)")
    evaluate.add_argument("--split", default=None,
                          help=f"coco: Karpathy split (default {_default(BenchmarkFiles, 'split')})")
    evaluate.add_argument("--image-pattern", default=None, help="vqav2, okvqa: image file name pattern (default "
                                                                f"{_default(BenchmarkFiles, 'image_pattern')})")
    evaluate.add_argument("--limit", type=int, default=None, help=f"items per task (default {defaults.limit}: all)")
    evaluate.add_argument("--sampler", choices=sorted(SAMPLERS), default=None,
                          help=f"named guidance scale and steps: {SAMPLERS} (None: MMInterleaved.generate's default; "
                               f"default {defaults.sampler})")
    evaluate.add_argument("--steps", type=int, default=None, help="diffusion inference steps per image (default: the sampler's)")
    evaluate.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default: the sampler's)")
    evaluate.add_argument("--max-new-tokens", type=int, default=None,
                          help=f"text tokens per answer (default {defaults.max_new_tokens})")
    evaluate.add_argument("--seed", type=int, default=None, help=f"diffusion sampling seed (default {defaults.seed})")
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(run=_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    offline_process()
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
