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
# Text whose whitespace carries meaning (issue 17): a fenced code block, a <pre> block, a Markdown
# table, or lines indented (2+ spaces or a tab) under another line (code, YAML, nested lists; one
# stray space is a typo, and is fixed like prose). Only trailing whitespace,
# runs of blank lines outside the blocks and blank lines at the edges are touched there.
CODE_BEARING = r"(?m)^[ \t]*(?:```|~~~)|<[Pp][Rr][Ee][\s>]|^[ \t]*\|.*\|[ \t]*$|\n(?: {2,}|\t)[ \t]*\S"
# JSON (an object or array): spaces inside its strings are values; its whitespace is kept too.
JSON_LIKE = r"\A\s*(?:\{[\s\S]*\}|\[[\s\S]*\])\s*\z"
# A quoted span holding a run of blanks ("a  b", 'x\t'): a string literal of one-line code, or a
# quotation; its spaces are its value, so the turn keeps its inner whitespace.
QUOTED_RUN = r""""[^"\n]*(?: {2}|\t)[^"\n]*"|'[^'\n]*(?: {2}|\t)[^'\n]*'"""
# YAML-shaped lines (`key: value`, `- item`): a mapping or list whose values hold their spaces.
YAML_LIKE = r"(?m)^[ \t]*(?:- |[\w\"'.-]+:(?: |$))"
_FENCE = re.compile(r"^[ \t]*(```|~~~)")
EXAMPLE_CHARS = 300  # of each before/after example a cleaning step keeps for the stats
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


def normalize_code_bearing(text: str) -> str:
    """Whitespace of a text whose layout means something: trailing whitespace goes and blank-line
    runs shrink to one, outside fenced and <pre> blocks (untouched); indentation and the spaces
    inside a line stay, so code parses the same and JSON/YAML values are equal."""
    out: list[str] = []
    fence, pre = None, False
    for line in text.split("\n"):
        if fence:
            out.append(line)
            if line.lstrip().startswith(fence):
                fence = None
            continue
        if pre:
            out.append(line)
            pre = "</pre>" not in line.lower()
            continue
        opened = _FENCE.match(line)
        if opened:
            fence = opened.group(1)
        elif "<pre" in line.lower() and "</pre>" not in line.lower():
            pre = True
        line = line if pre else line.rstrip()
        if not line and out and not out[-1] and not fence:
            continue  # at most one blank line
        out.append(line)
    while out and not out[0].strip():
        out.pop(0)
    text = "\n".join(out)
    return text if fence or pre else text.rstrip()


def _python(text: str):
    import ast

    return ast.dump(ast.parse(text))


def _structured_yaml(text: str):
    import yaml

    value = yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    if not isinstance(value, (dict, list)):
        raise ValueError("a YAML scalar: prose, not data")
    return value


def same_meaning(before: str, after: str) -> bool:
    """Whether `after` means what `before` does, for the languages a text may be written in: if
    `before` parses as Python (its AST), JSON or structured YAML (their values), `after` must parse
    to the same. Text in none of them (prose) has no parse to keep."""
    for parse in (_python, json.loads, _structured_yaml):
        try:
            want = parse(before)
        except Exception:  # noqa: BLE001 - not written in this language
            continue
        try:
            return parse(after) == want
        except Exception:  # noqa: BLE001
            return False
    return True


def normalize_layout_text(text: str) -> str:
    """normalize_code_bearing, kept only where the text means the same afterwards (a blank-line run
    inside a Python docstring or a YAML block scalar is part of a value): else only the trailing
    whitespace at its very end goes, and if even that changes it, the text stays as it is."""
    for candidate in (normalize_code_bearing(text), text.rstrip()):
        if candidate == text or same_meaning(text, candidate):
            return candidate
    return text


def clean_text(
    content: pa.Array, settings: CleanSettings, examples: dict | None = None
) -> tuple[pa.Array, dict[str, np.ndarray]]:
    """Apply the text operations to an Arrow string array; return it and per-op change flags.
    (PII masking is separate, mask_pii: it runs after the answer checks.) `examples`, when given,
    gets each step's first two changes as {"before", "after"} (cut at EXAMPLE_CHARS).

    Code-bearing turns (CODE_BEARING: fences, <pre>, tables, indented lines) keep their layout and
    their characters: whitespace only as normalize_code_bearing says, and no HTML unescaping (an
    `&amp;` in code is code). JSON turns keep the spaces inside their strings.

    One vectorised pass finds the turns any operation could change (most real text needs no
    fixing, and a find is cheaper than a rewrite); the operations then run, as Arrow compute
    kernels behind pandas' string methods, on those turns only, each again on the subset it could
    change, and the fixed strings go back into the full array once.
    """
    opt = settings
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
            if examples is not None and diff.any():
                shown = examples.setdefault(name, [])
                for k in np.flatnonzero(diff)[: max(0, 2 - len(shown))]:
                    shown.append(
                        {
                            "before": before[int(k)].as_py()[:EXAMPLE_CHARS],
                            "after": after[int(k)].as_py()[:EXAMPLE_CHARS],
                        }
                    )
        flags[name] = hit

    def has(pattern: str, regex: bool = True) -> np.ndarray:
        found = (pc.match_substring_regex if regex else pc.match_substring)(work, pattern)
        return pc.fill_null(found, False).to_numpy(zero_copy_only=False)

    if check_unicode:
        non_ascii = ~pc.fill_null(pc.string_is_ascii(work), True).to_numpy(zero_copy_only=False)
        step("unicode", non_ascii, lambda s: s.str.normalize(opt.unicode_form))
    code = has(CODE_BEARING)
    if opt.html_unescape:
        step("html", has("&", regex=False) & ~code, lambda s: s.map(html.unescape).astype(STRING))
    if opt.strip_control:
        step(
            "control",
            has(CONTROL + r"|\r"),
            lambda s: s.str.replace("\r\n", "\n", regex=False).str.replace(CONTROL, "", regex=True),
        )
    if opt.normalize_whitespace:
        # Runs inside the text need three regex rewrites; blank edges (far more common, and often
        # on long texts) need only a strip, so the two are found and fixed apart.
        keep_layout = code | has(JSON_LIKE) | has(QUOTED_RUN) | has(YAML_LIKE)
        inner = has(INNER_WHITESPACE) & ~keep_layout

        def fix_inner(s):
            # Match only runs that change (a tab, a no-break space, or 2+ blanks), not every space.
            s = s.str.replace(r"[\t\xa0][ \t\xa0]*| [ \t\xa0]+", " ", regex=True)
            s = s.str.replace(r"(?m) +$|^ +", "", regex=True)
            return s.str.replace(r"\n{3,}", "\n\n", regex=True).str.strip()

        step("whitespace", inner, fix_inner)
        inner_hit = flags["whitespace"]
        step(
            "whitespace",
            keep_layout & has(r"[ \t\xa0]\n|\n{3}|\A\s|\s\z"),
            lambda s: s.map(normalize_layout_text).astype(STRING),
        )
        inner_hit |= flags["whitespace"]
        trimmed = pc.utf8_trim_whitespace(work)
        edges = pc.fill_null(pc.not_equal(pc.binary_length(trimmed), pc.binary_length(work)), False)
        edges = edges.to_numpy(zero_copy_only=False) & ~code  # a code block's first indent stays
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
