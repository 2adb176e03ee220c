"""The IO manager for the manifests the assets hand each other: typed dataclasses stored as JSON.

Large data is written by the stage itself under the storage root; what passes between assets is the stage's
manifest (a dataclass of ``pipelines/``) that says where it is and what it holds. Its type is the asset's return
annotation, and the same type is read back for the input of the next asset (``pydantic.TypeAdapter``: dataclasses,
``Path`` and nested manifests round-trip). A partitioned asset returns ``{partition_key: manifest}`` for exactly
the run's partitions (so single-run backfills over many partitions work) and its consumers get the same shape for
every upstream partition of their step.

A partition a stage could not produce (a raw shard that cannot be read) is quarantined: the stage returns a
:class:`pipelines.data.errors.ShardFailure` for it, stored in the manifest's place. A consumer whose annotation
admits ``ShardFailure`` (an asset check reporting failures) gets it; any other consumer gets the dict without that
partition, and a partitioned one may leave the partition out of its own result: its failure is passed on to it.
So one bad shard keeps its partition out of every later stage while the others go on.
"""

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic

from assets.resources import Storage
from assets.runs import open_run
from pipelines.data.errors import ShardFailure
from pipelines.files import write_text

FAILED = "failed"
"""The key of a quarantined partition's record: ``{"failed": ShardFailure}``."""


def _manifest_type(context: dg.InputContext | dg.OutputContext) -> Any:
    """The type of one manifest: the annotation, or its value type for a partitioned asset's ``dict[str, T]``."""
    annotation = context.dagster_type.typing_type
    if context.has_asset_partitions:
        if typing.get_origin(annotation) is not dict:
            raise TypeError(f"{context.asset_key.to_user_string()} is partitioned: annotate it dict[str, <manifest>]")
        return typing.get_args(annotation)[1]
    return annotation


def with_failures(manifest: type) -> dg.DagsterType:
    """The Dagster type of a partitioned result whose partitions each hold a ``manifest`` or a :class:`ShardFailure`
    (``dict[str, manifest | ShardFailure]``, which Dagster cannot read from an annotation): the asset's
    ``dagster_type``, and the annotation of a consumer that wants the failures too."""

    def check(_, value: Any) -> bool:
        return isinstance(value, dict) and all(isinstance(v, (manifest, ShardFailure)) for v in value.values())

    return dg.DagsterType(check, name=f"{manifest.__name__}OrFailure", typing_type=dict[str, manifest | ShardFailure],
                          description=f"partition key -> {manifest.__name__}, or the ShardFailure that quarantined it")


def _admits_failures(kind: Any) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and ShardFailure in typing.get_args(kind)


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
        if not isinstance(obj, dict) or not set(obj) <= keys:
            raise TypeError(f"{context.asset_key.to_user_string()} is partitioned: return {{partition_key: manifest}} "
                            f"for the run's partitions {sorted(keys)}")
        for key in sorted(keys - set(obj)):
            failure = self._quarantined(context.asset_key, key)
            if failure is None:
                raise TypeError(f"{context.asset_key.to_user_string()} left out partition {key!r}, which no stage "
                                "quarantined: return a manifest (or a ShardFailure) for every partition of the run")
            context.log.warning(f"{context.asset_key.to_user_string()} {key}: quarantined by {failure.stage} ({failure})")
            obj = {**obj, key: failure}
        for key, manifest in obj.items():
            path = self._path(context.asset_key, key)
            if isinstance(manifest, ShardFailure):
                write_text(path, json.dumps({FAILED: dataclasses.asdict(manifest)}, indent=1, sort_keys=True))
            else:
                self._write(path, adapter, manifest)

    def load_input(self, context: dg.InputContext) -> Any:
        kind = _manifest_type(context)
        if not context.has_asset_partitions:
            return self._read(self._path(context.asset_key, None), kind)
        loaded = {key: self._read(self._path(context.asset_key, key), kind) for key in context.asset_partition_keys}
        if _admits_failures(kind):
            return loaded
        return {key: manifest for key, manifest in loaded.items() if not isinstance(manifest, ShardFailure)}

    def _quarantined(self, asset_key: dg.AssetKey, partition_key: str) -> ShardFailure | None:
        """The failure another asset stored for ``partition_key`` (why the stage of ``asset_key`` had no input for
        it)."""
        manifests = self.storage.layout.root / "_manifests"
        own = self._path(asset_key, None).parent
        for folder in sorted(manifests.iterdir()) if manifests.is_dir() else ():
            path = folder / f"{partition_key}.json"
            if folder == own:
                continue
            if path.is_file():
                record = json.loads(path.read_text())
                if FAILED in record:
                    return ShardFailure(**record[FAILED])
        return None

    @staticmethod
    def _write(path: Path, adapter: pydantic.TypeAdapter, manifest: Any) -> None:
        write_text(path, json.dumps(adapter.dump_python(manifest, mode="json"), indent=1, sort_keys=True))

    @staticmethod
    def _read(path: Path, kind: Any) -> Any:
        if not path.exists():
            raise FileNotFoundError(f"{path}: this asset (partition) has not been materialized")
        record = json.loads(path.read_text())
        if isinstance(record, dict) and set(record) == {FAILED}:
            return ShardFailure(**record[FAILED])
        try:
            return pydantic.TypeAdapter(kind).validate_python(record)
        except pydantic.ValidationError as error:
            raise ValueError(f"{path} does not hold a {kind}: {error}") from None
