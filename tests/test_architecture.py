"""The architecture as tests: folders are floors and imports go one way, with no import circle; the
report renders files and loads no model; functions and files stay short enough to read.

Each test lists every offender (file, line, what and by how much), so one run shows all there is to move.
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest
from project_imports import PACKAGES, REPO, imported_modules, module_files, project_files

FUNCTION_LINES = 80  # the longest function a reader follows without scrolling back
FILE_LINES = 500

# The floors of the project, bottom to top, each with the lower floors it may import (its own is always
# allowed). This table is the design; the tests hold the code to it.
FLOORS: dict[str, set[str]] = {
    # pipeline/*.py: config, experiments, files, hashing, journal, registry, runtime, samples
    "core": set(),
    # the teacher cache's format; of the core it uses CACHE_USES only
    "cache": {"core"},
    # every model family behind one interface
    "models": {"core"},
    # one module per data layout: data, not models
    "benchmarks": {"core"},
    # losses, methods, teachers, perturbations and the teacher forward pass (writes the cache)
    "unlearning": {"core", "cache", "models", "benchmarks"},
    # pipeline/experiments.py, a core file with a floor of its own: it writes params.yaml from experiment
    # files, spelling out each method's teacher slots (pipeline.unlearning.methods)
    "experiments": {"core", "unlearning"},
    # the train recipe's pieces (reads the cache, runs the losses)
    "training": {"core", "cache", "models", "benchmarks", "unlearning"},
    # scores any model on any benchmark, whatever trained it: no training, no unlearning
    "evaluation": {"core", "cache", "models", "benchmarks"},
    # renders evaluated runs: reads files, loads no model (see REPORT_FILES)
    "reporting": {"core", "benchmarks", "evaluation"},
    # the embedded world and its tiny model, scored with evaluation's measures
    "mini_world": {"core", "models", "benchmarks", "evaluation"},
    # the recipes: everything below
    "stages": {
        "core",
        "cache",
        "models",
        "benchmarks",
        "unlearning",
        "experiments",
        "training",
        "evaluation",
        "reporting",
        "mini_world",
    },
}
CACHE_USES = {"pipeline.hashing", "pipeline.files"}
# What renders the report: it reads results/runs/ only, so none of it may import a model library.
REPORT_FILES = ("pipeline/reporting/", "stages/report.py")
MODEL_LIBRARIES = ("torch", "torchvision", "transformers", "peft", "accelerate")  # and pipeline.models


def _module(path: str) -> str:
    return path[: -len(".py")].replace("/", ".").removesuffix(".__init__")


def _folders() -> list[str]:
    """pipeline's subpackages by name, e.g. 'models'."""
    return sorted(path.parent.name for path in (REPO / "pipeline").glob("*/__init__.py"))


def floor(module: str) -> str:
    """The floor of a project module: stages, cache, a pipeline folder, or core (pipeline's own files)."""
    parts = module.split(".")
    if parts[0] != "pipeline":
        return parts[0]
    if len(parts) > 1 and ((REPO / "pipeline" / parts[1] / "__init__.py").is_file() or parts[1] in FLOORS):
        return parts[1]
    return "core"


def _report(offenders: list[str], what: str) -> str:
    return f"{len(offenders)} {what}:\n  " + "\n  ".join(offenders)


def test_floor_names_the_folder_of_a_module():
    assert floor("pipeline.models.loading") == "models"
    assert floor("pipeline.models") == "models"
    assert floor("pipeline.hashing") == "core"
    assert floor("pipeline.experiments") == "experiments"
    assert floor("pipeline") == "core"
    assert floor("cache.reader") == "cache"
    assert floor("stages.train") == "stages"


def test_the_floors_go_one_way():
    """Each floor imports only floors below it, so no two floors can import each other."""
    order = list(FLOORS)
    offenders = [
        f"{name} may import {other}, which is not below it"
        for position, (name, allowed) in enumerate(FLOORS.items())
        for other in sorted(allowed)
        if other not in order[:position]
    ]
    if offenders:
        pytest.fail(_report(offenders, "floors out of order"), pytrace=False)


def test_every_folder_stands_on_a_floor():
    missing = [name for name in [*_folders(), *PACKAGES] if name not in FLOORS and name != "pipeline"]
    assert not missing, f"folders without a floor (add them to FLOORS in {__file__}): {missing}"


def test_imports_stay_on_their_floors():
    offenders = []
    for path in project_files():
        own = floor(_module(path))
        for name in sorted(imported_modules(path)):
            target = floor(name)
            if target != own and target not in FLOORS[own]:
                offenders.append(f"{path} ({own}) imports {name} ({target})")
            elif own == "cache" and target == "core" and name not in CACHE_USES:
                offenders.append(f"{path} (cache) imports {name}: cache uses only {sorted(CACHE_USES)}")
        tree = ast.parse((REPO / path).read_text())
        for node in ast.walk(tree):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else []
            names += [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            offenders += [
                f"{path}:{node.lineno} imports test code ({name})"
                for name in names
                if name.split(".")[0] in ("tests", "builders", "conftest", "project_imports")
            ]
    if offenders:
        pytest.fail(
            _report(offenders, "imports against the floors (tests/test_architecture.py FLOORS)"),
            pytrace=False,
        )


def test_no_import_circle_among_the_projects_modules():
    graph = {_module(path): imported_modules(path) for path in project_files()}
    graph = {
        name: {other for other in targets if other in graph and other != name}
        for name, targets in graph.items()
    }
    visiting, done = set(), set()

    def visit(name: str, trail: list[str]) -> None:
        if name in done:
            return
        assert name not in visiting, "import circle: " + " -> ".join([*trail, name])
        visiting.add(name)
        for other in sorted(graph[name]):
            visit(other, [*trail, name])
        visiting.discard(name)
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


def _imports(path: str) -> list[tuple[int, str]]:
    """(line, module) of every import in a file, at any depth (function-level ones included)."""
    found = []
    for node in ast.walk(ast.parse((REPO / path).read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_the_report_imports_no_model_library():
    offenders = [
        f"{path}:{line} imports {name}"
        for path in project_files()
        if path.startswith(REPORT_FILES)
        for line, name in _imports(path)
        if name.split(".")[0] in MODEL_LIBRARIES or floor(name) == "models"
    ]
    if offenders:
        pytest.fail(_report(offenders, "model imports where the report is rendered"), pytrace=False)


def test_importing_the_report_loads_no_model_library():
    """What the report's modules import, through every floor below, leaves torch and transformers out."""
    modules = [_module(path) for path in project_files() if path.startswith(REPORT_FILES)]
    probe = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "print(sorted(name for name in ('torch', 'transformers', 'peft') if name in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", f"importing {modules} loads {result.stdout.strip()}"


def test_functions_are_short():
    offenders = []
    for path in project_files():
        for node in ast.walk(ast.parse((REPO / path).read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > FUNCTION_LINES:
                    offenders.append(f"{path}:{node.lineno} {node.name} is {length} lines")
    if offenders:
        pytest.fail(_report(offenders, f"functions over {FUNCTION_LINES} lines"), pytrace=False)


def test_files_are_short():
    lengths = {path: len((REPO / path).read_text().splitlines()) for path in project_files()}
    offenders = [f"{path} is {lines} lines" for path, lines in lengths.items() if lines > FILE_LINES]
    if offenders:
        pytest.fail(_report(offenders, f"files over {FILE_LINES} lines"), pytrace=False)


def test_module_files_follow_packages():
    assert module_files("pipeline.models.loading") == [
        "pipeline/__init__.py",
        "pipeline/models/__init__.py",
        "pipeline/models/loading.py",
    ]
