"""The project's own import graph, read from the source (no import runs): which files a module executes."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "cache", "stages")


def module_files(name: str) -> list[str]:
    """The project files that importing `name` executes: its packages' __init__.py files and itself."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return []
    files = []
    for depth in range(1, len(parts) + 1):
        path = REPO.joinpath(*parts[:depth])
        if (path / "__init__.py").is_file():
            files.append(f"{'/'.join(parts[:depth])}/__init__.py")
        elif path.with_suffix(".py").is_file():
            files.append(f"{'/'.join(parts[:depth])}.py")
    return files


def imported_modules(path: str, module_level_only: bool = False) -> set[str]:
    """The project modules a file imports (`from x import y` counts x.y when that is a module)."""
    tree = ast.parse((REPO / path).read_text())
    nodes = tree.body if module_level_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    # `from x import y` names a module only when x/y.py or x/y/__init__.py exists.
    path = {name: name.replace(".", "/") for name in found}
    return {
        name
        for name in found
        if module_files(name)[-1:] in ([f"{path[name]}.py"], [f"{path[name]}/__init__.py"])
    }


def imported_files(path: str, module_level_only: bool = False) -> set[str]:
    return {file for name in imported_modules(path, module_level_only) for file in module_files(name)}


def code_of(start_files: list[str], entry: str = "stages/cli.py") -> set[str]:
    """Every project file that running `start_files` through the CLI executes (function-level imports
    included, except the CLI's own, which import each stage only when its command runs)."""
    code: set[str] = set()
    pending = [*start_files, entry]
    while pending:
        path = pending.pop()
        if path not in code:
            code.add(path)
            pending += sorted(imported_files(path, module_level_only=path == entry))
    return code


def project_files() -> list[str]:
    return sorted(
        str(path.relative_to(REPO)) for package in PACKAGES for path in (REPO / package).rglob("*.py")
    )
