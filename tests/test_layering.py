"""The layers, read from the source with ``ast``: imports point down only (cuda_ops <- model <- pipelines <- assets
<- orchestration), so the five packages have no import cycle; no private Dagster API anywhere; Dagster stays out of
``model/`` and ``pipelines/``; and every asset (and asset check) body is at most 25 lines: a call to a stage, not the
stage itself. Every module is reached from an entry point (the code location, the ``weft`` script, a ``python -m``
module), so nothing ships that only tests use; ``model/`` is a library with no entry point of its own. Each rule is
first shown to catch a planted violation, so a rule that cannot fail fails here."""

import ast
import graphlib
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("cuda_ops", "model", "pipelines", "assets", "orchestration")
"""Bottom to top: a package may import the ones before it, never one after it."""
MAX_ASSET_BODY_LINES = 25
ASSET_DECORATORS = {"asset", "asset_check", "multi_asset", "multi_asset_check", "graph_asset"}


def _sources(*folders: str) -> dict[str, ast.Module]:
    """Every ``.py`` file under the folders, parsed, by path relative to the repository."""
    return {str(path.relative_to(ROOT)): ast.parse(path.read_text(), filename=str(path))
            for folder in folders for path in sorted((ROOT / folder).rglob("*.py"))}


def imported_modules(tree: ast.Module, path: str) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in the file, function-local ones included (relative ones resolved)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = Path(path).parent.parts[: len(Path(path).parent.parts) - node.level + 1]
                base = ".".join(package) + (f".{node.module}" if node.module else "")
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names if base == "dagster"]
    return found


def layer_of(module: str) -> str | None:
    top = module.split(".")[0]
    return top if top in LAYERS else None


def upward_imports(sources: dict[str, ast.Module]) -> list[str]:
    """``path:line imports <module>`` for every import of a layer above the file's own."""
    problems = []
    for path, tree in sources.items():
        own = layer_of(path.replace("/", "."))
        for line, module in imported_modules(tree, path):
            target = layer_of(module)
            if own and target and LAYERS.index(target) > LAYERS.index(own):
                problems.append(f"{path}:{line} imports {module} ({own} may not import {target})")
    return problems


def package_cycle(sources: dict[str, ast.Module]) -> list[str] | None:
    """A cycle in the graph of imports between the five packages, or None."""
    graph: dict[str, set[str]] = {layer: set() for layer in LAYERS}
    for path, tree in sources.items():
        own = layer_of(path.replace("/", "."))
        for _, module in imported_modules(tree, path):
            target = layer_of(module)
            if own and target and target != own:
                graph[own].add(target)
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as error:
        return error.args[1]
    return None


def private_dagster_imports(sources: dict[str, ast.Module]) -> list[str]:
    return [f"{path}:{line} imports {module}" for path, tree in sources.items()
            for line, module in imported_modules(tree, path) if module.startswith("dagster._")]


def dagster_imports(sources: dict[str, ast.Module]) -> list[str]:
    return [f"{path}:{line} imports {module}" for path, tree in sources.items()
            for line, module in imported_modules(tree, path) if module.split(".")[0].startswith("dagster")]


def _decorator_name(decorator: ast.expr) -> str:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")


def long_asset_bodies(sources: dict[str, ast.Module]) -> list[str]:
    """``path:line name: N lines`` for every asset (check) function whose body, docstring left out, is longer
    than :data:`MAX_ASSET_BODY_LINES` lines."""
    problems = []
    for path, tree in sources.items():
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if not any(_decorator_name(d) in ASSET_DECORATORS for d in node.decorator_list):
                continue
            body = node.body[1:] if ast.get_docstring(node) is not None else node.body
            lines = body[-1].end_lineno - body[0].lineno + 1 if body else 0
            if lines > MAX_ASSET_BODY_LINES:
                problems.append(f"{path}:{node.lineno} {node.name}: {lines} lines")
    return problems


def module_name(path: str) -> str:
    return path.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def entry_points(sources: dict[str, ast.Module]) -> set[str]:
    """Modules run by name: those with an ``if __name__ == "__main__":`` block."""
    return {module_name(path) for path, tree in sources.items() for node in tree.body
            if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test)}


def unreached_modules(sources: dict[str, ast.Module], roots: set[str]) -> list[str]:
    """Modules no chain of imports reaches from ``roots`` (a package counts as imported with any of its modules)."""
    modules = {module_name(path): (path, tree) for path, tree in sources.items()}
    reached, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name in reached or name not in modules:
            continue
        reached.add(name)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]  # importing a.b.c runs a and a.b
        path, tree = modules[name]
        for _, imported in imported_modules(tree, path):
            todo.append(imported)
            for node in ast.walk(tree):  # `from package import module`
                if isinstance(node, ast.ImportFrom) and node.module == imported:
                    todo += [f"{imported}.{alias.name}" for alias in node.names]
    return sorted(modules[name][0] for name in set(modules) - reached)


def project_roots(sources: dict[str, ast.Module]) -> set[str]:
    """The code location the workspace loads, the console scripts and the ``python -m`` modules."""
    workspace = yaml.safe_load((ROOT / "workspace.yaml").read_text())
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    return ({entry["python_module"]["module_name"] for entry in workspace["load_from"]}
            | {target.split(":")[0] for target in scripts.values()} | entry_points(sources))


@pytest.fixture(scope="module")
def project():
    return _sources(*LAYERS)


def _parsed(files: dict[str, str]) -> dict[str, ast.Module]:
    return {path: ast.parse(text) for path, text in files.items()}


def test_the_rules_catch_planted_violations():
    twenty_six = "\n".join(f"    x{i} = {i}" for i in range(26))
    planted = _parsed({
        "model/mm.py": "def f():\n    from pipelines.data import loader\n",
        "pipelines/data/x.py": "from assets import resources\nimport dagster as dg\n",
        "assets/a.py": ("from dagster._core.storage import tags\nfrom dagster import _check\nimport dagster as dg\n"
                        f"@dg.asset\ndef big():\n    \"\"\"Doc.\"\"\"\n{twenty_six}\n"
                        f"@dg.asset(group_name='g')\ndef fine():\n    \"\"\"Doc.\"\"\"\n    return 1\n"),
        "orchestration/o.py": "from . import jobs\nfrom .jobs import weekly\n",
    })
    assert upward_imports(planted) == ["model/mm.py:2 imports pipelines.data (model may not import pipelines)",
                                       "pipelines/data/x.py:1 imports assets (pipelines may not import assets)"]
    assert package_cycle(planted) is None  # upward edges alone, no loop
    planted["pipelines/data/y.py"] = ast.parse("import model.config\n")
    assert set(package_cycle(planted)) == {"model", "pipelines"}
    assert private_dagster_imports(planted) == ["assets/a.py:1 imports dagster._core.storage",
                                                "assets/a.py:2 imports dagster._check"]
    assert dagster_imports({k: v for k, v in planted.items() if k.startswith("pipelines")}) == [
        "pipelines/data/x.py:2 imports dagster"]
    assert long_asset_bodies(planted) == ["assets/a.py:5 big: 26 lines"]
    assert imported_modules(planted["orchestration/o.py"], "orchestration/o.py") == [
        (1, "orchestration"), (2, "orchestration.jobs")]
    modules = _parsed({"model/__init__.py": "", "model/mm.py": "from model import parts\n", "model/parts.py": "",
                       "model/tiny.py": "", "model/bench.py": "import model.tiny\nif __name__ == '__main__':\n    pass\n",
                       "pipelines/evaluation/benchmarks.py": "", "pipelines/cli.py": "import model.mm\n"})
    assert entry_points(modules) == {"model.bench"}
    assert unreached_modules(modules, {"pipelines.cli"}) == ["model/bench.py", "model/tiny.py",
                                                              "pipelines/evaluation/benchmarks.py"]


def test_imports_point_down_only(project):
    assert upward_imports(project) == []


def test_no_import_cycle_between_the_packages(project):
    assert package_cycle(project) is None


def test_no_private_dagster_api_anywhere(project):
    assert private_dagster_imports({**project, **_sources("tests")}) == []


def test_model_and_pipelines_never_import_dagster(project):
    assert dagster_imports({p: t for p, t in project.items() if p.startswith(("model/", "pipelines/"))}) == []


def test_asset_bodies_are_thin(project):
    assert long_asset_bodies({p: t for p, t in project.items() if p.startswith("assets/")}) == []


def test_every_module_is_reached_from_an_entry_point(project):
    assert unreached_modules(project, project_roots(project)) == []


def test_model_is_a_library_without_entry_points(project):
    assert {m for m in entry_points(project) if m.startswith("model")} == set()
