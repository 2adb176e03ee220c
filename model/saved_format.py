"""Model folders written by earlier weft versions, read as the model they were written from.

:meth:`~model.mm_interleaved.MMInterleaved.save_pretrained` writes ``"format": SAVED_FORMAT`` into ``config.json``. A
folder without it was written before format 2, when the image pyramid was the simple one and the options below did not
exist yet: those models behaved as the values given here, which today's defaults (the public release's) are not.
Reading such a folder fills in the options it lacks and renames the simple pyramid's weights to their new place, so a
checkpoint keeps meaning the model that was trained.
"""

from __future__ import annotations

import re
from typing import Any

from torch import Tensor

SAVED_FORMAT = 2
"""Version of a saved model folder's ``config.json`` (2: the ViT-Adapter and the release's decoder options)."""

FORMAT_1_OPTIONS: dict[tuple[str, ...], Any] = {
    ("vision", "pyramid"): "simple",
    ("decoder", "negative_init"): "random",
    ("decoder", "mmfs_conv_in"): False,
    ("decoder", "context_positions"): "from_start",
    ("image_loss_average",): "trained_images",
}
"""Option path in the config dict -> how a format-1 model behaved."""

_FORMAT_1_PYRAMID = re.compile(r"^vision\.pyramid\.(\d+)\.")


def saved_config(data: dict[str, Any]) -> tuple[dict[str, Any], int]:
    """A saved ``config.json``'s dict as :meth:`MMInterleavedConfig.from_dict` takes it, and its format: ``"format"``
    removed, and for format 1 every option of :data:`FORMAT_1_OPTIONS` it lacks set to its old behaviour."""
    data = dict(data)
    version = int(data.pop("format", 1))
    if version > SAVED_FORMAT:
        raise ValueError(f"the model folder has format {version}; this weft reads up to {SAVED_FORMAT}: upgrade weft")
    if version == 1:
        for path, value in FORMAT_1_OPTIONS.items():
            section = data
            for key in path[:-1]:
                section = section.setdefault(key, {})
            section.setdefault(path[-1], value)
    return data, version


def saved_weights(state: dict[str, Tensor], version: int) -> dict[str, Tensor]:
    """A saved state dict under today's names: format 1's ``vision.pyramid.N.*`` are ``vision.pyramid.levels.N.*``."""
    if version >= 2:
        return state
    return {_FORMAT_1_PYRAMID.sub(r"vision.pyramid.levels.\1.", key): value for key, value in state.items()}
