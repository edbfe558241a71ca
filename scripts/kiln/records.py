"""Map the record formats people fine-tune on onto one canonical form.

Canonical form: ``kind`` is ``chat`` (a list of ``{"role", "content"}`` turns, roles ``system``,
``user``, ``assistant``) or ``text`` (one turn whose role is ``text``); preference data (kiln.pairs)
is ``preference`` (the prompt's turns, then a ``chosen`` and a ``rejected`` turn) or ``unpaired``
(the prompt's turns, then one ``chosen`` or ``rejected`` turn: KTO's label).
"""

from __future__ import annotations

import hashlib
import json

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text", "preference", "unpaired")
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
    if "chosen" in keys and "rejected" in keys:
        return "preference"
    if "completion" in keys and "label" in keys:
        return "unpaired"
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
        "instruction+output, prompt+completion, text, chosen+rejected (preference pairs) or "
        "prompt+completion+label (KTO) (or set `columns:` on the source)",
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
    "chosen",
    "rejected",
    "label",
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


# ---- preference records (issue 27; what the extra roles mean: kiln.pairs) ---------------------
def _error(field: str, message: str) -> RecordError:
    return RecordError(field, message)


def _chat_turns(value, col: str) -> list[dict]:
    return _turns(value, col, "role", "content", {r: r for r in ROLES})


def _prompt(record: dict, m: dict) -> list[dict]:
    """The prompt's turns: ``prompt`` (a string is one user turn) or a ``messages`` prefix."""
    if m["prompt"] in record and record[m["prompt"]] is not None:
        value, col = record[m["prompt"]], m["prompt"]
    elif m["messages"] in record:
        value, col = record[m["messages"]], m["messages"]
    else:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    turns = _chat_turns(value, col)
    if turns[-1]["role"] == "assistant":
        raise _error(f"{col}[{len(turns) - 1}]", "the prompt ends with an assistant turn; the answers come after it")
    return turns


def _answer(value, col: str) -> str:
    """One answer: a string, or a list of exactly one assistant turn."""
    if isinstance(value, str):
        return value
    turns = _chat_turns(value, col)
    if len(turns) != 1 or turns[0]["role"] != "assistant":
        raise _error(col, "expected the answer as a string or one assistant turn (the prompt goes in `prompt`)")
    return turns[0]["content"]


def _implicit(record: dict, m: dict) -> tuple[list[dict], str, str]:
    """Whole conversations for chosen and rejected: the prompt is the turns they share, and each
    must go on by exactly one assistant turn."""
    chosen, rejected = _chat_turns(record[m["chosen"]], m["chosen"]), _chat_turns(record[m["rejected"]], m["rejected"])
    prefix = chosen[:-1]
    if rejected[:-1] != prefix:
        raise _error(m["rejected"], "chosen and rejected conversations must share every turn but the last (the prompt)")
    for col, turns in ((m["chosen"], chosen), (m["rejected"], rejected)):
        if turns[-1]["role"] != "assistant":
            raise _error(f"{col}[{len(turns) - 1}].role", "the last turn must be the assistant's answer")
    if not prefix:
        raise _error(m["chosen"], "a conversation with no prompt turn before the answer; give `prompt`")
    return prefix, chosen[-1]["content"], rejected[-1]["content"]


def preference_turns(record: dict, m: dict) -> list[dict]:
    """A pair's canonical turns: the prompt's, then the chosen and the rejected answer."""
    for col in (m["chosen"], m["rejected"]):
        if record.get(col) is None:
            raise _error(col, "is null" if col in record else "missing")
    prompt = _prompt(record, m)
    if prompt:
        chosen, rejected = _answer(record[m["chosen"]], m["chosen"]), _answer(record[m["rejected"]], m["rejected"])
    elif isinstance(record[m["chosen"]], str):
        raise _error(m["prompt"], "missing: a pair of plain answers needs the prompt they answer")
    else:
        prompt, chosen, rejected = _implicit(record, m)
    return prompt + [{"role": "chosen", "content": chosen}, {"role": "rejected", "content": rejected}]


def unpaired_turns(record: dict, m: dict) -> list[dict]:
    """KTO's unpaired example: the prompt's turns, then the completion as chosen (label true) or
    rejected (label false)."""
    label = record.get(m["label"])
    if not isinstance(label, bool):
        raise _error(m["label"], f"expected true (desirable) or false (undesirable), got {label!r}")
    if record.get(m["completion"]) is None:
        raise _error(m["completion"], "is null" if m["completion"] in record else "missing")
    prompt = _prompt(record, m)
    if not prompt:
        raise _error(m["prompt"], "missing: an unpaired completion needs the prompt it answers")
    answer = _answer(record[m["completion"]], m["completion"])
    return prompt + [{"role": "chosen" if label else "rejected", "content": answer}]


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
    elif fmt == "preference":
        return fmt, "preference", preference_turns(record, m)
    elif fmt == "unpaired":
        return fmt, "unpaired", unpaired_turns(record, m)
    elif fmt == "text":
        return fmt, "text", [{"role": "text", "content": _string(record, m["text"])}]
    else:
        raise RecordError("format", f"unknown format {fmt!r}")
    return fmt, "chat", turns


def stable_id(kind: str, turns: list[dict] | None, raw: str | None = None) -> str:
    """A content hash: the same record gets the same id wherever and whenever it is read."""
    payload = json.dumps([kind, turns], ensure_ascii=False, separators=(",", ":")) if turns else raw
    return hashlib.sha256((payload or "").encode("utf-8", "surrogatepass")).hexdigest()[:16]
