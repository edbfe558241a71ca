"""Collect: read one shard of one source into the canonical raw table, with lineage per row.

A row that cannot be read (bad JSON, bad encoding, a missing field) is kept with its ``error`` so
the clean stage rejects it with that reason: raw rows always equal clean + rejected rows. A problem
with the whole file (empty, unreadable, no usable column) raises CollectError naming the file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kiln.config import local_files, url_shards
from kiln.records import RecordError, stable_id, to_canonical
from kiln.tables import RAW_SCHEMA

log = logging.getLogger(__name__)

# A raw item: (row number, parsed record or None, raw text, read error or None)
Item = tuple[int, object, str, str | None]


class CollectError(RuntimeError):
    """A whole-file problem, phrased with the file (and line) at fault."""


def _jsonl_items(path: str, encoding: str) -> Iterator[Item]:
    with open(path, "rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            try:
                text = line.decode(encoding)
            except UnicodeDecodeError as exc:
                raw = line.decode(encoding, errors="replace").rstrip("\r\n")
                yield lineno, None, raw, f"not valid {encoding} at byte {exc.start} of the line"
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
    return READERS[suffix](path, encoding)


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


def write_raw(rows: list[dict], out_path: str | Path) -> None:
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows, schema=RAW_SCHEMA)
    pq.write_table(table, out_path)


def download(url: str, dest: Path, sha256: str | None, timeout_s: float) -> Path:
    """HTTP(S) download to ``dest`` with an optional checksum; errors name the URL."""
    tmp = dest.with_suffix(dest.suffix + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp, open(tmp, "wb") as fh:
            while chunk := resp.read(1 << 20):
                digest.update(chunk)
                fh.write(chunk)
    except urllib.error.HTTPError as exc:
        raise CollectError(f"{url}: download failed: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise CollectError(f"{url}: download failed: {getattr(exc, 'reason', exc)}") from None
    if sha256 and digest.hexdigest() != sha256:
        tmp.unlink()
        raise CollectError(f"{url}: sha256 mismatch: expected {sha256}, got {digest.hexdigest()}")
    tmp.replace(dest)
    return dest


def _hf_items(src: dict) -> Iterator[Item]:
    import datasets

    try:
        ds = datasets.load_dataset(
            src["path"],
            src.get("config_name"),
            revision=src["revision"],
            split=src["split"],
            data_files=src.get("data_files"),
        )
    except Exception as exc:  # the Hub client raises many types; the message is what matters
        raise CollectError(
            f"hf source '{src['name']}': load_dataset('{src['path']}', revision='{src['revision']}', "
            f"split='{src['split']}') failed: {type(exc).__name__}: {exc}"
        ) from None
    for i, rec in enumerate(ds, start=1):
        yield i, rec, json.dumps(rec, ensure_ascii=False, default=str), None


def collect_shard(src: dict, shard: str, out_path: str | Path, dataset: str = "") -> dict:
    """Read one shard of a configured source and write its canonical raw Parquet."""
    kind, fmt, columns = src["kind"], src.get("format", "auto"), src.get("columns", {})
    encoding = src.get("encoding", "utf-8")
    if kind == "synthetic":
        from kiln.synthetic import generate

        records = generate(src["rows"], seed=src["seed"], mess_rate=src["mess_rate"])
        file = f"synthetic(seed={src['seed']},rows={src['rows']},mess_rate={src['mess_rate']})"
        items = ((i, rec, json.dumps(rec, ensure_ascii=False), None) for i, rec in enumerate(records, 1))
    elif kind == "local":
        files = local_files(src["path"])
        if shard not in files:
            raise CollectError(f"source '{src['name']}': no file for shard '{shard}' under '{src['path']}'")
        file = files[shard]
        items = read_file_items(file, encoding)
    elif kind == "url":
        urls = url_shards(src["urls"])
        file = urls[shard]
        index = list(urls).index(shard)
        sha = src["sha256"][index] if src.get("sha256") else None
        with tempfile.TemporaryDirectory() as tmpdir:
            suffix = Path(file.split("?")[0]).suffix or ".jsonl"
            local = download(file, Path(tmpdir) / f"download{suffix}", sha, src.get("timeout_s", 60))
            # Keep the bytes beside the shard: the raw input of this row set, for audit.
            kept = Path(out_path).with_suffix(suffix)
            kept.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(local, kept)
        items = read_file_items(str(kept), encoding)
    elif kind == "hf":
        file = f"hf://{src['path']}@{src['revision']}/{src['split']}"
        items = _hf_items(src)
    else:
        raise CollectError(f"unknown source kind {kind!r}")
    rows = canonical_rows(items, source=src["name"], file=str(file), fmt=fmt, columns=columns)
    if rows and all(r["error"] for r in rows):
        first = rows[0]
        raise CollectError(f"{file}: no row could be read; first problem, row {first['row']}: {first['error']}")
    write_raw(rows, out_path)
    stats = {
        "source": src["name"],
        "shard": shard,
        "file": str(file),
        "rows": len(rows),
        "unreadable": sum(r["error"] is not None for r in rows),
    }
    log.info("collected %s rows from %s (%s unreadable)", stats["rows"], file, stats["unreadable"])
    return stats
