"""``python -m orchestration.check_config JOB FILE [FILE ...]``: a job's run config checked before a run starts.

Dagster checks a run config against its schema (types, ``Literal`` choices) when the run is created, and its CLI
prints that as a traceback; the ranges of the stages' fields (``Annotated`` on the dataclasses in ``pipelines/``,
carried into the config classes by ``assets/settings.py``) are pydantic's and are checked only when the step
starts, after the steps before it ran. This checks both for every op of the job, and the stage's own
``__post_init__`` too, and prints each problem as one line naming the file and the key::

    orchestration/presets/sample_world.yaml: ops.downloaded_images.config.thread_count: must be >= 1, got -1

It exits 2 on a problem, 0 otherwise; ``make demo`` and ``make ablation`` run it before ``dagster job execute``.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic
import yaml

from assets.settings import StageConfig


_AT_PATH = re.compile(r" at path root(:[\w:\[\]-]+)?")
"""Dagster's own spelling of the key path in its messages (the lines name it as ``ops.<op>.config.<field>``)."""


def load_run_config(paths: Sequence[str]) -> dict[str, Any]:
    """The run config in YAML files ``paths`` (later files update earlier ones, key by key); a file that cannot be
    read or is not a mapping is a ``ValueError`` naming it."""
    merged: dict[str, Any] = {}
    for path in paths:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except OSError as error:
            raise ValueError(f"{path}: cannot read the run config ({error.strerror})") from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f":{mark.line + 1}" if mark else ""
            raise ValueError(f"{path}{where}: not YAML ({getattr(error, 'problem', error)})") from None
        if loaded is None:
            continue
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a run config is a mapping (ops:, execution:, resources:), got a "
                             f"{type(loaded).__name__}")
        update_run_config(merged, loaded)
    return merged


def update_run_config(into: dict, new: dict) -> None:
    """Update the run config ``into`` with ``new``, key by key (a mapping in both is updated, not replaced)."""
    for key, value in new.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            update_run_config(into[key], value)
        else:
            into[key] = value


def _config_class(node: Any) -> type[StageConfig] | None:
    """The config class an op's function takes as ``config`` (a weft stage config), if any."""
    function = getattr(node.definition.compute_fn, "decorated_fn", None)
    parameter = inspect.signature(function).parameters.get("config") if function is not None else None
    kind = parameter.annotation if parameter is not None else None
    return kind if isinstance(kind, type) and issubclass(kind, StageConfig) else None


def config_problems(job: dg.JobDefinition, run_config: dict[str, Any]) -> list[str]:
    """``<key path>: <problem>`` for every problem of ``run_config`` for ``job`` (empty: it is fine)."""
    try:
        dg.validate_run_config(job, run_config)
    except dg.DagsterInvalidConfigError as error:
        return [f"{'.'.join(str(getattr(e, 'field_name', '?')) for e in err.stack.entries)}: "
                f"{_AT_PATH.sub('', err.message)}" for err in error.errors]
    problems = []
    for node in job.graph.nodes:
        given = (run_config.get("ops") or {}).get(node.name, {}) or {}
        kind = _config_class(node)
        if kind is None or "config" not in given:
            continue
        where = f"ops.{node.name}.config"
        try:
            settings = kind(**given["config"])
        except pydantic.ValidationError as error:
            problems += [f"{where}.{'.'.join(map(str, e['loc']))}: {e['msg']}, got {e['input']!r}" for e in error.errors()]
            continue
        if kind.stage is not None:
            try:
                settings.to(kind.stage)
            except ValueError as error:
                problems.append(f"{where}.{error}" if re.match(r"\w+: ", str(error)) else f"{where}: {error}")
            except TypeError:
                pass  # fields the asset sets from its inputs: nothing the run config can get wrong
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m orchestration.check_config", description=__doc__.split("\n\n")[0])
    parser.add_argument("job", help="a job of the code location (orchestration.definitions)")
    parser.add_argument("files", nargs="+", help="run-config YAML files, as given to dagster job execute -c")
    args = parser.parse_args(argv)
    for category in (dg.BetaWarning, dg.PreviewWarning):  # the assets' beta / preview parameters: not the user's concern
        warnings.filterwarnings("ignore", category=category)
    from orchestration.definitions import defs

    definitions = defs()
    jobs = sorted(j.name for j in definitions.resolve_all_job_defs() if not j.name.startswith("__"))
    if args.job not in jobs:
        print(f"{args.job}: no such job (jobs: {', '.join(jobs)})", file=sys.stderr)
        return 2
    try:
        run_config = load_run_config(args.files)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    problems = config_problems(definitions.resolve_job_def(args.job), run_config)
    for problem in problems:
        print(f"{' + '.join(args.files)}: {problem}", file=sys.stderr)
    return 2 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
