"""What is wrong with a user's folder or file, in words: used at parse time (kiln.config) and by the
jobs that read them (kiln.base_model). A module of its own so that neither makes the other's rule
rerun. Standard library only: it runs while the workflow is parsed."""

from __future__ import annotations

import codecs
import csv
from pathlib import Path


def local_model_problem(folder: str | Path) -> str | None:
    """Why a `local` model folder can't be loaded, or None."""
    path = Path(folder)
    if not path.exists():
        return f"folder '{folder}' does not exist (relative paths are from the working directory {Path.cwd()})"
    if not path.is_dir():
        return f"'{folder}' is a file, not a model folder"
    if not (path / "config.json").exists():
        return f"folder '{folder}' has no config.json (expected a model saved by transformers' save_pretrained)"
    return None


# Byte-order marks, longest first (a UTF-32-LE mark starts with the UTF-16-LE one).
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)
_UNICODE = {"utf-8", "utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be"}


def bom_encoding(path: str | Path, encoding: str) -> str:
    """The encoding a file is read with: a byte-order mark decides among the Unicode encodings
    (a UTF-8 one is dropped, UTF-16/32 files read with the utf-8 default); a non-Unicode
    `encoding:` (latin-1, cp1252) is the user's word and stands. LookupError for an unknown codec."""
    if codecs.lookup(encoding).name not in _UNICODE:
        return encoding
    with open(path, "rb") as fh:
        head = fh.read(4)
    return next((name for bom, name in _BOMS if head.startswith(bom)), encoding)


def parquet_columns(path: str | Path) -> list[str]:
    """A Parquet file's top-level column names, from its footer alone (no row is read)."""
    import pyarrow.parquet as pq  # only when a Parquet source maps columns: parsing stays light

    return list(pq.read_schema(path).names)


def csv_header(path: str | Path, encoding: str = "utf-8") -> list[str]:
    """A CSV file's column names (its first row), read as the collect stage will (bom_encoding)."""
    with open(path, newline="", encoding=bom_encoding(path, encoding), errors="replace") as fh:
        return next(csv.reader(fh), [])
