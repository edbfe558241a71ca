"""Build: all clean shards -> cross-shard dedup -> hash split -> a `datasets` DatasetDict on disk."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from kiln.clean import REJECTED_SCHEMA

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")


def split_by_hash(ids, seed: int, validation: float, test: float) -> np.ndarray:
    """Assign each stable id to a split from a hash of (seed, id) alone.

    A row's split depends on nothing but its own id, so adding or removing other rows never moves it.
    """
    out = np.empty(len(ids), dtype=object)
    for i, kiln_id in enumerate(ids):
        digest = hashlib.sha256(f"{seed}:{kiln_id}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
        out[i] = "test" if u < test else ("validation" if u < test + validation else "train")
    return out


def fingerprint(table: pa.Table) -> str:
    """A content fingerprint of a split: ids and content hashes, in row order."""
    h = hashlib.sha256()
    for kiln_id, content in zip(table.column("kiln_id").to_pylist(), table.column("content_hash").to_pylist()):
        h.update(f"{kiln_id}:{content}\n".encode())
    return h.hexdigest()


def _word_shingles(text: str, n: int = 5) -> set[bytes]:
    words = text.lower().split()
    return {" ".join(words[i : i + n]).encode() for i in range(max(1, len(words) - n + 1))}


def near_duplicates(table: pa.Table, threshold: float, num_perm: int = 64) -> dict[int, int]:
    """Row index -> index of the earlier row it nearly duplicates (MinHash LSH over word 5-grams)."""
    from datasketch import MinHash, MinHashLSH

    texts = pc.binary_join(
        pa.ListArray.from_arrays(
            table.column("messages").combine_chunks().offsets,
            table.column("messages").combine_chunks().flatten().field("content"),
        ),
        "\n",
    ).to_pylist()
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    dup_of: dict[int, int] = {}
    for i, text in enumerate(texts):
        mh = MinHash(num_perm=num_perm, seed=1)
        mh.update_batch(list(_word_shingles(text)))
        hits = lsh.query(mh)
        if hits:
            dup_of[i] = min(hits)
        else:
            lsh.insert(i, mh)
    return dup_of


def build_dataset(
    clean_paths: list[str], out_dir: str | Path, rejected_path: str | Path, stats_path: str | Path, settings: dict
) -> dict:
    import datasets

    tables = [pq.read_table(p) for p in clean_paths]
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows == 0:
        raise ValueError(
            f"no clean rows in {len(clean_paths)} shard(s): every row was rejected; "
            "see the rejected/ shards for the reasons"
        )
    # Exact duplicates across shards: the first occurrence in config/source/file/row order wins.
    hashes = table.column("content_hash").to_pylist()
    ids = table.column("kiln_id").to_pylist()
    first: dict[str, int] = {}
    dup_of: dict[int, int] = {}
    for i, h in enumerate(hashes):
        if h in first:
            dup_of[i] = first[h]
        else:
            first[h] = i
    reasons = {i: ("duplicate", j) for i, j in dup_of.items()}
    if settings.get("near_dedup"):
        unique_idx = np.array(sorted(set(range(table.num_rows)) - set(dup_of)))
        near = near_duplicates(table.take(unique_idx), settings["near_dedup_threshold"])
        reasons.update({int(unique_idx[i]): ("near_duplicate", int(unique_idx[j])) for i, j in near.items()})

    drop = np.zeros(table.num_rows, dtype=bool)
    drop[list(reasons)] = True
    rows = table.column("row").to_pylist()
    files = table.column("file").to_pylist()
    sources = table.column("source").to_pylist()
    rej_idx = sorted(reasons)
    rejected = pa.table(
        {
            "kiln_id": [ids[i] for i in rej_idx],
            "source": [sources[i] for i in rej_idx],
            "file": [files[i] for i in rej_idx],
            "row": [rows[i] for i in rej_idx],
            "stage": ["build"] * len(rej_idx),
            "reason": [reasons[i][0] for i in rej_idx],
            "detail": [
                f"same content as {files[reasons[i][1]]} row {rows[reasons[i][1]]} ({ids[reasons[i][1]]})"
                for i in rej_idx
            ],
            "raw": pa.nulls(len(rej_idx), pa.string()),
        },
        schema=REJECTED_SCHEMA,
    )
    kept = table.filter(pa.array(~drop))
    split = split_by_hash(
        kept.column("kiln_id").to_pylist(), settings["seed"], settings["validation"], settings["test"]
    )
    dd = {}
    stats = {"rows_in": table.num_rows, "rows_rejected": rejected.num_rows, "splits": {}}
    for name in SPLITS:
        part = kept.filter(pa.array(split == name))
        dd[name] = datasets.Dataset(part)
        stats["splits"][name] = {"rows": part.num_rows, "fingerprint": fingerprint(part)}
    stats["rejected_by_reason"] = {
        r: sum(1 for v in reasons.values() if v[0] == r) for r in sorted({v[0] for v in reasons.values()})
    }
    datasets.DatasetDict(dd).save_to_disk(str(out_dir))
    Path(rejected_path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rejected, rejected_path)
    Path(stats_path).write_text(json.dumps(stats, indent=2))
    log.info("dataset: %s", {k: v["rows"] for k, v in stats["splits"].items()})
    return stats
