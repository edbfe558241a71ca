"""Data of the shipped examples (config/examples/): real text found in an installed package, the
docstrings of Python's standard library (PSF License 2.0, which allows copying with its notice),
not synthetic and not written by us.

- ``stdlib_modules.jsonl``, a label task: the first sentence of a function's docstring -> the
  module it belongs to (one of LABEL_MODULES).
- ``stdlib_summaries.jsonl``, a free-text task: "what does `module.name` do?" -> that sentence.

Written once with ``python scripts/make_example_data.py`` and committed (docstrings change between
Python releases; the files record the version that made them, and a test checks that this Python
still makes the same rows)."""

from __future__ import annotations

import importlib
import inspect
import json
import platform
import re
from pathlib import Path

LABEL_MODULES = ("math", "os", "str", "operator", "time", "random", "shutil")
SUMMARY_MODULES = (
    *LABEL_MODULES,
    "statistics",
    "re",
    "cmath",
    "os.path",
    "functools",
    "heapq",
    "bisect",
    "textwrap",
    "json",
)
_SIGNATURE = re.compile(r"^[\w.]+\(.*\)( -> .*)?$")


def first_sentence(doc: str) -> str | None:
    """The docstring's first paragraph that is not a signature line, on one line, cut after its
    first sentence; None when there is none or it is too short to be a description."""
    for para in doc.split("\n\n"):
        text = " ".join(para.split())
        if not text or _SIGNATURE.match(text):
            continue
        match = re.match(r"(.+?[.!?])(\s|$)", text)
        sentence = match.group(1) if match else text
        return sentence if len(sentence.split()) >= 4 else None
    return None


def module_functions(module: str) -> list[tuple[str, str]]:
    """(name, first sentence) of the public functions a module defines itself, sorted by name."""
    obj = str if module == "str" else importlib.import_module(module)
    own = {module, module.replace("os.path", "posixpath"), f"_{module}", "builtins", "posix"}
    out = []
    for name in sorted(dir(obj)):
        f = getattr(obj, name)
        if name.startswith("_") or inspect.isclass(f) or not callable(f):
            continue
        if module != "str" and getattr(f, "__module__", module) not in own:
            continue  # imported from elsewhere (os.path's names in os, say)
        sentence = first_sentence(inspect.getdoc(f) or "")
        if sentence:
            out.append((name, sentence))
    return out


def label_rows() -> list[dict]:
    rows, seen = [], set()
    for module in LABEL_MODULES:
        for _, sentence in module_functions(module):
            if sentence in seen:  # the same sentence under two modules cannot be labelled
                continue
            seen.add(sentence)
            rows.append({"prompt": f"Which Python module is this function from? {sentence}", "completion": module})
    return rows


def summary_rows() -> list[dict]:
    return [
        {"prompt": f"In one sentence, what does the Python function {module}.{name} do?", "completion": sentence}
        for module in SUMMARY_MODULES
        for name, sentence in module_functions(module)
    ]


PAIRS_FILE, PAIRS_ROWS, PAIRS_SEED = "order_pairs.jsonl", 900, 27


def write_example_data(folder: str | Path) -> dict[str, int]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from kiln.synthetic_pairs import generate_pairs

    made = {
        "stdlib_modules.jsonl": label_rows(),
        "stdlib_summaries.jsonl": summary_rows(),
        # preference pairs for the default order task (config/examples/orders-dpo.yaml)
        PAIRS_FILE: generate_pairs(PAIRS_ROWS, seed=PAIRS_SEED),
    }
    for name, rows in made.items():
        (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    (folder / "SOURCE.json").write_text(
        json.dumps(
            {
                "made_by": "python scripts/make_example_data.py",
                "python": platform.python_version(),
                "text": "docstrings of Python's standard library, first sentence of each public function",
                PAIRS_FILE: f"kiln.synthetic_pairs.generate_pairs({PAIRS_ROWS}, seed={PAIRS_SEED}): synthetic orders",
                "license": "PSF License Agreement for Python 2.0 (https://docs.python.org/3/license.html)",
                "rows": {name: len(rows) for name, rows in made.items()},
            },
            indent=2,
        )
        + "\n"
    )
    return {name: len(rows) for name, rows in made.items()}
