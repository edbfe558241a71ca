"""Text fixes of the clean stage, over Arrow string arrays: Unicode form, HTML entities, control
characters, whitespace and PII masks, each reporting which turns it changed."""

from __future__ import annotations

import html
import json
import re
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from kiln.spec import CleanSettings

CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"
# Turns that may hold a phone number: a cheap Arrow regex finds them, `phonenumbers` decides.
PHONE_CANDIDATE = r"\+?\(?\d[\d\s().-]{5,}\d"
# A JSON string literal (the only place a JSON answer is masked: it stays valid, types unchanged).
JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


def per_row(parent: np.ndarray, flags, n: int) -> np.ndarray:
    """Sum a per-turn quantity into a per-row one."""
    return np.bincount(parent, weights=np.asarray(flags, dtype=np.float64), minlength=n)


# Each text operation first finds, in one vectorised pass, the turns it could change, then fixes
# only those: most real text needs no fixing, and a find is cheaper than a rewrite.
INNER_WHITESPACE = r"[\t\xa0\r]| {2}| \n|\n |\n{3}"
ANY_FIX = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f&\t\xa0\r]|\A\s|\s\z| {2}| \n|\n |\n{3}"


STRING = pd.ArrowDtype(pa.string())


def mask_text(text: str, region: str) -> str:
    """E-mail addresses -> [EMAIL]; phone numbers -> [PHONE], as `phonenumbers` finds them
    (leniency POSSIBLE: fictional and unassigned ranges are masked too). The regex used before
    took ISO dates and long order numbers for phones (2025-06-01 became [PHONE])."""
    import phonenumbers

    text = re.sub(EMAIL, "[EMAIL]", text)
    spans = [
        (m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.POSSIBLE)
    ]
    for start, end in reversed(spans):
        text = text[:start] + "[PHONE]" + text[end:]
    return text


def mask_turn(text: str, region: str) -> str:
    """A turn masked; a JSON answer only inside its string values, so it stays valid JSON of the
    same shape (a bare number is a number, not text, and stays)."""
    stripped = text.strip()
    if stripped[:1] in ("{", "["):
        try:
            json.loads(stripped)
        except ValueError:
            return mask_text(text, region)

        def one(m: re.Match) -> str:
            value = json.loads(m.group(0))
            masked = mask_text(value, region)
            return m.group(0) if masked == value else json.dumps(masked, ensure_ascii=False)

        return JSON_STRING.sub(one, text)
    return mask_text(text, region)


def mask_pii(content: pa.Array, region: str) -> tuple[pa.Array, np.ndarray]:
    """Mask every turn that may hold an e-mail address or a phone number; (content, changed flags)."""
    maybe = pc.fill_null(pc.match_substring_regex(content, f"{EMAIL}|{PHONE_CANDIDATE}"), False)
    idx = np.flatnonzero(maybe.to_numpy(zero_copy_only=False))
    flags = np.zeros(len(content), dtype=bool)
    if not len(idx):
        return content, flags
    before = content.take(pa.array(idx)).to_pylist()
    after = [mask_turn(t, region) for t in before]
    flags[idx[[a != b for a, b in zip(after, before)]]] = True
    return pc.replace_with_mask(content, maybe, pa.array(after, pa.string())), flags


def clean_text(content: pa.Array, settings) -> tuple[pa.Array, dict[str, np.ndarray]]:
    """Apply the text operations to an Arrow string array; return it and per-op change flags.
    (PII masking is separate, mask_pii: it runs after the answer checks.)

    One vectorised pass finds the turns any operation could change (most real text needs no
    fixing, and a find is cheaper than a rewrite); the operations then run, as Arrow compute
    kernels behind pandas' string methods, on those turns only, each again on the subset it could
    change, and the fixed strings go back into the full array once.
    """
    opt = CleanSettings.coerce(settings)
    content = content.cast(pa.string())
    n = len(content)
    check_unicode = opt.unicode_form != "none"

    def find(part: pa.Array) -> np.ndarray:
        hits = pc.fill_null(pc.match_substring_regex(part, ANY_FIX), False).to_numpy(zero_copy_only=False)
        if check_unicode:
            hits |= ~pc.fill_null(pc.string_is_ascii(part), True).to_numpy(zero_copy_only=False)
        return hits

    # The find reads every byte; Arrow kernels release the GIL, so two halves run on two cores.
    half = n // 2
    with ThreadPoolExecutor(2) as pool:
        suspects = np.concatenate(list(pool.map(find, [content.slice(0, half), content.slice(half)])))
    idx = np.flatnonzero(suspects)
    work = content.take(idx)
    flags: dict[str, np.ndarray] = {}

    def step(name: str, needs: np.ndarray, fix) -> None:
        nonlocal work
        hit = np.zeros(len(work), dtype=bool)
        where = np.flatnonzero(needs)
        if len(where):
            before = work.take(where)
            after = pa.array(fix(pd.Series(before, dtype=STRING)).array).cast(pa.string())
            diff = pc.fill_null(pc.not_equal(after, before), False).to_numpy(zero_copy_only=False)
            work = pc.replace_with_mask(work, pa.array(needs), after)
            hit[where[diff]] = True
        flags[name] = hit

    def has(pattern: str, regex: bool = True) -> np.ndarray:
        found = (pc.match_substring_regex if regex else pc.match_substring)(work, pattern)
        return pc.fill_null(found, False).to_numpy(zero_copy_only=False)

    if check_unicode:
        non_ascii = ~pc.fill_null(pc.string_is_ascii(work), True).to_numpy(zero_copy_only=False)
        step("unicode", non_ascii, lambda s: s.str.normalize(opt.unicode_form))
    if opt.html_unescape:
        step("html", has("&", regex=False), lambda s: s.map(html.unescape).astype(STRING))
    if opt.strip_control:
        step(
            "control",
            has(CONTROL + r"|\r"),
            lambda s: s.str.replace("\r\n", "\n", regex=False).str.replace(CONTROL, "", regex=True),
        )
    if opt.normalize_whitespace:
        # Runs inside the text need three regex rewrites; blank edges (far more common, and often
        # on long texts) need only a strip, so the two are found and fixed apart.
        inner = has(INNER_WHITESPACE)

        def fix_inner(s):
            # Match only runs that change (a tab, a no-break space, or 2+ blanks), not every space.
            s = s.str.replace(r"[\t\xa0][ \t\xa0]*| [ \t\xa0]+", " ", regex=True)
            s = s.str.replace(r"(?m) +$|^ +", "", regex=True)
            return s.str.replace(r"\n{3,}", "\n\n", regex=True).str.strip()

        step("whitespace", inner, fix_inner)
        inner_hit = flags["whitespace"]
        trimmed = pc.utf8_trim_whitespace(work)
        edges = pc.fill_null(pc.not_equal(pc.binary_length(trimmed), pc.binary_length(work)), False)
        edges = edges.to_numpy(zero_copy_only=False)
        if edges.any():
            work = pc.if_else(pa.array(edges), trimmed, work)
        flags["whitespace"] = inner_hit | edges
    changed = {}
    for name, hit in flags.items():
        full = np.zeros(n, dtype=bool)
        full[idx[hit]] = True
        changed[name] = full
    if any(hit.any() for hit in flags.values()):
        content = pc.replace_with_mask(content, pa.array(suspects), work)
    return content, changed
