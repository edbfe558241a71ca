"""Which kiln modules a rule's entry script really runs: its code inputs, derived from the imports.

A rule reruns when its code changes only if every module it runs is one of its inputs. A list
written by hand goes stale the first time someone adds an import (it had: a change to
``kiln.backends`` reran neither merge nor evaluate). This reads the imports with ``ast`` at parse
time, transitively, without importing anything: ``import kiln.x``, ``from kiln.x import y``,
``from kiln import x`` and ``from . import x``, at module level or inside functions (a lazy import
runs too). A module that runs another kiln file without importing it (a process launched by
path) names it in a module-level ``RUNS = ("kiln.ddp.worker", ...)``.

Why not modulefinder or importlab: modulefinder executes nothing either but follows every
third-party import (torch, transformers: seconds per rule at parse time), and neither sees the
``RUNS`` files; only the package's own ~20 files matter here.
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

PACKAGE = "kiln"
PACKAGE_DIR = Path(__file__).resolve().parent


def module_file(module: str, package_dir: Path = PACKAGE_DIR) -> Path | None:
    """kiln.a.b -> .../kiln/a/b.py (or its __init__.py); None for anything outside the package."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = package_dir.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _module_name(path: Path, package_dir: Path) -> str | None:
    try:
        rel = path.resolve().relative_to(package_dir)
    except ValueError:
        return None
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def imported_modules(path: Path, package_dir: Path = PACKAGE_DIR) -> set[str]:
    """Names of the kiln modules one file imports (or declares in RUNS), anywhere in the file."""
    return set(_imported(Path(path).resolve(), Path(package_dir).resolve()))


@functools.cache  # one parse per file per process (the workflow asks for each rule)
def _imported(path: Path, package_dir: Path) -> frozenset[str]:
    tree = ast.parse(Path(path).read_text(), filename=str(path))
    here = _module_name(Path(path), package_dir)
    is_package = Path(path).name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                if here is None:
                    continue
                parts = here.split(".")
                anchor = parts[: len(parts) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from kiln import x`
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "RUNS" for t in node.targets):
            if isinstance(node.value, (ast.Tuple, ast.List)):
                found.update(e.value for e in node.value.elts if isinstance(e, ast.Constant))
    return frozenset(name for name in found if module_file(name, package_dir) is not None)


@functools.cache
def _closure(entry: Path, package_dir: Path) -> tuple[str, ...]:
    seen: dict[Path, None] = {}
    todo = [entry]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen[path] = None
        for name in imported_modules(path, package_dir):
            parts = name.split(".")
            # Importing kiln.a.b runs kiln/__init__.py and kiln/a/__init__.py first.
            for i in range(1, len(parts) + 1):
                f = module_file(".".join(parts[:i]), package_dir)
                if f is not None and f not in seen:
                    todo.append(f)
    return tuple(sorted(str(p) for p in seen))


def code_files(entry: str | Path, package_dir: str | Path = PACKAGE_DIR) -> list[str]:
    """The entry file and every kiln module it runs, transitively (sorted paths)."""
    return list(_closure(Path(entry).resolve(), Path(package_dir).resolve()))
