"""Models the platform trains for itself (the sample world's scorer and captioner), made once per version.

Every run of the main job materializes them; training them again each time costs minutes and gives the same
weights. :func:`cached_model` names a model's folder by the version of what it is trained from (the source
dataclass: world, training settings, sizes) and writes the stage's manifest there last, so a folder with a manifest
is a finished model: a later run (or a second ``make demo``) reads the manifest back instead of training. A build
that is killed leaves no manifest, and the next run trains again.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pipelines.files import fingerprint, write_json

MANIFEST = "manifest.json"
Manifest = TypeVar("Manifest")


def cached_model(out_dir: Path, source: Any, build: Callable[[Path], Manifest],
                 restore: Callable[[dict[str, Any], Path], Manifest]) -> Manifest:
    """``build(folder)``'s manifest, built once per ``source`` (a dataclass): ``folder`` is
    ``out_dir/<fingerprint of source>``; a folder that holds a manifest gives ``restore(saved fields, folder)``."""
    folder = Path(out_dir) / fingerprint(dataclasses.asdict(source))
    saved = folder / MANIFEST
    if saved.is_file():
        return restore(json.loads(saved.read_text()), folder)
    manifest = build(folder)
    write_json(saved, dataclasses.asdict(manifest))  # last: the folder now holds a finished model
    return manifest
