"""The Dagster code location loads as the workspace describes it."""

from pathlib import Path

import dagster as dg
import yaml

from orchestration.definitions import defs


def test_workspace_points_at_the_definitions():
    with open(Path(__file__).parents[1] / "workspace.yaml") as f:
        workspace = yaml.safe_load(f)
    modules = [entry["python_module"]["module_name"] for entry in workspace["load_from"]]
    assert modules == ["orchestration.definitions"]


def test_definitions_load():
    assert isinstance(defs, dg.Definitions)
    dg.Definitions.validate_loadable(defs)
