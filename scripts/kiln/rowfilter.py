"""Row filters (``clean.query``) that cannot run code: parsed into a small whitelisted tree, then
evaluated over columns with NumPy. Nothing of the text is ever evaluated by Python.

The language is the part of pandas' query syntax a filter needs::

    n_turns <= 4 and kind == "chat"
    (n_chars > 20) & ~(source == "scraped")
    source in ["forum", "mail"] or contains(source, "docs")
    startswith(source, "web") and not endswith(source, "-old")   # also: matches(col, "regex")

Columns (names), numbers, strings, booleans and lists of them; comparisons (chained too),
``and``/``or``/``not`` and ``&``/``|``/``~``; the string predicates above. Anything else (an ``@``
variable, an attribute, a call of any other function, arithmetic) is refused with the position
and what is allowed. Why not pandas' ``DataFrame.query``/``eval``: they resolve ``@names`` against
Python scopes and allow attribute access and calls (``@pd.io.common.os.system(...)`` runs a shell
command). Why not a parser generator (lark, pyparsing): the standard library's ``ast`` already
parses this syntax exactly; Kiln only walks the tree it returns, refusing every other node.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass

PREDICATES = ("contains", "startswith", "endswith", "matches")
QUERY_COLUMNS = ("n_chars", "n_turns", "kind", "source")  # what the clean stage gives a query
_COMPARE = {ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.In: "in"}
_COMPARE[ast.NotIn] = "not in"


class FilterError(ValueError):
    """A filter that does not parse, or names a column that is not there."""


@dataclass(frozen=True)
class Filter:
    text: str
    tree: ast.expr
    columns: frozenset[str]

    def __call__(self, frame: dict) -> object:
        """A boolean NumPy array: one value per row of ``frame`` (column name -> array)."""
        import numpy as np

        return np.asarray(_eval(self.tree, frame), dtype=bool)


def _where(node: ast.AST) -> str:
    return f"at column {getattr(node, 'col_offset', 0) + 1}"


def _check(node: ast.AST, columns: set[str], text: str) -> None:
    allowed = "columns, numbers, strings, lists, comparisons, and/or/not, &/|/~, " + "/".join(PREDICATES)
    if isinstance(node, ast.BoolOp) or (isinstance(node, ast.BinOp) and isinstance(node.op, (ast.BitAnd, ast.BitOr))):
        for child in node.values if isinstance(node, ast.BoolOp) else (node.left, node.right):
            _check(child, columns, text)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.Invert, ast.USub)):
        _check(node.operand, columns, text)
    elif isinstance(node, ast.Compare):
        if not all(type(op) in _COMPARE for op in node.ops):
            raise FilterError(f"clean.query: {text!r}: that comparison is not allowed {_where(node)}")
        for child in (node.left, *node.comparators):
            _check(child, columns, text)
    elif isinstance(node, ast.Name):
        if node.id in ("True", "False"):
            return
        if node.id not in columns:
            raise FilterError(
                f"clean.query: {text!r}: '{node.id}' is not a column {_where(node)} "
                f"(columns: {', '.join(sorted(columns))})"
            )
    elif isinstance(node, ast.Constant):
        if not isinstance(node.value, (str, int, float, bool)) and node.value is not None:
            raise FilterError(f"clean.query: {text!r}: unsupported value {_where(node)}")
    elif isinstance(node, (ast.List, ast.Tuple)):
        for child in node.elts:
            if not isinstance(child, ast.Constant) or not isinstance(child.value, (str, int, float, bool)):
                raise FilterError(f"clean.query: {text!r}: a list may hold only numbers and strings {_where(child)}")
    elif isinstance(node, ast.Call):
        name = node.func.id if isinstance(node.func, ast.Name) else None
        if name not in PREDICATES or node.keywords or len(node.args) != 2:
            calls = ", ".join(f"{p}(column, 'text')" for p in PREDICATES)
            raise FilterError(f"clean.query: {text!r}: only {calls} may be called {_where(node)}")
        column, needle = node.args
        if not isinstance(column, ast.Name) or not (isinstance(needle, ast.Constant) and isinstance(needle.value, str)):
            raise FilterError(f"clean.query: {text!r}: {name}() takes a column and a string {_where(node)}")
        _check(column, columns, text)
        if name == "matches":
            try:
                re.compile(needle.value)
            except re.error as exc:
                raise FilterError(f"clean.query: {text!r}: matches(): bad pattern ({exc})") from None
    else:
        raise FilterError(f"clean.query: {text!r}: {type(node).__name__} is not allowed {_where(node)}; use {allowed}")


def parse_filter(text: str, columns) -> Filter:
    """Parse and check a filter against the columns it may name; FilterError says what is wrong."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except SyntaxError as exc:
        # pandas' query syntax writes `@name` for a Python variable: a filter reads only columns.
        hint = "; '@' variables are not supported (a filter reads only columns)" if "@" in text else ""
        where = f"column {exc.offset or 1}"
        raise FilterError(f"clean.query: {text!r} does not parse at {where}: {exc.msg}{hint}") from None
    _check(tree, set(columns), text)
    return Filter(text, tree, frozenset(columns))


def _eval(node: ast.AST, frame: dict):
    import numpy as np

    if isinstance(node, ast.BoolOp):
        parts = [np.asarray(_eval(v, frame), dtype=bool) for v in node.values]
        out = parts[0]
        for p in parts[1:]:
            out = out & p if isinstance(node.op, ast.And) else out | p
        return out
    if isinstance(node, ast.BinOp):
        left, right = np.asarray(_eval(node.left, frame), dtype=bool), np.asarray(_eval(node.right, frame), dtype=bool)
        return left & right if isinstance(node.op, ast.BitAnd) else left | right
    if isinstance(node, ast.UnaryOp):
        value = _eval(node.operand, frame)
        return -np.asarray(value) if isinstance(node.op, ast.USub) else ~np.asarray(value, dtype=bool)
    if isinstance(node, ast.Compare):
        out, left = True, _eval(node.left, frame)
        for op, comp in zip(node.ops, node.comparators):
            right = _eval(comp, frame)
            out = out & _compare(_COMPARE[type(op)], left, right)
            left = right
        return out
    if isinstance(node, ast.Name):
        return {"True": True, "False": False}.get(node.id, frame.get(node.id))
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        return [e.value for e in node.elts]
    if isinstance(node, ast.Call):
        column, needle = frame[node.args[0].id], node.args[1].value
        values = np.asarray(column, dtype=object)
        test = {
            "contains": lambda v: needle in v,
            "startswith": lambda v: v.startswith(needle),
            "endswith": lambda v: v.endswith(needle),
            "matches": re.compile(needle).search,
        }[node.func.id]
        return np.fromiter((isinstance(v, str) and bool(test(v)) for v in values), dtype=bool, count=len(values))
    raise FilterError(f"unexpected {type(node).__name__}")  # _check refused it already


def _compare(op: str, left, right):
    import numpy as np

    if op in ("in", "not in"):
        hit = np.isin(np.asarray(left, dtype=object), np.asarray(right, dtype=object))
        return hit if op == "in" else ~hit
    left, right = np.asarray(left), np.asarray(right)
    if left.dtype.kind not in "biuf" or right.dtype.kind not in "biuf":  # text: compare as objects
        left, right = left.astype(object), right.astype(object)
    return {
        "==": np.equal,
        "!=": np.not_equal,
        "<": np.less,
        "<=": np.less_equal,
        ">": np.greater,
        ">=": np.greater_equal,
    }[op](left, right).astype(bool)
