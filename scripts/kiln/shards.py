"""The files a config's sources and local models name, found at parse time: the shard names a
source yields (one per file, URL or split: the collect stage's wildcards) and the checks that a
local file's columns and a local model folder are there before any job starts."""

from __future__ import annotations

import glob
import os
import re
from pathlib import Path

from kiln.experiment import DatasetSpec, SourceSpec
from kiln.folders import csv_header, local_model_problem, parquet_columns
from kiln.spec import ConfigError

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def safe_name(text: str) -> str:
    """``text`` as a file name: every run of other characters than letters, digits, ``_.-`` is ``_``."""
    return _UNSAFE.sub("_", text)


def _glob_root(pattern: str) -> str:
    """The part of a glob before its first wildcard: shard names are paths relative to it."""
    parts = Path(pattern).parts
    fixed = []
    for part in parts:
        if any(ch in part for ch in "*?["):
            break
        fixed.append(part)
    return str(Path(*fixed)) if fixed else "."


def local_files(pattern: str) -> dict[str, str]:
    """Shard name -> file for every file a `local` source's glob matches (sorted)."""
    root = _glob_root(pattern)
    files = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    shards = {}
    for path in files:
        rel = os.path.relpath(path, root) if root != path else os.path.basename(path)
        shards[_UNSAFE.sub("_", rel.replace(os.sep, "__"))] = path
    return shards


def url_shards(urls: list[str]) -> dict[str, str]:
    shards = {}
    for i, url in enumerate(urls):
        base = url.split("?")[0].rstrip("/").rsplit("/", 1)[-1] or "download"
        shards[f"{i:03d}-{_UNSAFE.sub('_', base)}"] = url
    return shards


def source_shards(src: SourceSpec, dataset: str) -> list[str]:
    """The shard names a source yields: one per file, URL, or split."""
    if src.kind == "synthetic":
        return ["synthetic"]
    if src.kind == "hf":
        return [_UNSAFE.sub("_", src.split)]
    if src.kind == "url":
        return list(url_shards(src.urls))
    shards = local_files(src.path)
    if not shards:
        raise ConfigError(
            f"config: datasets.{dataset}.sources '{src.name}': path '{src.path}' matches no files "
            f"(relative to {os.getcwd()})"
        )
    return list(shards)


def dataset_shards(dataset: DatasetSpec) -> list[tuple[str, str]]:
    """Every (source, shard) of a dataset, in config order: the build stage's inputs."""
    return [(src.name, shard) for src in dataset.sources for shard in source_shards(src, dataset.name)]


# CSV headers read at parse time per source; files past this many are checked by their collect job.
HEADER_CHECKS = 200


def check_local_paths(cfg: dict) -> None:
    """At parse time, before any job: every `local` model folder an experiment uses can be loaded,
    and a local CSV or Parquet source's `columns:` names columns its files have (unless
    on_bad_file: skip, where the collect job sets such a file aside)."""
    for ds, spec in cfg.get("datasets", {}).items():
        for i, src in enumerate(spec.get("sources", [])):
            if src.get("kind") != "local" or not src.get("columns") or src.get("on_bad_file") == "skip":
                continue
            files = [f for f in local_files(src["path"]).values() if f.lower().endswith((".csv", ".parquet"))]
            for file in files[:HEADER_CHECKS]:
                if file.lower().endswith(".parquet"):
                    header = parquet_columns(file)
                else:
                    header = csv_header(file, src.get("encoding", "utf-8"))
                for field, col in src["columns"].items():
                    if col not in header:
                        raise ConfigError(
                            f"config: datasets.{ds}.sources[{i}].columns: maps {field} to column '{col}', "
                            f"which is not in {file} (its columns: {', '.join(header[:30])})"
                        )
    used = {exp["model"] for exp in cfg.get("experiments", {}).values()}
    for name, spec in cfg.get("models", {}).items():
        if spec.get("kind") == "local" and name in used:
            problem = local_model_problem(spec["path"])  # kiln.folders
            if problem:
                raise ConfigError(f"config: models.{name}.path: {problem}")
