"""The IO manager for the manifests the assets hand each other: typed dataclasses stored as JSON.

Large data is written by the stage itself under the storage root; what passes between assets is the stage's
manifest (a dataclass of ``pipelines/``) that says where it is and what it holds. Its type is the asset's return
annotation, and the same type is read back for the input of the next asset (``pydantic.TypeAdapter``: dataclasses,
``Path`` and nested manifests round-trip). A partitioned asset returns ``{partition_key: manifest}`` for exactly
the run's partitions (so single-run backfills over many partitions work) and its consumers get the same shape for
every upstream partition of their step.
"""

import json
import typing
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic

from assets.resources import Storage
from assets.runs import open_run
from pipelines.files import write_text


def _manifest_type(context: dg.InputContext | dg.OutputContext) -> Any:
    """The type of one manifest: the annotation, or its value type for a partitioned asset's ``dict[str, T]``."""
    annotation = context.dagster_type.typing_type
    if context.has_asset_partitions:
        if typing.get_origin(annotation) is not dict:
            raise TypeError(f"{context.asset_key.to_user_string()} is partitioned: annotate it dict[str, <manifest>]")
        return typing.get_args(annotation)[1]
    return annotation


class ManifestIOManager(dg.ConfigurableIOManager):
    """JSON manifests under ``<root>/_manifests/<asset key>/[<partition key>.json | manifest.json]``.

    Every step of a run opens it, so it is also where a run records its worker process and fails the runs whose
    workers were killed (:mod:`assets.runs`)."""

    storage: dg.ResourceDependency[Storage]

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        failed = open_run(context.instance, context.run.run_id if context.run is not None else None)
        if failed and context.log is not None:
            context.log.warning(f"marked failed: runs {failed}, whose processes are gone (killed)")

    def _path(self, asset_key: dg.AssetKey, partition_key: str | None) -> Path:
        folder = self.storage.layout.root.joinpath("_manifests", *asset_key.path)
        return folder / (f"{partition_key}.json" if partition_key is not None else "manifest.json")

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        adapter = pydantic.TypeAdapter(_manifest_type(context))
        if not context.has_asset_partitions:
            self._write(self._path(context.asset_key, None), adapter, obj)
            return
        keys = set(context.asset_partition_keys)
        if not isinstance(obj, dict) or set(obj) != keys:
            raise TypeError(f"{context.asset_key.to_user_string()} is partitioned: return {{partition_key: manifest}} "
                            f"for exactly the run's partitions {sorted(keys)}")
        for key, manifest in obj.items():
            self._write(self._path(context.asset_key, key), adapter, manifest)

    def load_input(self, context: dg.InputContext) -> Any:
        kind = _manifest_type(context)
        if not context.has_asset_partitions:
            return self._read(self._path(context.asset_key, None), kind)
        return {key: self._read(self._path(context.asset_key, key), kind) for key in context.asset_partition_keys}

    @staticmethod
    def _write(path: Path, adapter: pydantic.TypeAdapter, manifest: Any) -> None:
        write_text(path, json.dumps(adapter.dump_python(manifest, mode="json"), indent=1, sort_keys=True))

    @staticmethod
    def _read(path: Path, kind: Any) -> Any:
        if not path.exists():
            raise FileNotFoundError(f"{path}: this asset (partition) has not been materialized")
        try:
            return pydantic.TypeAdapter(kind).validate_python(json.loads(path.read_text()))
        except pydantic.ValidationError as error:
            raise ValueError(f"{path} does not hold a {kind}: {error}") from None
