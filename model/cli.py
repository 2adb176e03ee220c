"""``weft``: train, generate and evaluate outside Dagster, on the same code paths as the assets.

::

    weft train --config train.json [--set max_steps=200 --set run_dir=runs/a]
    weft generate --checkpoint runs/a --image cat.png --prompt "a cat. next," --out out/ [--max-new-images 1]
    weft eval --checkpoint runs/a --eval-dir data/raw/sample_world/eval --out reports/a [--limit 16]

``--checkpoint`` is a run folder (its latest checkpoint), a ``step-*`` checkpoint or a ``model/``
folder. ``generate`` keeps ``--prompt`` and ``--image`` in command-line order as one interleaved
prompt and writes ``generation.md``, ``generation.json`` and ``image-XX.png`` into ``--out``
(built in a temporary folder and renamed into place, so ``--out`` is complete or absent).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("weft")


class _PromptElement(argparse.Action):
    """Appends ``("text", value)`` or ``("image", value)`` to one shared, ordered list."""

    def __call__(self, parser, namespace, value, option_string=None):
        elements = getattr(namespace, "elements", None) or []
        elements.append(("image" if option_string == "--image" else "text", value))
        namespace.elements = elements


def _parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with ``value`` read as JSON when it parses (numbers, lists, true/false), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--set expects key=value, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _train(args: argparse.Namespace) -> int:
    from model.train import TrainConfig, train

    try:
        config = TrainConfig.from_json(args.config, dict(args.set or []))
    except ValueError as error:
        raise SystemExit(str(error)) from None
    result = train(config)
    print(f"step {result.step}; checkpoint {result.checkpoint}")
    return 0


def _load_model(checkpoint: str, device: str):
    from model.checkpoint import model_dir
    from model.mm_interleaved import MMInterleaved

    return MMInterleaved.from_pretrained(model_dir(checkpoint), map_location=device).eval()


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


def _write_generation(out: Path, elements: Sequence[tuple[str, str]], output) -> Path:
    """The prompt and the generated continuation as markdown + JSON + PNGs, renamed into ``out`` at once."""
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generated: list[dict[str, str]] = []
    for element in output.elements:
        if isinstance(element, str):
            generated.append({"type": "text", "text": element})
        else:
            name = f"image-{sum(e['type'] == 'image' for e in generated):02d}.png"
            element.save(tmp / name)
            generated.append({"type": "image", "path": name})
    prompt = [{"type": kind, ("text" if kind == "text" else "path"): value} for kind, value in elements]
    (tmp / "generation.json").write_text(json.dumps({"prompt": prompt, "generated": generated}, indent=1))
    lines = ["# weft generate", "", "## Prompt", ""]
    lines += [e["text"] if e["type"] == "text" else f"`{e['path']}`" for e in prompt]
    lines += ["", "## Generated", ""]
    lines += [e["text"] if e["type"] == "text" else f"![{e['path']}]({e['path']})" for e in generated]
    (tmp / "generation.md").write_text("\n\n".join(lines) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    return out


def _generate(args: argparse.Namespace) -> int:
    import torch

    elements = args.elements or []
    if not elements:
        raise SystemExit("give the prompt with --prompt and/or --image (in order)")
    _refuse_to_clobber(Path(args.out), args.overwrite)  # before minutes of generation, not after
    model = _load_model(args.checkpoint, args.device)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    with torch.no_grad():
        output = model.generate(
            _prompt(elements), max_new_tokens=args.max_new_tokens, max_new_images=args.max_new_images,
            guidance_scale=args.guidance_scale, num_inference_steps=args.steps, generator=generator,
        )
    out = _write_generation(Path(args.out), elements, output)
    images = sum(not isinstance(e, str) for e in output.elements)
    print(f"{out}/generation.md: {len(output.text.split())} words, {images} image(s)")
    print(output.text)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pipelines.evaluation.report import git_commit, write_report
    from pipelines.evaluation.run import evaluate_checkpoint

    given = {"tasks": args.tasks, "num_inference_steps": args.steps, "guidance_scale": args.guidance_scale,
             "inception_weights": args.inception_weights}
    options = {k: v for k, v in given.items() if v is not None}  # the rest: evaluate_checkpoint's defaults
    if args.clip_scorer:
        from pipelines.clip_score import ClipScorer

        options["clip_scorer"] = ClipScorer.load(args.clip_scorer, device=args.device)
    result = evaluate_checkpoint(args.checkpoint, args.eval_dir, limit=args.limit, seed=args.seed, device=args.device,
                                 **options)
    lineage = {"checkpoint": result.checkpoint, "step": result.step, "eval split": args.eval_dir,
               "git commit": git_commit()}
    report = write_report(args.out, {f"step {result.step}": result}, lineage=lineage,
                          title=f"MM-Interleaved evaluation: {args.checkpoint}")
    for task, metrics in result.metrics().items():
        print(task, json.dumps(metrics, sort_keys=True))
    print(f"report: {report / 'report.md'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="weft", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train from packed shards (model.train; run under torchrun for several ranks)")
    train.add_argument("--config", required=True, help="JSON file with the fields of model.train.TrainConfig")
    train.add_argument("--set", action="append", type=_parse_override, metavar="KEY=VALUE",
                       help="override one config field (value parsed as JSON when possible); repeatable")
    train.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher's
    train.set_defaults(run=_train)

    generate = commands.add_parser("generate", help="continue an interleaved prompt with text and images")
    generate.add_argument("--checkpoint", required=True, help="run folder, step-* checkpoint or model/ folder")
    generate.add_argument("--prompt", action=_PromptElement, dest="elements", help="a text element; repeatable")
    generate.add_argument("--image", action=_PromptElement, dest="elements", help="an image file; repeatable")
    generate.add_argument("--out", required=True, help="output folder")
    generate.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--max-new-images", type=int, default=1)
    generate.add_argument("--steps", type=int, default=30, help="diffusion inference steps per image")
    generate.add_argument("--guidance-scale", type=float, default=3.5)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--device", default="cpu")
    generate.set_defaults(run=_generate)

    evaluate = commands.add_parser("eval", help="run the sample-world benchmarks on a checkpoint and write a report")
    evaluate.add_argument("--checkpoint", required=True, help="run folder, step-* checkpoint or model/ folder")
    evaluate.add_argument("--eval-dir", required=True, help="folder with the <task>.jsonl splits (the sample world's eval/)")
    evaluate.add_argument("--out", required=True, help="report folder")
    evaluate.add_argument("--tasks", nargs="+", default=None, help="subset of the tasks (default: all)")
    evaluate.add_argument("--limit", type=int, default=None, help="items per task")
    evaluate.add_argument("--steps", type=int, default=None, help="diffusion inference steps per image (default 10)")
    evaluate.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance (default 7.5)")
    evaluate.add_argument("--clip-scorer", default=None,
                          help="a saved CLIP scorer folder (e.g. data/clip_scorer): CLIP score and CLIP-feature FID")
    evaluate.add_argument("--inception-weights", default=None, help="torchvision Inception-v3 state dict: FID proper")
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.add_argument("--device", default="cpu")
    evaluate.set_defaults(run=_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
