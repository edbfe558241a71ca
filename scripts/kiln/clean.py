"""Clean one raw shard with pandas over Arrow strings: every text operation is one vectorised call
over all turns of the shard, not a Python loop over rows.

Every raw row ends in exactly one of two outputs: the clean shard, or the rejected shard with a
``reason`` (a short category) and a ``detail`` (what exactly was wrong).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import html
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kiln.records import MESSAGES_TYPE

CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"
PHONE = r"\+?\d[\d\s().-]{7,}\d"

CLEAN_SCHEMA = pa.schema(
    [
        ("kiln_id", pa.string()),
        ("source", pa.string()),
        ("file", pa.string()),
        ("row", pa.int64()),
        ("kind", pa.string()),
        ("messages", MESSAGES_TYPE),
        ("content_hash", pa.string()),
        ("n_chars", pa.int64()),
        ("edits", pa.string()),
    ]
)
REJECTED_SCHEMA = pa.schema(
    [
        ("kiln_id", pa.string()),
        ("source", pa.string()),
        ("file", pa.string()),
        ("row", pa.int64()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.string()),
    ]
)

DEFAULTS = {
    "unicode_form": "NFC",
    "html_unescape": True,
    "strip_control": True,
    "normalize_whitespace": True,
    "min_chars": 1,
    "max_chars": 20000,
    "mask_pii": False,
    "drop_patterns": [],
    "query": "",
    "answer_schema": None,
}


class CleanError(ValueError):
    """A cleaning setting that cannot be applied (a bad query or pattern)."""


def _per_row(parent: np.ndarray, flags, n: int) -> np.ndarray:
    """Sum a per-turn quantity into a per-row one."""
    return np.bincount(parent, weights=np.asarray(flags, dtype=np.float64), minlength=n)


def clean_text(content: pd.Series, settings: dict) -> tuple[pd.Series, dict[str, np.ndarray]]:
    """Apply the text operations to a Series of Arrow strings; return it and per-op change flags."""
    changed: dict[str, np.ndarray] = {}

    def step(name: str, new: pd.Series) -> pd.Series:
        changed[name] = (new != content).to_numpy(dtype=bool, na_value=False)
        return new

    if settings["unicode_form"] != "none":
        content = step("unicode", content.str.normalize(settings["unicode_form"]))
    if settings["html_unescape"]:
        has_entity = content.str.contains("&", regex=False).to_numpy(dtype=bool, na_value=False)
        new = content.copy()
        if has_entity.any():
            new[has_entity] = content[has_entity].map(html.unescape)
        content = step("html", new)
    if settings["strip_control"]:
        new = content.str.replace("\r\n", "\n", regex=False)
        content = step("control", new.str.replace(CONTROL, "", regex=True))
    if settings["normalize_whitespace"]:
        new = content.str.replace(r"[ \t\xa0]+", " ", regex=True)
        new = new.str.replace(r"(?m) +$|^ +", "", regex=True)
        new = new.str.replace(r"\n{3,}", "\n\n", regex=True).str.strip()
        content = step("whitespace", new)
    if settings["mask_pii"]:
        new = content.str.replace(EMAIL, "[EMAIL]", regex=True)
        content = step("pii", new.str.replace(PHONE, "[PHONE]", regex=True))
    return content, changed


def _check_answer(answer: str, schema: dict) -> str | None:
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


def _is_date(value: str) -> bool:
    try:
        dt.date.fromisoformat(value)
        return bool(re.fullmatch(r"\d{4}-\d{2}-\d{2}", value))
    except ValueError:
        return False


def content_hashes(messages: pa.ListArray) -> list[str | None]:
    """sha256 of each row's turns (role and content), computed on one joined string per row."""
    flat = messages.flatten()
    pieces = pc.binary_join_element_wise(flat.field("role"), flat.field("content"), "\x1f")
    joined = pc.binary_join(pa.ListArray.from_arrays(messages.offsets, pieces, mask=messages.is_null()), "\x1e")
    return [
        None if s is None else hashlib.sha256(s.encode("utf-8", "surrogatepass")).hexdigest()
        for s in joined.to_pylist()
    ]


def clean_table(raw: pa.Table, settings: dict | None = None) -> tuple[pa.Table, pa.Table, dict]:
    """Clean a canonical raw table; return (clean, rejected, stats)."""
    settings = {**DEFAULTS, **(settings or {})}
    n = raw.num_rows
    messages = raw.column("messages").combine_chunks()
    if isinstance(messages, pa.ChunkedArray) or n == 0:
        messages = pa.array([], type=MESSAGES_TYPE) if n == 0 else messages.chunk(0)
    parent = pc.list_parent_indices(messages).to_numpy()
    flat = messages.flatten()
    turns = pd.DataFrame(
        {
            "role": pd.Series(flat.field("role"), dtype=pd.ArrowDtype(pa.string())),
            "content": pd.Series(flat.field("content"), dtype=pd.ArrowDtype(pa.string())),
        }
    )
    content, changed = clean_text(turns["content"], settings)

    # Rebuild the list column with the cleaned strings and the same offsets.
    new_struct = pa.StructArray.from_arrays(
        [flat.field("role"), pa.array(content.array._pa_array.combine_chunks(), pa.string())], names=["role", "content"]
    )
    cleaned = pa.ListArray.from_arrays(messages.offsets, new_struct, mask=messages.is_null())

    lengths = content.str.len().fillna(0).to_numpy(dtype=np.int64)
    n_chars = _per_row(parent, lengths, n).astype(np.int64)
    n_turns = np.diff(messages.offsets.to_numpy())
    roles = turns["role"].to_numpy(dtype=object)
    n_user = _per_row(parent, roles == "user", n)
    last = messages.offsets.to_numpy()[1:] - 1
    has_turns = n_turns > 0
    last_role = np.where(has_turns, roles[np.clip(last, 0, None)] if len(roles) else None, None)
    content_np = content.to_numpy(dtype=object, na_value="")
    last_content = np.where(has_turns, content_np[np.clip(last, 0, None)] if len(roles) else "", "")

    kind = raw.column("kind").to_numpy(zero_copy_only=False)
    error = raw.column("error").to_numpy(zero_copy_only=False)
    reason = np.full(n, None, dtype=object)
    detail = np.full(n, None, dtype=object)

    def reject(mask: np.ndarray, why: str, what) -> None:
        mask = mask & (reason == None)  # noqa: E711 (element-wise on an object array)
        reason[mask] = why
        detail[mask] = what(mask) if callable(what) else what

    reject(error != None, "unreadable", lambda m: error[m])  # noqa: E711
    chat = kind == "chat"
    reject(chat & (n_user == 0), "missing_field", "no user turn")
    reject(chat & (last_role != "assistant"), "missing_field", "the last turn is not an assistant answer")
    reject(
        chat & (np.char.str_len(last_content.astype(str)) == 0),
        "empty_answer",
        "the assistant answer is empty after cleaning",
    )
    reject((kind == "text") & (n_chars == 0), "empty_text", "the text is empty after cleaning")
    reject(
        n_chars < settings["min_chars"],
        "too_short",
        lambda m: [f"{c} chars < min_chars {settings['min_chars']}" for c in n_chars[m]],
    )
    reject(
        n_chars > settings["max_chars"],
        "too_long",
        lambda m: [f"{c} chars > max_chars {settings['max_chars']}" for c in n_chars[m]],
    )
    for pattern in settings["drop_patterns"]:
        try:
            hit = content.str.contains(pattern, regex=True).to_numpy(dtype=bool, na_value=False)
        except (pa.ArrowInvalid, re.error) as exc:
            raise CleanError(f"clean.drop_patterns: {pattern!r} is not a valid pattern: {exc}") from None
        reject(_per_row(parent, hit, n) > 0, "drop_pattern", f"matches {pattern!r}")
    if settings["query"]:
        frame = pd.DataFrame(
            {
                "n_chars": n_chars,
                "n_turns": n_turns,
                "kind": kind,
                "source": raw.column("source").to_numpy(zero_copy_only=False),
            }
        )
        try:
            keep = frame.eval(settings["query"]).to_numpy(dtype=bool)
        except Exception as exc:  # pandas raises many types for a bad expression
            raise CleanError(
                f"clean.query: {settings['query']!r} cannot be evaluated ({type(exc).__name__}: {exc}); "
                f"columns available: {', '.join(frame.columns)}"
            ) from None
        reject(~keep, "query", f"fails query {settings['query']!r}")
    if settings["answer_schema"]:
        todo = np.flatnonzero(chat & (reason == None))  # noqa: E711
        for i in todo:
            problem = _check_answer(last_content[i], settings["answer_schema"])
            if problem:
                reason[i], detail[i] = problem.split("|", 1)

    hashes = np.array(content_hashes(cleaned), dtype=object)
    kept_idx = np.flatnonzero(reason == None)  # noqa: E711
    first_of = {}
    rows = raw.column("row").to_numpy()
    ids = raw.column("kiln_id").to_numpy(zero_copy_only=False)
    for i in kept_idx:
        h = hashes[i]
        if h in first_of:
            j = first_of[h]
            reason[i], detail[i] = "duplicate", f"same content as row {rows[j]} ({ids[j]}) of this file"
        else:
            first_of[h] = i

    edit_names = list(changed)
    edit_rows = np.stack([_per_row(parent, changed[k], n) > 0 for k in edit_names]) if edit_names else None
    edits = [",".join(k for k, hit in zip(edit_names, edit_rows[:, i]) if hit) if edit_names else "" for i in range(n)]

    keep = reason == None  # noqa: E711
    keep_pa = pa.array(keep)
    clean = pa.table(
        {
            "kiln_id": raw.column("kiln_id"),
            "source": raw.column("source"),
            "file": raw.column("file"),
            "row": raw.column("row"),
            "kind": raw.column("kind"),
            "messages": cleaned,
            "content_hash": pa.array(hashes, pa.string()),
            "n_chars": pa.array(n_chars, pa.int64()),
            "edits": pa.array(edits, pa.string()),
        },
        schema=CLEAN_SCHEMA,
    ).filter(keep_pa)
    rejected = pa.table(
        {
            "kiln_id": raw.column("kiln_id"),
            "source": raw.column("source"),
            "file": raw.column("file"),
            "row": raw.column("row"),
            "stage": pa.array(["clean"] * n, pa.string()),
            "reason": pa.array(reason, pa.string()),
            "detail": pa.array(detail, pa.string()),
            "raw": raw.column("raw"),
        },
        schema=REJECTED_SCHEMA,
    ).filter(pc.invert(keep_pa))
    by_reason = pd.Series(reason[~keep], dtype=object).value_counts().to_dict()
    stats = {
        "rows_in": n,
        "rows_clean": clean.num_rows,
        "rows_rejected": rejected.num_rows,
        "rejected_by_reason": {str(k): int(v) for k, v in sorted(by_reason.items())},
        "rows_edited_by": {k: int((_per_row(parent, changed[k], n) > 0).sum()) for k in edit_names},
        "chars_clean": int(n_chars[keep].sum()),
    }
    assert stats["rows_in"] == stats["rows_clean"] + stats["rows_rejected"]
    return clean, rejected, stats


def clean_shard(
    raw_path: str | Path, clean_path: str | Path, rejected_path: str | Path, stats_path: str | Path, settings: dict
) -> dict:
    clean, rejected, stats = clean_table(pq.read_table(raw_path), settings)
    for path, table in ((clean_path, clean), (rejected_path, rejected)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    Path(stats_path).parent.mkdir(parents=True, exist_ok=True)
    Path(stats_path).write_text(json.dumps({"raw": str(raw_path), **stats}, indent=2))
    return stats
