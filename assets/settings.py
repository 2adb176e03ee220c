"""Dagster config classes derived from the stages' dataclasses, so that every default exists once (in ``pipelines/``).

``class DownloadSettings(stage_fields(DownloadConfig, exclude=...)):`` gives a ``dg.Config`` with the dataclass's
fields: the same names, defaults and per-field docs (shown in the launchpad), tuples and frozensets as lists and
``Path`` as ``str``; a field whose type is itself a dataclass becomes a nested config class derived the same way.
:meth:`StageConfig.to` (and :meth:`StageResource.to`) turns the values back into the dataclass.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import dagster as dg
import pydantic

T = TypeVar("T")


def _field_docs(stage: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass (the string literal right after a field)."""
    try:
        body = ast.parse(textwrap.dedent(inspect.getsource(stage))).body[0].body
    except (OSError, TypeError):  # no source (a class built at run time): no docs
        return {}
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


def _config_type(hint: Any) -> Any:
    """The Dagster-config type of a dataclass field's type (tuples and frozensets -> lists, Path -> str, dataclass ->
    config; ``Annotated`` ranges and ``Literal`` choices kept, so pydantic and Dagster check them)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return typing.Annotated[(_config_type(args[0]), *args[1:])]
    if origin in (tuple, frozenset):
        return list[_config_type(args[0])]
    if origin in (typing.Union, types.UnionType):
        return typing.Optional[_config_type(next(a for a in args if a is not type(None)))]  # noqa: UP045 (runtime type)
    if hint is Path:
        return str
    if dataclasses.is_dataclass(hint):
        return _derived(hint)
    return hint


def _config_value(value: Any) -> Any:
    if isinstance(value, (tuple, frozenset)):
        return [_config_value(v) for v in (sorted(value) if isinstance(value, frozenset) else value)]
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return _derived(type(value))(**{f.name: _config_value(getattr(value, f.name)) for f in dataclasses.fields(value)})
    return value


def stage_fields(*stages: type, exclude: tuple[str, ...] = (), base: type | None = None) -> type:
    """A base class (``base``: :class:`StageConfig` by default, or a :class:`StageResource`) holding the fields of the
    ``stages`` dataclasses but ``exclude``; subclass it to add fields and methods. Derived from one stage, its
    ``stage`` is that dataclass (what :meth:`StageResource.get` builds)."""
    base = base or StageConfig
    fields: dict[str, Any] = {}
    for stage in stages:
        hints, docs = typing.get_type_hints(stage, include_extras=True), _field_docs(stage)
        for field in dataclasses.fields(stage):
            if field.name in exclude:
                continue
            if field.name in fields:
                raise TypeError(f"{stage.__name__}.{field.name}: another stage of {[s.__name__ for s in stages]} has it")
            if field.default is not dataclasses.MISSING:
                default = field.default
            elif field.default_factory is not dataclasses.MISSING:
                default = field.default_factory()
            else:
                default = ...
            described = pydantic.Field(default=_config_value(default), description=docs.get(field.name))
            fields[field.name] = (_config_type(hints[field.name]), described)
    name = "".join(s.__name__ for s in stages) + "Fields"
    derived = pydantic.create_model(name, __base__=base, __module__=__name__, **fields)
    derived.stage = stages[0] if len(stages) == 1 else None
    return derived


@functools.cache
def _derived(stage: type) -> type:
    return stage_fields(stage)


def _stage_value(value: Any, hint: Any) -> Any:
    """A config value as the dataclass field of type ``hint`` holds it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if value is None:
        return None
    if origin is typing.Annotated:
        return _stage_value(value, args[0])
    if origin in (typing.Union, types.UnionType):
        return _stage_value(value, next(a for a in args if a is not type(None)))
    if origin in (tuple, frozenset):
        return origin(_stage_value(v, args[0]) for v in value)
    if hint is Path:
        return Path(value)
    if dataclasses.is_dataclass(hint):
        return value.to(hint)
    return value


def _to(settings: pydantic.BaseModel, stage: type[T], overrides: dict[str, Any]) -> T:
    hints = typing.get_type_hints(stage)
    values = {f.name: _stage_value(getattr(settings, f.name), hints[f.name]) for f in dataclasses.fields(stage)
              if f.name in type(settings).model_fields and f.name not in overrides}
    return stage(**values, **overrides)


class StageConfig(dg.Config):
    """Run config derived from stage dataclasses (see :func:`stage_fields`)."""

    stage: ClassVar[type | None] = None

    def to(self, stage: type[T], **overrides: Any) -> T:
        """The ``stage`` dataclass with this config's values for its fields (``overrides`` for the others)."""
        return _to(self, stage, overrides)


class StageResource(dg.ConfigurableResource):
    """A resource whose config is derived from stage dataclasses (see :func:`stage_fields`)."""

    stage: ClassVar[type | None] = None

    def to(self, stage: type[T], **overrides: Any) -> T:
        """The ``stage`` dataclass with this resource's values for its fields (``overrides`` for the others)."""
        return _to(self, stage, overrides)

    def get(self) -> Any:
        """The dataclass this resource configures, for the stage that takes it."""
        return self.to(self.stage)
