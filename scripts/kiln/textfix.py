"""Text fixes of the clean stage, over Arrow string arrays: Unicode form, HTML entities, control
characters, whitespace and PII masks, each reporting which turns it changed."""

from __future__ import annotations

import html
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from kiln.spec import CleanSettings

CONTROL = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"
EMAIL = r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"
PHONE = r"\+?\d[\d\s().-]{7,}\d"


def per_row(parent: np.ndarray, flags, n: int) -> np.ndarray:
    """Sum a per-turn quantity into a per-row one."""
    return np.bincount(parent, weights=np.asarray(flags, dtype=np.float64), minlength=n)


# Each text operation first finds, in one vectorised pass, the turns it could change, then fixes
# only those: most real text needs no fixing, and a find is cheaper than a rewrite.
INNER_WHITESPACE = r"[\t\xa0\r]| {2}| \n|\n |\n{3}"
ANY_FIX = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f&\t\xa0\r]|\A\s|\s\z| {2}| \n|\n |\n{3}"


STRING = pd.ArrowDtype(pa.string())


def clean_text(content: pa.Array, settings) -> tuple[pa.Array, dict[str, np.ndarray]]:
    """Apply the text operations to an Arrow string array; return it and per-op change flags.

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
    if opt.mask_pii:
        suspects = np.ones(n, dtype=bool)
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
    if opt.mask_pii:
        step(
            "pii",
            has(f"{EMAIL}|{PHONE}"),
            lambda s: s.str.replace(EMAIL, "[EMAIL]", regex=True).str.replace(PHONE, "[PHONE]", regex=True),
        )
    changed = {}
    for name, hit in flags.items():
        full = np.zeros(n, dtype=bool)
        full[idx[hit]] = True
        changed[name] = full
    if any(hit.any() for hit in flags.values()):
        content = pc.replace_with_mask(content, pa.array(suspects), work)
    return content, changed
