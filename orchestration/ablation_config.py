"""``python -m orchestration.ablation_config PRESET [OVERRIDES ...] [--many-image-tokens N]``: the MMFS ablation's
run config on a main-job preset's recipe, printed as YAML.

Every variant of the ablation (``mmfs_ablation``) is packed, trained, fine-tuned and evaluated with the preset's
settings for the same stages (``packed_sequences`` -> ``ablation_sequences``, ``checkpoint`` ->
``ablation_checkpoints``, ...), so that its variant with MMFS is the preset's own model and the recipe's values
exist once, in the preset; ``OVERRIDES`` (ablation run-config files, later ones winning) set what the ablation does
differently. ``make ablation`` runs it on ``sample_world.yaml`` with ``presets/ablation.yaml``'s overrides, ``make
quality-ablation`` on ``sample_world_quality.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml

from orchestration.check_config import load_run_config, update_run_config

STAGES = {"packed_sequences": "ablation_sequences", "checkpoint": "ablation_checkpoints",
          "instruction_sequences": "ablation_instruction_sequences",
          "finetuned_checkpoint": "ablation_finetuned_checkpoints", "evaluation_report": "mmfs_ablation_report"}
"""The main job's op -> the ablation's op configured alike."""


def ablation_run_config(preset: dict[str, Any], many_image_tokens: int | None = None) -> dict[str, Any]:
    """The ablation's run config from a main-job run config ``preset``: its stages' config under the ablation's ops
    (``checkpoint``'s ``mmfs`` dropped: each variant sets it), ``many_image_tokens`` for the many-tokens variant
    (None: the ablation's default), and the preset's ``execution``."""
    ops = preset.get("ops", {})
    config: dict[str, Any] = {"ops": {}}
    for main, ablation in STAGES.items():
        stage = dict(ops.get(main, {}).get("config", {}))
        if main == "checkpoint":
            stage.pop("mmfs", None)
        if main == "packed_sequences" and many_image_tokens is not None:
            stage["many_image_tokens"] = many_image_tokens
        config["ops"][ablation] = {"config": stage}
    if "execution" in preset:
        config["execution"] = preset["execution"]
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("preset", help="a main-job run config (e.g. orchestration/presets/sample_world_quality.yaml)")
    parser.add_argument("overrides", nargs="*", help="ablation run-config files applied on top, key by key")
    parser.add_argument("--many-image-tokens", type=int, default=None,
                        help="visual tokens per image of the variant without MMFS that sees more of them")
    args = parser.parse_args(argv)
    try:
        preset, overrides = load_run_config([args.preset]), load_run_config(args.overrides)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    config = ablation_run_config(preset, args.many_image_tokens)
    update_run_config(config, overrides)
    yaml.safe_dump(config, sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
