"""The Arrow tables the data stages hand each other: raw (collect), clean and rejected (clean, build),
tokens (tokenize's cache). One module, so a column added by one stage is seen by the next."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

TURN_TYPE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES_TYPE = pa.list_(TURN_TYPE)
RAW_SCHEMA = pa.schema(
    [
        ("kiln_id", pa.string()),  # stable id: hash of the canonical content (or raw text if unparsable)
        ("source", pa.string()),  # source name in the config
        ("file", pa.string()),  # file, URL or generator the row came from
        ("row", pa.int64()),  # 1-based line (jsonl/txt/csv data row) or record index
        ("format", pa.string()),  # detected record format
        ("kind", pa.string()),  # chat | text | null when unparsable
        ("messages", MESSAGES_TYPE),
        ("raw", pa.string()),  # the original record, for lineage
        ("error", pa.string()),  # why the row could not be read; null when it could
    ]
)

# clean: rows kept, with the edits cleaning made and a content hash
CLEAN_SCHEMA = pa.schema(
    [
        ("kiln_id", pa.string()),
        ("source", pa.string()),
        ("file", pa.string()),
        ("row", pa.int64()),
        ("kind", pa.string()),
        ("messages", MESSAGES_TYPE),
        ("content_hash", pa.string()),
        ("n_chars", pa.int64()),
        ("edits", pa.string()),
    ]
)

# clean and build: rows dropped, each with its stage, reason and detail
REJECTED_SCHEMA = pa.schema(
    [
        ("kiln_id", pa.string()),
        ("source", pa.string()),
        ("file", pa.string()),
        ("row", pa.int64()),
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("detail", pa.string()),
    ]
)

# tokenize: token ids and loss masks of each row, keyed by its content hash (the token cache)
TOKENS_SCHEMA = pa.schema(
    [
        ("kiln_id", pa.string()),
        ("content_hash", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("assistant_masks", pa.list_(pa.int8())),
        ("n_tokens", pa.int32()),
    ]
)


# A url shard's download record (final URL, bytes, sha256) rides in the raw table's schema metadata.
DOWNLOAD_KEY = b"kiln.download"


# A file set aside by `on_bad_file: skip` (its name and why) rides there too, on an empty raw shard.
SKIPPED_KEY = b"kiln.skipped"


def download_record(raw_path) -> dict | None:
    meta = pq.read_schema(raw_path).metadata or {}
    return json.loads(meta[DOWNLOAD_KEY]) if DOWNLOAD_KEY in meta else None


def skipped_record(raw_path) -> dict | None:
    meta = pq.read_schema(raw_path).metadata or {}
    return json.loads(meta[SKIPPED_KEY]) if SKIPPED_KEY in meta else None


def save_splits(splits: dict, out_dir) -> None:
    """``DatasetDict(splits).save_to_disk(out_dir)`` that an empty split survives.

    `datasets` writes an empty split with no data file at all (its shard count is capped by the
    row count, 0), and ``load_from_disk`` then fails with a bare ``IndexError`` in concat_tables:
    any small dataset, or ``build.validation: 0``, crashed the next stage. One shard is asked for
    each empty split: an Arrow file with the schema and no rows, which loads.
    """
    import datasets

    empty = {name: 1 for name, ds in splits.items() if len(ds) == 0}
    datasets.DatasetDict(splits).save_to_disk(str(out_dir), num_shards=empty or None)
