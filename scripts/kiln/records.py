"""Map the record formats people fine-tune on onto one canonical form.

Canonical form: ``kind`` is ``chat`` (a list of ``{"role", "content"}`` turns, roles ``system``,
``user``, ``assistant``) or ``text`` (one turn whose role is ``text``).
"""

from __future__ import annotations

import hashlib
import json

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}


class RecordError(ValueError):
    """A row that cannot be mapped; ``field`` names the field at fault."""

    def __init__(self, field: str, message: str):
        super().__init__(f"field '{field}': {message}")
        self.field = field


def detect_format(record: dict, columns: dict) -> str:
    """Pick a format from the keys a record has (after applying the column mapping)."""
    keys = {canon for canon, col in _mapping(columns).items() if col in record}
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise RecordError(
        "(record)",
        f"no known format matches keys {sorted(record)[:12]}; expected messages, conversations, "
        "instruction+output, prompt+completion or text (or set `columns:` on the source)",
    )


_CANONICAL_FIELDS = (
    "messages",
    "conversations",
    "instruction",
    "input",
    "output",
    "system",
    "prompt",
    "completion",
    "text",
)


def _mapping(columns: dict) -> dict:
    return {f: columns.get(f, f) for f in _CANONICAL_FIELDS}


def _string(record: dict, col: str, *, required: bool = True) -> str | None:
    value = record.get(col)
    if value is None:
        if required:
            raise RecordError(col, "is null" if col in record else "missing")
        return None
    if not isinstance(value, str):
        raise RecordError(col, f"expected a string, got {type(value).__name__}")
    return value


def _content(value, field: str) -> str:
    """A turn's text: a string, or OpenAI's list of content parts (``[{"type": "text", "text": …}]``,
    the parts' texts joined). Parts that are not text (images, audio) can't be trained on here."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        texts = []
        for j, part in enumerate(value):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text" or not isinstance(part.get("text"), str):
                raise RecordError(
                    f"{field}[{j}]",
                    f"content part of type {kind!r} is not supported (only text parts: "
                    '{"type": "text", "text": "..."})',
                )
            texts.append(part["text"])
        return "".join(texts)
    if value is None:
        raise RecordError(field, "is null (expected a string or a list of text parts)")
    raise RecordError(field, f"expected a string or a list of text parts, got {type(value).__name__}")


def _turns(value, col: str, role_key: str, content_key: str, roles: dict) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise RecordError(col, "expected a non-empty list of turns")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RecordError(f"{col}[{i}]", f"expected an object, got {type(turn).__name__}")
        role = turn.get(role_key)
        if role not in roles:
            raise RecordError(f"{col}[{i}].{role_key}", f"unknown role {role!r}")
        content = _content(turn.get(content_key), f"{col}[{i}].{content_key}")
        turns.append({"role": roles[role], "content": content})
    return turns


def to_canonical(record: dict, fmt: str = "auto", columns: dict | None = None) -> tuple[str, str, list[dict]]:
    """Return (format, kind, turns) for one record, or raise RecordError naming the field."""
    if not isinstance(record, dict):
        raise RecordError("(record)", f"expected a JSON object, got {type(record).__name__}")
    m = _mapping(columns or {})
    if fmt == "auto":
        fmt = detect_format(record, columns or {})
    if fmt == "messages":
        turns = _turns(record.get(m["messages"]), m["messages"], "role", "content", {r: r for r in ROLES})
    elif fmt == "sharegpt":
        turns = _turns(record.get(m["conversations"]), m["conversations"], "from", "value", SHAREGPT_ROLES)
    elif fmt == "alpaca":
        instruction = _string(record, m["instruction"])
        extra = _string(record, m["input"], required=False)
        system = _string(record, m["system"], required=False)
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        turns = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user},
            {"role": "assistant", "content": _string(record, m["output"])},
        ]
    elif fmt == "prompt_completion":
        turns = [
            {"role": "user", "content": _string(record, m["prompt"])},
            {"role": "assistant", "content": _string(record, m["completion"])},
        ]
    elif fmt == "text":
        return fmt, "text", [{"role": "text", "content": _string(record, m["text"])}]
    else:
        raise RecordError("format", f"unknown format {fmt!r}")
    return fmt, "chat", turns


def stable_id(kind: str, turns: list[dict] | None, raw: str | None = None) -> str:
    """A content hash: the same record gets the same id wherever and whenever it is read."""
    payload = json.dumps([kind, turns], ensure_ascii=False, separators=(",", ":")) if turns else raw
    return hashlib.sha256((payload or "").encode("utf-8", "surrogatepass")).hexdigest()[:16]
