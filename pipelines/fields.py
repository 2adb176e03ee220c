"""Typed dataclass fields checked where a user hands them in: JSON files, ``--set``, run config.

A stage's config dataclass declares what each field accepts in its annotation: the type, ``Literal[...]`` for a
choice, ``Annotated[int, Ge(1)]`` (``annotated_types``) for a range. :func:`check_fields` holds the values to it
and raises one ``ValueError`` line that names the field, what it accepts and what it got; the Dagster config
classes derived from the same dataclass (``assets/settings.py``) carry the same choices and ranges.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable
from typing import Any

import annotated_types

_BOUNDS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def describe(hint: Any) -> str:
    """What a value of type ``hint`` is, in words."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return describe(args[0])
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (list, tuple, frozenset) and args:
        if len(args) == 1 or args[1] is Ellipsis:
            return "a list of " + describe(args[0]).removeprefix("a ").removeprefix("an ") + "s"
        return f"a list of {len(args)} numbers"
    if origin is dict or hint is dict:
        return "an object"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null",
            typing.Any: "anything"}.get(hint, getattr(hint, "__name__", str(hint)))


def problem(value: Any, hint: Any) -> str | None:
    """Why ``value`` is not a ``hint`` (``None``: it is)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Annotated:
        return problem(value, args[0]) or _bound_problem(value, args[1:])
    if origin is typing.Literal:
        return None if value in args else f"must be {describe(hint)}, got {value!r}"
    if origin in (typing.Union, types.UnionType):
        problems = [problem(value, a) for a in args if a is not type(None) or value is None]
        if None in problems:
            return None
        return problems[0] if len(problems) == 1 else f"expected {describe(hint)}, got {value!r}"
    if hint is typing.Any:
        return None
    if origin in (list, tuple, frozenset):
        if not isinstance(value, (list, tuple, frozenset, set)):
            return f"expected {describe(hint)}, got {value!r}"
        items = list(value)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(items) != len(args):
                return f"expected {describe(hint)}, got {value!r}"
            kinds = args
        else:
            kinds = [args[0]] * len(items) if args else []
        return next((f"expected {describe(hint)}, got {value!r}" for v, k in zip(items, kinds) if problem(v, k)), None)
    if origin is dict or hint is dict:
        return None if isinstance(value, dict) else f"expected an object, got {value!r}"
    if origin is Callable or hint is Callable:
        return None if callable(value) else f"expected a function, got {value!r}"
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif hint is type(None):
        ok = value is None
    elif isinstance(hint, type):
        ok = isinstance(value, hint)
    else:
        ok = True
    return None if ok else f"expected {describe(hint)}, got {value!r}"


def _bound_problem(value: Any, constraints: tuple) -> str | None:
    for constraint in constraints:
        bounds = constraint if isinstance(constraint, annotated_types.GroupedMetadata) else (constraint,)  # Interval
        for bound in bounds:
            for name, sign in _BOUNDS:
                limit = getattr(bound, name, None)
                if limit is not None and not _HOLDS[sign](value, limit):
                    return f"must be {sign} {limit}, got {value!r}"
    return None


_HOLDS = {">=": lambda v, x: v >= x, ">": lambda v, x: v > x, "<=": lambda v, x: v <= x, "<": lambda v, x: v < x}


def check_fields(instance: Any) -> None:
    """Every field of dataclass ``instance`` against its annotation: ``ValueError("<field>: <why>")`` on the first
    that does not hold."""
    hints = typing.get_type_hints(type(instance), include_extras=True)
    for field in dataclasses.fields(instance):
        reason = problem(getattr(instance, field.name), hints[field.name])
        if reason is not None:
            raise ValueError(f"{field.name}: {reason}")
