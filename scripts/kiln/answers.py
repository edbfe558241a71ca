"""What an answer must be: the dataset's answer schema (a JSON Schema, or the shorthand
{field: type}) checked on training rows (the clean stage), and as a JSON Schema for schema-bound
serving (llama.cpp's response_format)."""

from __future__ import annotations

import datetime as dt
import json
import re

from kiln.spec import is_type_map

_JSON_STRING = r'"(?:[^"\\\x00-\x1f]|\\["\\/bfnrt]|\\u[0-9a-fA-F]{4})*"'
_JSON_VALUE = {
    "string": _JSON_STRING,
    "integer": r"-?(?:0|[1-9][0-9]*)",
    "number": r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?",
    "boolean": r"(?:true|false)",
    # Every day that exists in every year; February 29th is left to the exact check.
    "date": r'"[0-9]{4}-(?:(?:0[1-9]|1[0-2])-(?:0[1-9]|1[0-9]|2[0-8])'
    r'|(?:0[13-9]|1[0-2])-(?:29|30)|(?:0[13578]|1[02])-31)"',
}


def answer_fast_pattern(schema: dict) -> str:
    """A regular expression that only well-formed answers match: the schema's fields in order.

    A match proves the answer passes the exact check; a miss proves nothing and goes to it.
    """
    ws = r"[ \t\n\r]*"
    fields = f"{ws},{ws}".join(f'"{re.escape(k)}"{ws}:{ws}{_JSON_VALUE[t]}' for k, t in schema.items())
    return rf"\A{ws}\{{{ws}{fields}{ws}\}}{ws}\z"


def check_answer(answer: str, schema: dict) -> str | None:
    """None if ``answer`` is a JSON object with exactly the schema's fields and types."""
    try:
        obj = json.loads(answer)
    except json.JSONDecodeError as exc:
        return f"invalid_json|answer is not valid JSON ({exc.msg} at column {exc.colno})"
    if not isinstance(obj, dict):
        return f"invalid_json|answer is a JSON {type(obj).__name__}, not an object"
    missing = [k for k in schema if k not in obj]
    extra = [k for k in obj if k not in schema]
    if missing or extra:
        return f"answer_schema|missing fields {missing}, unexpected fields {extra}"
    for key, kind in schema.items():
        value = obj[key]
        ok = {
            "string": isinstance(value, str),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, (int, float)) and not isinstance(value, bool),
            "boolean": isinstance(value, bool),
            "date": isinstance(value, str) and _is_date(value),
        }[kind]
        if not ok:
            return f"answer_schema|field '{key}': expected {kind}, got {type(value).__name__} {value!r}"
    return None


def json_schema_validator(schema: dict):
    """A jsonschema validator for `schema` (its own draft), with format checks (`date` included)."""
    import jsonschema

    cls = jsonschema.validators.validator_for(schema)
    return cls(schema, format_checker=cls.FORMAT_CHECKER)


def check_json_schema(answer: str, validator) -> str | None:
    """None if ``answer`` parses as JSON and satisfies the schema; else reason|detail naming where."""
    try:
        obj = json.loads(answer)
    except json.JSONDecodeError as exc:
        return f"invalid_json|answer is not valid JSON ({exc.msg} at column {exc.colno})"
    error = next(iter(sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))), None)
    if error is None:
        return None
    where = "/".join(map(str, error.absolute_path))
    return f"answer_schema|{f'field {where!r}' if where else 'the answer'}: {error.message}"


def _is_date(value: str) -> bool:
    try:
        dt.date.fromisoformat(value)
        return bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", value))
    except ValueError:
        return False


def answer_json_schema(schema: dict | None) -> dict | None:
    """The dataset's answer schema as a JSON Schema (the shorthand {field: type} expanded)."""
    if not schema:
        return None
    if not is_type_map(schema):
        return schema
    types = {"date": {"type": "string", "format": "date"}}
    return {
        "type": "object",
        "properties": {k: types.get(t, {"type": t}) for k, t in schema.items()},
        "required": list(schema),
        "additionalProperties": False,
    }
