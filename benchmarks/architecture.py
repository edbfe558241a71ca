"""The shape of the package `scripts/kiln` (issue 25), measured from its source with `ast`: import
circles, module and function lengths, the widest signatures, `coerce(` calls outside the scripts'
doors, string lookups in the audit modules. tests/test_architecture.py holds the limits;
`python benchmarks/architecture.py` prints the figures (``--json`` for the record).

Written here rather than taken from a tool: ruff has no module-length or import-cycle rule (its
PLR0913 counts parameters, PLR0915 statements rather than lines), and import-linter needs contracts
naming layers, where the question is only "is there any circle"."""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "scripts" / "kiln"
SCRIPTS = REPO / "scripts"
# The modules that read records after training: the pages, the comparison, the repro check, the manifest.
AUDIT = ("pages", "card", "compare", "repro", "manifest")
LIMITS = {"module_lines": 400, "function_lines": 80, "parameters": 8, "audit_lookups": 60}


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The kiln modules `name` imports, at the top or inside a function."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level == 1 or mod == "kiln" or mod.startswith("kiln."):
                base = mod.removeprefix("kiln").lstrip(".")
                if base:
                    out.add(base.split(".")[0])
                else:  # from kiln import x / from . import x
                    out |= {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("kiln.")}
    return (out & known) - {name}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan)."""
    index, low, stack, on, out, n = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = n[0]
        n[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def functions(tree: ast.Module):
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node


def parameters(fn: ast.FunctionDef) -> int:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args + a.kwonlyargs]
    return len([x for x in names if x not in ("self", "cls")]) + bool(a.vararg) + bool(a.kwarg)


def string_lookups(tree: ast.Module) -> int:
    """`x["key"]` and `x.get("key")`: a record read by the name of its field."""
    count = 0
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Subscript)
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, str)
        ):
            count += 1
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "get"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            count += 1
    return count


def coerce_calls() -> list[str]:
    """`coerce(` called inside the package (the scripts' doors are scripts/*.py)."""
    out = []
    for path in sorted(PACKAGE.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                f = node.func
                name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
                if name == "coerce":
                    out.append(f"{path.stem}:{node.lineno}")
    return out


def measure() -> dict:
    mods = modules()
    graph = {m: imports(m, t, set(mods)) for m, t in mods.items()}
    lines = {m: len((PACKAGE / f"{m}.py").read_text().splitlines()) for m in mods}
    fns = [
        (f"{m}.{fn.name}:{fn.lineno}", fn.end_lineno - fn.lineno + 1, parameters(fn))
        for m, t in mods.items()
        for fn in functions(t)
    ]
    lookups = {m: string_lookups(mods[m]) for m in AUDIT if m in mods}
    return {
        "limits": LIMITS,
        "circles": circles(graph),
        "long_modules": {m: n for m, n in sorted(lines.items(), key=lambda kv: -kv[1]) if n > LIMITS["module_lines"]},
        "long_functions": {f: n for f, n, _ in sorted(fns, key=lambda x: -x[1]) if n > LIMITS["function_lines"]},
        "wide_functions": {f: p for f, _, p in sorted(fns, key=lambda x: -x[2]) if p > LIMITS["parameters"]},
        "coerce_in_package": coerce_calls(),
        "audit_lookups": lookups,
        "audit_lookups_total": sum(lookups.values()),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    result = measure()
    if ap.parse_args().json:
        print(json.dumps(result, indent=1))
        return 0
    for key, value in result.items():
        print(f"{key}: {json.dumps(value)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
