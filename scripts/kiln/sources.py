"""Collect: read one shard of one source into the canonical raw table, with lineage per row.

A row that cannot be read (bad JSON, bad encoding, a missing field) is kept with its ``error`` so
the clean stage rejects it with that reason: raw rows always equal clean + rejected rows. A problem
with the whole file (empty, unreadable, no usable column) raises CollectError naming the file.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kiln.experiment import SourceSpec
from kiln.folders import bom_encoding
from kiln.preference import wrong_kind
from kiln.records import RecordError, stable_id, to_canonical
from kiln.shards import local_files, url_shards
from kiln.tables import DOWNLOAD_KEY, RAW_SCHEMA, SKIPPED_KEY

log = logging.getLogger(__name__)

# A raw item: (row number, parsed record or None, raw text, read error or None)
Item = tuple[int, object, str, str | None]


class CollectError(RuntimeError):
    """A whole-file problem, phrased with the file (and line) at fault."""


# Byte-order marks, longest first (a UTF-32-LE mark starts with the UTF-16-LE one).
def file_encoding(path: str, encoding: str) -> str:
    """The encoding a file is read with. A byte-order mark decides among the Unicode encodings
    (a UTF-8 one is dropped, not read into the first record; UTF-16 and UTF-32 files read with the
    utf-8 default); a non-Unicode `encoding:` (latin-1, cp1252) is the user's word and stands."""
    try:
        by_mark = bom_encoding(path, encoding)  # kiln.folders: the same rule the parse-time checks use
    except LookupError:
        raise CollectError(f"{path}: unknown encoding {encoding!r} (set `encoding:` to a Python codec name)") from None
    if by_mark != encoding:
        log.info("%s: %s byte-order mark: read as %s", path, by_mark.upper(), by_mark)
    return by_mark


def _jsonl_lines(path: str, encoding: str) -> Iterator[tuple[int, str | None, str, str | None]]:
    """(line number, text or None, raw text, decode error or None) per line. Encodings where a
    newline is one byte 0x0A (UTF-8, latin-1 ...) are decoded line by line, so one bad line costs
    one row; UTF-16/32 are decoded whole first (their newline is 2 or 4 bytes)."""
    if codecs.lookup(encoding).name.startswith(("utf-16", "utf-32")):
        for lineno, line in enumerate(_read_text(path, encoding).split("\n"), start=1):
            yield lineno, line, line, None
        return
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                yield lineno, line.decode(encoding), "", None
            except UnicodeDecodeError as exc:
                raw = line.decode(encoding, errors="replace").rstrip("\r\n")
                error = f"not valid {encoding} at byte {exc.start} of the line; set `encoding:` on the source"
                yield lineno, None, raw, error + " if the file uses another encoding (latin-1, cp1252, utf-16)"


def _jsonl_items(path: str, encoding: str) -> Iterator[Item]:
    for lineno, text, raw, error in _jsonl_lines(path, encoding):
        if text is None:
            yield lineno, None, raw, error
            continue
        text = text.rstrip("\r\n")
        if not text.strip():
            continue  # blank lines are layout, not rows
        try:
            yield lineno, json.loads(text), text, None
        except json.JSONDecodeError as exc:
            yield lineno, None, text, f"malformed JSON at column {exc.colno}: {exc.msg}"


def _json_items(path: str, encoding: str) -> Iterator[Item]:
    text = _read_text(path, encoding)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CollectError(f"{path}: malformed JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if isinstance(data, dict):  # {"data": [...]} / {"train": [...]}: the one list inside
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise CollectError(f"{path}: expected a list of records (or an object holding one list)")
        data = lists[0]
    if not isinstance(data, list):
        raise CollectError(f"{path}: expected a list of records, got {type(data).__name__}")
    for i, rec in enumerate(data, start=1):
        yield i, rec, json.dumps(rec, ensure_ascii=False), None


def _read_text(path: str, encoding: str) -> str:
    data = Path(path).read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise CollectError(
            f"{path}: not valid {encoding} at line {line} (byte {exc.start}); "
            "set `encoding:` on the source if the file uses another encoding"
        ) from None


def _csv_items(path: str, encoding: str) -> Iterator[Item]:
    import pandas as pd

    _read_text(path, encoding)  # a clear encoding error before pandas gives its own
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding=encoding)
    except pd.errors.ParserError as exc:
        raise CollectError(f"{path}: malformed CSV: {exc}") from None
    for i, rec in enumerate(frame.to_dict("records"), start=2):  # line 1 is the header
        yield i, rec, json.dumps(rec, ensure_ascii=False), None


def _parquet_items(path: str, encoding: str) -> Iterator[Item]:
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise CollectError(f"{path}: not a readable Parquet file: {exc}") from None
    for i, rec in enumerate(table.to_pylist(), start=1):
        yield i, rec, json.dumps(rec, ensure_ascii=False, default=str), None


def _txt_items(path: str, encoding: str) -> Iterator[Item]:
    for lineno, line in enumerate(_read_text(path, encoding).splitlines(), start=1):
        if line.strip():
            yield lineno, {"text": line}, line, None


READERS = {
    ".jsonl": _jsonl_items,
    ".ndjson": _jsonl_items,
    ".json": _json_items,
    ".csv": _csv_items,
    ".parquet": _parquet_items,
    ".txt": _txt_items,
}


def read_file_items(path: str, encoding: str = "utf-8") -> Iterator[Item]:
    suffix = Path(path).suffix.lower()
    if suffix not in READERS:
        raise CollectError(f"{path}: unsupported file type '{suffix}' (supported: {', '.join(READERS)})")
    if os.path.getsize(path) == 0:
        raise CollectError(f"{path}: file is empty")
    if suffix == ".parquet":
        return READERS[suffix](path, encoding)
    return READERS[suffix](path, file_encoding(path, encoding))


def canonical_rows(items: Iterable[Item], *, source: str, file: str, fmt: str, columns: dict) -> list[dict]:
    """Map raw items to canonical rows; unmappable rows keep their reason in ``error``."""
    rows = []
    for rowno, record, raw, error in items:
        row = {
            "source": source,
            "file": file,
            "row": rowno,
            "raw": raw,
            "format": None,
            "kind": None,
            "messages": None,
            "error": error,
        }
        if error is None:
            try:
                row["format"], row["kind"], row["messages"] = to_canonical(record, fmt, columns)
            except RecordError as exc:
                row["error"] = str(exc)
        row["kiln_id"] = stable_id(row["kind"], row["messages"], raw)
        rows.append(row)
    return rows


def write_raw(rows: list[dict], out_path: str | Path, download: dict | None = None) -> None:
    """The raw shard; a url source's download record (final URL, bytes, sha256) rides in its
    schema metadata, for the clean stage's stats and the manifest."""
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    schema = RAW_SCHEMA.with_metadata({DOWNLOAD_KEY: json.dumps(download)}) if download else RAW_SCHEMA
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, out_path)


def download_path(raw_path: str | Path, suffix: str) -> Path:
    """Where a url shard's original bytes are kept: data/<ds>/downloads/<source>/<shard>.original<suffix>."""
    raw = Path(raw_path)  # data/<ds>/raw/<source>/<shard>.parquet
    if raw.parent.parent.name == "raw":
        return raw.parent.parent.parent / "downloads" / raw.parent.name / f"{raw.stem}.original{suffix}"
    return raw.with_name(f"{raw.name}.original{suffix}")  # outside the workflow's layout (tests)


MAX_BYTES = 1 << 30  # url sources: default size limit (max_bytes), 1 GiB
DEADLINE_S = 900.0  # url sources: default limit on a whole download (deadline_s)


class _NoDowngrade(urllib.request.HTTPRedirectHandler):
    """Follow redirects, but never from https to http (the bytes would travel unprotected)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if req.full_url.startswith("https:") and newurl.startswith("http:"):
            raise CollectError(f"{req.full_url}: refused a redirect from https to http ({newurl})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(
    url: str,
    dest: Path,
    sha256: str | None,
    timeout_s: float,
    max_bytes: int = MAX_BYTES,
    deadline_s: float = DEADLINE_S,
) -> dict:
    """HTTP(S) download to ``dest`` within a size limit and an overall deadline; the record of it.

    ``timeout_s`` bounds each wait for data, ``deadline_s`` the whole transfer (a server that drips
    a byte at a time is cut off), ``max_bytes`` its size (announced or streamed). Redirects are
    followed except https -> http; the final URL, byte count and sha256 are returned for the
    stats and the manifest. Errors name the URL.
    """
    import time

    tmp = dest.with_suffix(dest.suffix + ".part")
    digest, size, start = hashlib.sha256(), 0, time.monotonic()
    opener = urllib.request.build_opener(_NoDowngrade)
    try:
        with opener.open(url, timeout=timeout_s) as resp, open(tmp, "wb") as fh:
            announced = resp.headers.get("Content-Length")
            if announced and announced.isdigit() and int(announced) > max_bytes:
                raise CollectError(f"{url}: {int(announced)} bytes announced, over max_bytes {max_bytes}")
            final_url = resp.geturl()
            while chunk := resp.read1(1 << 16):  # returns what has arrived: the deadline is checked
                size += len(chunk)
                if size > max_bytes:
                    raise CollectError(f"{url}: more than max_bytes {max_bytes} bytes; download stopped")
                if time.monotonic() - start > deadline_s:
                    raise CollectError(f"{url}: not finished within deadline_s {deadline_s:g} s ({size} bytes)")
                digest.update(chunk)
                fh.write(chunk)
    except CollectError:
        tmp.unlink(missing_ok=True)
        raise
    except urllib.error.HTTPError as exc:
        tmp.unlink(missing_ok=True)
        raise CollectError(f"{url}: download failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        raise CollectError(f"{url}: download failed: {getattr(exc, 'reason', exc)}") from None
    if sha256 and digest.hexdigest() != sha256:
        tmp.unlink()
        raise CollectError(f"{url}: sha256 mismatch: expected {sha256}, got {digest.hexdigest()}")
    tmp.replace(dest)
    return {
        "url": url,
        "final_url": final_url,
        "redirected": final_url != url,
        "bytes": size,
        "sha256": digest.hexdigest(),
        "verified": bool(sha256),
        "seconds": round(time.monotonic() - start, 3),
    }


def _hf_items(src: SourceSpec) -> Iterator[Item]:
    import datasets

    try:
        ds = datasets.load_dataset(
            src.path, src.config_name, revision=src.revision, split=src.split, data_files=src.data_files
        )
    except Exception as exc:  # the Hub client raises many types; the message is what matters
        raise CollectError(
            f"hf source '{src.name}': load_dataset('{src.path}', revision='{src.revision}', "
            f"split='{src.split}') failed: {type(exc).__name__}: {exc}"
        ) from None
    for i, rec in enumerate(ds, start=1):
        yield i, rec, json.dumps(rec, ensure_ascii=False, default=str), None


def missing_columns(items: list[Item], columns: dict) -> list[tuple[str, str]]:
    """(canonical field, column) pairs of `columns:` naming a column no record of the file has."""
    keys = set()
    for _, record, _, _ in items:
        if isinstance(record, dict):
            keys.update(record)
    return [(field, col) for field, col in columns.items() if keys and col not in keys]


def collect_shard(
    src: SourceSpec, shard: str, out_path: str | Path, dataset: str = "", kinds: tuple | list = ()
) -> dict:
    """Read one shard of a configured source and write its canonical raw Parquet. With
    `on_bad_file: skip`, a file that can't be read is set aside: an empty shard records it and
    why, and the dataset stats and report list it. ``kinds``: the only record kinds the dataset's
    experiments train on (kiln.preference.expected_kinds); a row of another kind stops the run."""
    try:
        return _collect_shard(src, shard, out_path, tuple(kinds), dataset)
    except CollectError as exc:
        if src.on_bad_file != "skip":
            raise
        file = local_files(src.path).get(shard, shard) if src.kind == "local" else shard
        skipped = {"source": src.name, "file": str(file), "reason": str(exc)}
        log.warning("set aside %s (on_bad_file: skip): %s", file, exc)
        Path(out_path).parent.mkdir(parents=True, exist_ok=True)
        schema = RAW_SCHEMA.with_metadata({SKIPPED_KEY: json.dumps(skipped)})
        pq.write_table(pa.Table.from_pylist([], schema=schema), out_path)
        return {"source": src.name, "shard": shard, "file": str(file), "rows": 0, "skipped": skipped}


def _collect_shard(src: SourceSpec, shard: str, out_path: str | Path, kinds: tuple = (), dataset: str = "") -> dict:
    kind, fmt, columns, encoding = src.kind, src.format, src.columns, src.encoding
    record = None  # a url source's download record
    if kind == "synthetic":
        from kiln.synthetic import generate

        records = generate(src.rows, seed=src.seed, mess_rate=src.mess_rate)
        file = f"synthetic(seed={src.seed},rows={src.rows},mess_rate={src.mess_rate})"
        items = ((i, rec, json.dumps(rec, ensure_ascii=False), None) for i, rec in enumerate(records, 1))
    elif kind == "local":
        files = local_files(src.path)
        if shard not in files:
            raise CollectError(f"source '{src.name}': no file for shard '{shard}' under '{src.path}'")
        file = files[shard]
        items = read_file_items(file, encoding)
    elif kind == "url":
        urls = url_shards(src.urls)
        file = urls[shard]
        index = list(urls).index(shard)
        sha = src.sha256[index] if src.sha256 else None
        suffix = Path(file.split("?")[0]).suffix or ".jsonl"
        # The original bytes, kept for audit under a name no output can take (a URL ending in
        # .parquet once overwrote them with the raw shard): downloads/<source>/<shard>.original<suffix>,
        # written in place (no second copy) and renamed only when complete and verified.
        kept = download_path(out_path, suffix)
        kept.parent.mkdir(parents=True, exist_ok=True)
        record = download(
            file,
            kept,
            sha,
            src.timeout_s,
            max_bytes=src.max_bytes,
            deadline_s=src.deadline_s,
        )
        record["kept_as"] = str(kept)
        items = read_file_items(str(kept), encoding)
    elif kind == "hf":
        file = f"hf://{src.path}@{src.revision}/{src.split}"
        items = _hf_items(src)
    else:
        raise CollectError(f"unknown source kind {kind!r}")
    items = list(items)
    if not items:
        raise CollectError(f"{file}: no rows (a header only, or blank lines)")
    missing = missing_columns(items, columns)
    if missing:
        names = sorted({k for _, rec, _, _ in items if isinstance(rec, dict) for k in rec})
        field, col = missing[0]
        raise CollectError(
            f"{file}: `columns:` maps {field} to column '{col}', which is not in the file "
            f"(its columns: {', '.join(names[:30])}); fix the name in the source's `columns:`"
        )
    rows = canonical_rows(items, source=src.name, file=str(file), fmt=fmt, columns=columns)
    wrong = wrong_kind(rows, kinds, str(file), dataset)  # a pair in an SFT dataset, or the reverse
    if wrong:
        raise CollectError(wrong)
    if rows and all(r["error"] for r in rows):
        first = rows[0]
        raise CollectError(f"{file}: no row could be read; first problem, row {first['row']}: {first['error']}")
    write_raw(rows, out_path, download=record)
    stats = {
        "source": src.name,
        "shard": shard,
        "file": str(file),
        "rows": len(rows),
        "unreadable": sum(r["error"] is not None for r in rows),
        "download": record,
    }
    log.info("collected %s rows from %s (%s unreadable)", stats["rows"], file, stats["unreadable"])
    return stats
