"""Cleaning never changes what a text means (issue 17): code keeps its indentation and the spaces in
its strings, Markdown keeps its fences, lists and tables, JSON/YAML keep their values; cleaning is
idempotent. Property tests over generated texts, and real ones: Python's own standard library
(module sources and docstrings with doctest examples)."""

from __future__ import annotations

import ast
import inspect
import json
import re
import textwrap

import pyarrow as pa
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.spec import CleanSettings
from kiln.textfix import clean_text


def clean(text: str) -> str:
    return clean_text(pa.array([text]), CleanSettings())[0][0].as_py()


def fenced_code(text: str) -> list[str]:
    return re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)


# ---- generated texts ------------------------------------------------------------------------------
words = st.text(alphabet="abcxyz  \t", min_size=1, max_size=12)  # runs of spaces and tabs inside
names = st.sampled_from(["x", "y", "total", "items", "f"])


@st.composite
def python_code(draw) -> str:
    """A small Python program: nested blocks, string literals holding runs of spaces, blank lines,
    trailing spaces, comments."""
    lines, depth = [], 0
    for _ in range(draw(st.integers(1, 8))):
        pad = "    " * depth
        kind = draw(st.sampled_from(["assign", "if", "for", "blank", "comment", "dedent"]))
        if kind == "assign":
            lines.append(f"{pad}{draw(names)} = {json.dumps(draw(words))}" + draw(st.sampled_from(["", "  ", "\t"])))
        elif kind in ("if", "for"):
            head = f"if {draw(names)}:" if kind == "if" else f"for {draw(names)} in range(3):"
            lines += [pad + head, pad + "    " + f"{draw(names)} = {json.dumps(draw(words))}"]
            depth += 1
        elif kind == "blank":
            lines += [""] * draw(st.integers(1, 4))
        elif kind == "comment":
            lines.append(f"{pad}# {draw(words)}")
        elif depth:
            depth -= 1
    return "\n".join(lines) or "x = 1"


@settings(max_examples=150, deadline=None)
@given(python_code(), st.sampled_from(["", "  \n", "\n\n"]), st.sampled_from(["", "  ", "\n\n\n"]))
def test_python_code_parses_the_same_after_cleaning(code, before, after):
    text = before + code + after
    out = clean(text)
    assert ast.dump(ast.parse(out)) == ast.dump(ast.parse(text))
    assert clean(out) == out  # idempotent


@settings(max_examples=150, deadline=None)
@given(python_code(), st.lists(words, min_size=1, max_size=4), st.sampled_from(["python", "js", ""]))
def test_markdown_keeps_fenced_code_lists_and_tables(code, prose, lang):
    bullets = "\n".join(f"- {p.strip() or 'item'}\n  - nested {i}" for i, p in enumerate(prose))
    table = "| name  | value |\n|---|---|\n| a  b | 1 |"
    text = f"{prose[0]}  \n\n\n\n```{lang}\n{code}  \n\n\n\n```\n\n{bullets}\n\n{table}\n"
    out = clean(text)
    assert fenced_code(out) == fenced_code(text)  # the block, byte for byte
    assert "  - nested 0" in out and "| a  b | 1 |" in out
    assert clean(out) == out


@settings(max_examples=150, deadline=None)
@given(
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), words),
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(words, inner, max_size=3)),
        max_leaves=8,
    ).filter(lambda v: isinstance(v, (dict, list)))
)
def test_json_and_yaml_values_are_equal_after_cleaning(value):
    for text in (json.dumps(value), json.dumps(value, indent=2) + "  \n\n", yaml.safe_dump({"root": value}) + "\n\n\n"):
        out = clean(text)
        loads = json.loads if text.lstrip().startswith(("{", "[")) else yaml.safe_load
        assert loads(out) == loads(text), (text, out)
        assert clean(out) == out


def test_the_issue_example_keeps_its_indentation():
    assert clean("if x:\n    y()") == "if x:\n    y()"
    # Prose is still tidied: runs of blanks, a stray space at a line start, blank-line runs, edges.
    assert clean("  Hello  world \n\n\n\n bye ") == "Hello world\n\nbye"


# ---- real texts: Python's standard library --------------------------------------------------------
REAL_MODULES = ["textwrap", "json", "argparse", "dataclasses", "statistics", "difflib", "string", "heapq"]


def test_real_module_sources_parse_the_same_after_cleaning():
    import importlib

    for name in REAL_MODULES:
        source = inspect.getsource(importlib.import_module(name))
        out = clean(source)
        assert ast.dump(ast.parse(out)) == ast.dump(ast.parse(source)), name
        assert clean(out) == out, name
        fenced = f"Here is `{name}`:\n\n```python\n{source}```\n\nThat is all.  "
        assert fenced_code(clean(fenced)) == [source], name


def test_real_docstrings_keep_their_indented_examples():
    """Docstrings with doctest examples and indented blocks (the corpus the issue found broken):
    every indented line keeps its indentation and its inner spaces."""
    import difflib
    import importlib

    checked = 0
    for name in REAL_MODULES:
        module = importlib.import_module(name)
        for _, obj in inspect.getmembers(module, lambda o: inspect.isfunction(o) or inspect.isclass(o)):
            doc = inspect.getdoc(obj)
            if not doc or not re.search(r"\n(?: {2,}|\t)\S", doc):
                continue
            out = clean(doc)
            want = [line.rstrip() for line in doc.splitlines() if line.startswith(("  ", "\t"))]
            got = [line for line in out.splitlines() if line.startswith(("  ", "\t"))]
            assert got == want, "".join(difflib.unified_diff(want, got))
            assert clean(out) == out
            checked += 1
    assert checked >= 20
    assert textwrap.dedent(clean("    a = 1\n    b = 2")) == "a = 1\nb = 2"


# Code in other languages: no parser here to compare, so every line must come back as it was,
# bar trailing whitespace (tabs in a Makefile recipe and Go, aligned SQL, a JS string with spaces).
SNIPPETS = {
    "makefile": "all: kiln\n\tgcc -O2 -o kiln main.c  \n\nclean:\n\trm -f kiln",
    "go": 'func main() {\n\tif x {\n\t\tfmt.Println("a  b")\n\t}\n}',
    "js": 'function f(a) {\n  const s = "two  spaces";\n  return a  +  s;\n}',
    "c": "int main(void) {\n    int  x = 1;   \n    return x;\n}",
    "sql": "SELECT name,\n       total\n  FROM orders\n WHERE city = 'New  York';",
    "yaml": "steps:\n  - run: make  test\n    env:\n      CI: 'true'",
}


def test_code_in_other_languages_keeps_every_line():
    for lang, code in SNIPPETS.items():
        for text in (code, f"Example ({lang}):\n\n```{lang}\n{code}\n```\n\n\n\nThat is it.  "):
            out = clean(text)
            for line in code.splitlines():  # byte for byte inside a fence; outside, bar trailing blanks
                assert line in out.splitlines() or line.rstrip() in out.splitlines(), (lang, line, out)
            assert clean(out) == out, lang
