"""The IO manager for small metadata: each asset returns a JSON manifest (paths, counts, settings).

Large data is written by the stage itself under the storage root; what passes between assets is the
manifest that says where it is. Partitioned assets return ``{partition_key: manifest}`` (one entry
per partition of the run, so single-run backfills over many partitions work) and get the same shape
back as input: ``{partition_key: manifest}`` for every upstream partition of the step.
"""

import json
import os
from pathlib import Path
from typing import Any

import dagster as dg

from orchestration.resources import Storage


class ManifestIOManager(dg.ConfigurableIOManager):
    """JSON manifests under ``<root>/_manifests/<asset key>/[<partition key>.json | manifest.json]``."""

    storage: dg.ResourceDependency[Storage]

    def _path(self, asset_key: dg.AssetKey, partition_key: str | None) -> Path:
        folder = self.storage.root_path.joinpath("_manifests", *asset_key.path)
        return folder / (f"{partition_key}.json" if partition_key is not None else "manifest.json")

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if context.has_asset_partitions:
            keys = set(context.asset_partition_keys)
            if not isinstance(obj, dict) or set(obj) != keys:
                raise TypeError(
                    f"{context.asset_key.to_user_string()} is partitioned: return {{partition_key: manifest}} "
                    f"for exactly the run's partitions {sorted(keys)}"
                )
            for key, manifest in obj.items():
                _write_json(self._path(context.asset_key, key), manifest)
        else:
            _write_json(self._path(context.asset_key, None), obj)

    def load_input(self, context: dg.InputContext) -> Any:
        asset_key = context.asset_key
        if context.has_asset_partitions:
            out = {}
            for key in context.asset_partition_keys:
                path = self._path(asset_key, key)
                if not path.exists():
                    raise FileNotFoundError(
                        f"partition {key!r} of {asset_key.to_user_string()} has not been materialized ({path})"
                    )
                out[key] = json.loads(path.read_text())
            return out
        return json.loads(self._path(asset_key, None).read_text())


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)
