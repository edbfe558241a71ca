"""Clean one raw shard with pandas over Arrow strings: every text operation is one vectorised call
over all turns of the shard, not a Python loop over rows.

Every raw row ends in exactly one of two outputs: the clean shard, or the rejected shard with a
``reason`` (a short category) and a ``detail`` (what exactly was wrong).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import xxhash

from kiln.answers import answer_fast_pattern, check_answer, check_json_schema, json_schema_validator
from kiln.pairs import PREFERENCE_KINDS, answers_by_role, check_pairs
from kiln.rowfilter import QUERY_COLUMNS, FilterError, parse_filter
from kiln.spec import CleanSettings, is_type_map
from kiln.tables import CLEAN_SCHEMA, MESSAGES_TYPE, REJECTED_SCHEMA, download_record, skipped_record
from kiln.textfix import STRING, clean_text, mask_pii, per_row


class CleanError(ValueError):
    """A cleaning setting that cannot be applied (a bad query or pattern)."""


def content_hashes(messages: pa.ListArray) -> np.ndarray:
    """XXH3-128 of each row's turns (role and content), hex, over one joined UTF-8 string per row.

    A content address for dedup and caching (not a signature): 128 bits make an accidental
    collision negligible at any dataset size, and it hashes ~6x faster than BLAKE2b here.
    """
    flat = messages.flatten()
    pieces = pc.binary_join_element_wise(flat.field("role"), flat.field("content"), "\x1f")
    joined = pc.binary_join(pa.ListArray.from_arrays(messages.offsets, pieces, mask=messages.is_null()), "\x1e")
    digest = xxhash.xxh3_128_hexdigest
    return np.array([None if v is None else digest(v) for v in joined.cast(pa.binary()).to_pylist()], dtype=object)


class _Verdicts:
    """Each row's reason and detail (None while it is still in): the first rejection stands."""

    def __init__(self, n: int):
        self.reason = np.full(n, None, dtype=object)
        self.detail = np.full(n, None, dtype=object)

    @property
    def open(self) -> np.ndarray:
        return self.reason == None  # noqa: E711 (element-wise on an object array)

    def reject(self, mask: np.ndarray, why: str, what) -> None:
        mask = mask & self.open
        self.reason[mask] = why
        self.detail[mask] = what(mask) if callable(what) else what

    def reject_problems(self, rows, check) -> None:
        """Run ``check(i)`` (None or 'reason|detail') on each row of ``rows``."""
        for i in rows:
            problem = check(int(i))
            if problem:
                self.reason[i], self.detail[i] = problem.split("|", 1)


class _Shard:
    """One raw shard's turns flattened, and what each row measures after text cleaning."""

    def __init__(self, raw: pa.Table, opt: CleanSettings):
        self.raw, self.n = raw, raw.num_rows
        messages = raw.column("messages").combine_chunks()
        if isinstance(messages, pa.ChunkedArray) or self.n == 0:
            messages = pa.array([], type=MESSAGES_TYPE) if self.n == 0 else messages.chunk(0)
        self.messages = messages
        self.parent = pc.list_parent_indices(messages).to_numpy()
        flat = messages.flatten()
        self.examples: dict[str, list[dict]] = {}
        self.content, self.changed = clean_text(flat.field("content"), opt, self.examples)
        self.roles = flat.field("role")
        self.measure_chars()
        offsets = messages.offsets.to_numpy()
        self.n_turns = np.diff(offsets)
        has_turns = self.n_turns > 0
        self.n_user = self.per_row(pc.equal(self.roles, "user").to_numpy(zero_copy_only=False))
        any_turn = len(self.content) > 0
        last = pa.array(np.where(has_turns, offsets[1:] - 1, 0)) if any_turn else pa.array([], pa.int64())
        last_role = self.roles.take(last).to_numpy(zero_copy_only=False) if any_turn else None
        self.last_role = np.where(has_turns, last_role, None)
        self.last_content = self.content.take(last) if any_turn else pa.nulls(self.n, pa.string())
        last_len = pc.fill_null(pc.utf8_length(self.last_content), 0).to_numpy(zero_copy_only=False)
        self.last_len = np.where(has_turns, last_len, 0)
        self.kind = raw.column("kind").to_numpy(zero_copy_only=False)
        # Preference rows: each row's chosen and rejected answer (kiln.pairs)
        self.answers = answers_by_role(self.parent, self.roles, self.content, self.n)
        self.error = raw.column("error").to_numpy(zero_copy_only=False)

    def per_row(self, values) -> np.ndarray:
        return per_row(self.parent, values, self.n)

    def measure_chars(self) -> None:
        lengths = pc.fill_null(pc.utf8_length(self.content), 0).to_numpy(zero_copy_only=False)
        self.n_chars = self.per_row(lengths).astype(np.int64)

    def cleaned_messages(self) -> pa.ListArray:
        """The list column rebuilt with the cleaned strings and the same offsets."""
        struct = pa.StructArray.from_arrays([self.roles, self.content], names=["role", "content"])
        return pa.ListArray.from_arrays(self.messages.offsets, struct, mask=self.messages.is_null())


def _check_structure(shard: _Shard, v: _Verdicts, opt: CleanSettings) -> None:
    v.reject(shard.error != None, "unreadable", lambda m: shard.error[m])  # noqa: E711
    chat = shard.kind == "chat"
    v.reject(chat & (shard.n_user == 0), "missing_field", "no user turn")
    v.reject(chat & (shard.last_role != "assistant"), "missing_field", "the last turn is not an assistant answer")
    v.reject(chat & (shard.last_len == 0), "empty_answer", "the assistant answer is empty after cleaning")
    v.reject((shard.kind == "text") & (shard.n_chars == 0), "empty_text", "the text is empty after cleaning")
    check_pairs(shard, v)
    n_chars, lo, hi = shard.n_chars, opt.min_chars, opt.max_chars
    v.reject(n_chars < lo, "too_short", lambda m: [f"{c} chars < min_chars {lo}" for c in n_chars[m]])
    v.reject(n_chars > hi, "too_long", lambda m: [f"{c} chars > max_chars {hi}" for c in n_chars[m]])


def _check_drop_patterns(shard: _Shard, v: _Verdicts, opt: CleanSettings) -> None:
    for pattern in opt.drop_patterns:
        try:
            text = pd.Series(shard.content, dtype=STRING)
            hit = text.str.contains(pattern, regex=True).to_numpy(dtype=bool, na_value=False)
        except (pa.ArrowInvalid, re.error) as exc:
            raise CleanError(f"clean.drop_patterns: {pattern!r} is not a valid pattern: {exc}") from None
        v.reject(shard.per_row(hit) > 0, "drop_pattern", f"matches {pattern!r}")


def _check_query(shard: _Shard, v: _Verdicts, opt: CleanSettings) -> None:
    if not opt.query:
        return
    # A filter, never code: parsed by kiln.rowfilter (pandas' eval would run `@` names and calls).
    frame = {
        "n_chars": shard.n_chars,
        "n_turns": shard.n_turns,
        "kind": np.asarray(shard.kind, dtype=object),
        "source": shard.raw.column("source").to_numpy(zero_copy_only=False),
    }
    try:
        keep = parse_filter(opt.query, QUERY_COLUMNS)(frame)
    except FilterError as exc:
        raise CleanError(f"{exc}; columns available: {', '.join(QUERY_COLUMNS)}") from None
    except (TypeError, ValueError) as exc:  # e.g. a column compared with a value of another type
        raise CleanError(
            f"clean.query: {opt.query!r} cannot be evaluated ({type(exc).__name__}: {exc}); "
            f"columns available: {', '.join(QUERY_COLUMNS)}"
        ) from None
    v.reject(~keep, "query", f"fails query {opt.query!r}")


def _check_answers(shard: _Shard, v: _Verdicts, opt: CleanSettings) -> None:
    if not opt.answer_schema:
        return
    # A pair's or an unpaired row's chosen answer must meet the schema like an SFT answer; a rejected
    # answer is what the model should move away from (often the schema's failures), so it is not held to it.
    chosen = pa.array(shard.answers["chosen"], pa.string())
    pref = np.isin(shard.kind, PREFERENCE_KINDS) & ~pc.is_null(chosen).to_numpy(zero_copy_only=False)
    chat = (shard.kind == "chat") | pref
    answers = pc.if_else(pa.array(pref), chosen, shard.last_content) if shard.n else shard.last_content
    if not is_type_map(opt.answer_schema):
        validator = json_schema_validator(opt.answer_schema)
        v.reject_problems(np.flatnonzero(chat & v.open), lambda i: check_json_schema(answers[i].as_py(), validator))
        return
    pattern = answer_fast_pattern(opt.answer_schema)
    surely_ok = pc.fill_null(pc.match_substring_regex(answers, pattern), False).to_numpy(zero_copy_only=False)
    todo = np.flatnonzero(chat & v.open & ~surely_ok)
    v.reject_problems(todo, lambda i: check_answer(answers[i].as_py(), opt.answer_schema))


def _mask_pii(shard: _Shard, opt: CleanSettings) -> None:
    """PII masking after every check: a mask can't make a row the checks accept fail them (an
    answer-schema field holding a date was turned into [PHONE] and rejected)."""
    if not opt.mask_pii:
        return
    import phonenumbers

    if opt.pii_region not in phonenumbers.SUPPORTED_REGIONS:  # else local numbers go unmasked
        raise CleanError(f"clean.pii_region: {opt.pii_region!r} is not a region phonenumbers knows (US, GB, DE, …)")
    shard.content, shard.changed["pii"] = mask_pii(shard.content, opt.pii_region)
    shard.measure_chars()  # what is kept (bounds were checked before)


def _hash_and_dedup(shard: _Shard, v: _Verdicts, cleaned: pa.ListArray) -> np.ndarray:
    """Content hashes of the rows still in (only those are kept or compared); exact duplicates
    within the shard are rejected, the first occurrence stays."""
    kept_idx = np.flatnonzero(v.open)
    hashes = np.full(shard.n, None, dtype=object)
    kept_hashes = content_hashes(cleaned.take(pa.array(kept_idx, pa.int64())))
    hashes[kept_idx] = kept_hashes
    dup_mask = pd.Series(kept_hashes).duplicated(keep="first").to_numpy()
    if dup_mask.any():
        first_of = pd.Series(kept_idx[~dup_mask], index=kept_hashes[~dup_mask])
        dup, orig = kept_idx[dup_mask], first_of.loc[kept_hashes[dup_mask]].to_numpy()
        rows = shard.raw.column("row").to_numpy()
        ids = shard.raw.column("kiln_id").to_numpy(zero_copy_only=False)
        v.reason[dup] = "duplicate"
        v.detail[dup] = [f"same content as row {rows[j]} ({ids[j]}) of this file" for j in orig]
    return hashes


def _edits(shard: _Shard) -> np.ndarray:
    """Each row's cleaning steps that changed it, comma-joined ('' for none)."""
    names = list(shard.changed)
    edits = np.full(shard.n, "", dtype=object)
    if names:
        rows = np.stack([shard.per_row(shard.changed[k]) > 0 for k in names])
        for i in np.flatnonzero(rows.any(axis=0)):
            edits[i] = ",".join(k for k, hit in zip(names, rows[:, i]) if hit)
    return edits


def _tables(shard: _Shard, v: _Verdicts, cleaned, hashes, edits) -> tuple[pa.Table, pa.Table]:
    raw, keep_pa = shard.raw, pa.array(v.open)
    lineage = {name: raw.column(name) for name in ("kiln_id", "source", "file", "row")}
    clean = pa.table(
        {
            **lineage,
            "kind": raw.column("kind"),
            "messages": cleaned,
            "content_hash": pa.array(hashes, pa.string()),
            "n_chars": pa.array(shard.n_chars, pa.int64()),
            "edits": pa.array(edits, pa.string()),
        },
        schema=CLEAN_SCHEMA,
    ).filter(keep_pa)
    rejected = pa.table(
        {
            **lineage,
            "stage": pa.array(["clean"] * shard.n, pa.string()),
            "reason": pa.array(v.reason, pa.string()),
            "detail": pa.array(v.detail, pa.string()),
        },
        schema=REJECTED_SCHEMA,
    ).filter(pc.invert(keep_pa))
    return clean, rejected


# The checks in order: a row is rejected by the first that fails it.
CHECKS = (_check_structure, _check_drop_patterns, _check_query, _check_answers)


def clean_table(raw: pa.Table, settings: CleanSettings | None = None) -> tuple[pa.Table, pa.Table, dict]:
    """Clean a canonical raw table; return (clean, rejected, stats)."""
    opt = CleanSettings() if settings is None else settings
    shard, verdicts = _Shard(raw, opt), _Verdicts(raw.num_rows)
    for check in CHECKS:
        check(shard, verdicts, opt)
    _mask_pii(shard, opt)
    cleaned = shard.cleaned_messages()
    hashes = _hash_and_dedup(shard, verdicts, cleaned)
    clean, rejected = _tables(shard, verdicts, cleaned, hashes, _edits(shard))
    keep = verdicts.open
    by_reason = pd.Series(verdicts.reason[~keep], dtype=object).value_counts().to_dict()
    stats = {
        "rows_in": shard.n,
        "rows_clean": clean.num_rows,
        "rows_rejected": rejected.num_rows,
        "rejected_by_reason": {str(k): int(v) for k, v in sorted(by_reason.items())},
        "rows_edited_by": {k: int((shard.per_row(hit) > 0).sum()) for k, hit in shard.changed.items()},
        "chars_clean": int(shard.n_chars[keep].sum()),
        # Each cleaning step's first changes, before and after: a step that rewrites text it
        # should not shows in the data page before anyone trains on it.
        "examples_by_step": shard.examples,
    }
    assert stats["rows_in"] == stats["rows_clean"] + stats["rows_rejected"]
    return clean, rejected, stats


def clean_shard(
    raw_path: str | Path,
    clean_path: str | Path,
    rejected_path: str | Path,
    stats_path: str | Path,
    settings: CleanSettings,
) -> dict:
    # The original text stays in the raw shard (lineage reads it there): not read, not copied.
    columns = [name for name in pq.read_schema(raw_path).names if name != "raw"]
    clean, rejected, stats = clean_table(pq.read_table(raw_path, columns=columns), settings)
    for path, table in ((clean_path, clean), (rejected_path, rejected)):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
    Path(stats_path).parent.mkdir(parents=True, exist_ok=True)
    # A url shard's download (final URL, bytes, sha256), from the raw shard's metadata.
    stats["download"] = download_record(raw_path)
    stats["skipped_file"] = skipped_record(raw_path)  # set aside by on_bad_file: skip
    Path(stats_path).write_text(json.dumps({"raw": str(raw_path), **stats}, indent=2))
    return stats
