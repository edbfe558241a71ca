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


def csv_header(path: str | Path, encoding: str = "utf-8") -> list[str]:
    """A CSV file's column names (its first row), read as the collect stage will: a byte-order
    mark decides among the Unicode encodings."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head.startswith(codecs.BOM_UTF8):
        encoding = "utf-8-sig"
    elif head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) and not head.startswith(codecs.BOM_UTF32_LE):
        encoding = "utf-16"
    with open(path, newline="", encoding=encoding, errors="replace") as fh:
        return next(csv.reader(fh), [])
