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


def _find_suspects(content: pa.Array, check_unicode: bool) -> np.ndarray:
    """The turns any operation could change, in one vectorised pass. The find reads every byte;
    Arrow kernels release the GIL, so two halves run on two cores."""

    def find(part: pa.Array) -> np.ndarray:
        hits = pc.fill_null(pc.match_substring_regex(part, ANY_FIX), False).to_numpy(zero_copy_only=False)
        if check_unicode:
            hits |= ~pc.fill_null(pc.string_is_ascii(part), True).to_numpy(zero_copy_only=False)
        return hits

    half = len(content) // 2
    with ThreadPoolExecutor(2) as pool:
        return np.concatenate(list(pool.map(find, [content.slice(0, half), content.slice(half)])))


class _Fixes:
    """The suspect turns being fixed, step by step: which turns each step changed, and its first
    two changes as examples."""

    def __init__(self, work: pa.Array, examples: dict | None):
        self.work, self.examples = work, examples
        self.flags: dict[str, np.ndarray] = {}

    def has(self, pattern: str, regex: bool = True) -> np.ndarray:
        found = (pc.match_substring_regex if regex else pc.match_substring)(self.work, pattern)
        return pc.fill_null(found, False).to_numpy(zero_copy_only=False)

    def step(self, name: str, needs: np.ndarray, fix) -> None:
        """Run ``fix`` (a pandas string Series -> Series) on the turns ``needs`` marks."""
        hit = np.zeros(len(self.work), dtype=bool)
        where = np.flatnonzero(needs)
        if len(where):
            before = self.work.take(where)
            after = pa.array(fix(pd.Series(before, dtype=STRING)).array).cast(pa.string())
            diff = pc.fill_null(pc.not_equal(after, before), False).to_numpy(zero_copy_only=False)
            self.work = pc.replace_with_mask(self.work, pa.array(needs), after)
            hit[where[diff]] = True
            self._keep_examples(name, before, after, diff)
        self.flags[name] = hit

    def _keep_examples(self, name: str, before: pa.Array, after: pa.Array, diff: np.ndarray) -> None:
        if self.examples is None or not diff.any():
            return
        shown = self.examples.setdefault(name, [])
        for k in np.flatnonzero(diff)[: max(0, 2 - len(shown))]:
            shown.append(
                {"before": before[int(k)].as_py()[:EXAMPLE_CHARS], "after": after[int(k)].as_py()[:EXAMPLE_CHARS]}
            )


def _fix_inner_whitespace(s: pd.Series) -> pd.Series:
    # Match only runs that change (a tab, a no-break space, or 2+ blanks), not every space.
    s = s.str.replace(r"[\t\xa0][ \t\xa0]*| [ \t\xa0]+", " ", regex=True)
    s = s.str.replace(r"(?m) +$|^ +", "", regex=True)
    return s.str.replace(r"\n{3,}", "\n\n", regex=True).str.strip()


def _fix_whitespace(fixes: _Fixes, code: np.ndarray) -> None:
    """Runs inside the text need three regex rewrites; blank edges (far more common, and often on
    long texts) need only a strip, so the two are found and fixed apart."""
    keep_layout = code | fixes.has(JSON_LIKE) | fixes.has(QUOTED_RUN) | fixes.has(YAML_LIKE)
    fixes.step("whitespace", fixes.has(INNER_WHITESPACE) & ~keep_layout, _fix_inner_whitespace)
    inner_hit = fixes.flags["whitespace"]
    fixes.step(
        "whitespace",
        keep_layout & fixes.has(r"[ \t\xa0]\n|\n{3}|\A\s|\s\z"),
        lambda s: s.map(normalize_layout_text).astype(STRING),
    )
    inner_hit |= fixes.flags["whitespace"]
    work = fixes.work
    trimmed = pc.utf8_trim_whitespace(work)
    edges = pc.fill_null(pc.not_equal(pc.binary_length(trimmed), pc.binary_length(work)), False)
    edges = edges.to_numpy(zero_copy_only=False) & ~code  # a code block's first indent stays
    if edges.any():
        fixes.work = pc.if_else(pa.array(edges), trimmed, work)
    fixes.flags["whitespace"] = inner_hit | edges


def _strip_control(s: pd.Series) -> pd.Series:
    return s.str.replace("\r\n", "\n", regex=False).str.replace(CONTROL, "", regex=True)


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
    check_unicode = opt.unicode_form != "none"
    suspects = _find_suspects(content, check_unicode)
    idx = np.flatnonzero(suspects)
    fixes = _Fixes(content.take(idx), examples)
    if check_unicode:
        non_ascii = ~pc.fill_null(pc.string_is_ascii(fixes.work), True).to_numpy(zero_copy_only=False)
        fixes.step("unicode", non_ascii, lambda s: s.str.normalize(opt.unicode_form))
    code = fixes.has(CODE_BEARING)
    if opt.html_unescape:
        fixes.step("html", fixes.has("&", regex=False) & ~code, lambda s: s.map(html.unescape).astype(STRING))
    if opt.strip_control:
        fixes.step("control", fixes.has(CONTROL + r"|\r"), _strip_control)
    if opt.normalize_whitespace:
        _fix_whitespace(fixes, code)
    changed = {}
    for name, hit in fixes.flags.items():
        full = np.zeros(len(content), dtype=bool)
        full[idx[hit]] = True
        changed[name] = full
    if any(hit.any() for hit in fixes.flags.values()):
        content = pc.replace_with_mask(content, pa.array(suspects), fixes.work)
    return content, changed
