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

from kiln.tables import REJECTED_SCHEMA, save_splits

log = logging.getLogger(__name__)
SPLITS = ("train", "validation", "test")


def split_by_hash(ids, seed: int, validation: float, test: float) -> np.ndarray:
    """Assign each stable id to a split from a hash of (seed, id) alone.

    A row's split depends on nothing but its own id, so adding or removing other rows never moves it.
    """
    import pandas as pd

    # SipHash of the id under a key made from the seed: vectorised, and the same on every machine.
    key = hashlib.sha256(f"kiln-split:{seed}".encode()).hexdigest()[:16]
    values = np.asarray(ids, dtype=object)
    u = pd.util.hash_array(values, hash_key=key, categorize=False) / 2.0**64
    return np.where(u < test, "test", np.where(u < test + validation, "validation", "train")).astype(object)


def fingerprint(table: pa.Table) -> str:
    """A content fingerprint of a split: ids and content hashes, in row order."""
    lines = pc.binary_join_element_wise(table.column("kiln_id"), table.column("content_hash"), ":")
    text = "\n".join(lines.to_pylist()) + "\n" if table.num_rows else ""
    return hashlib.sha256(text.encode()).hexdigest()


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
    import pandas as pd

    hashes = table.column("content_hash").to_numpy(zero_copy_only=False)
    is_dup = pd.Series(hashes).duplicated(keep="first").to_numpy()
    first_of = pd.Series(np.flatnonzero(~is_dup), index=hashes[~is_dup])
    dup_idx = np.flatnonzero(is_dup)
    dup_of = dict(zip(dup_idx.tolist(), first_of.loc[hashes[is_dup]].to_numpy().tolist()))
    reasons = {i: ("duplicate", j) for i, j in dup_of.items()}
    if settings.get("near_dedup"):
        unique_idx = np.array(sorted(set(range(table.num_rows)) - set(dup_of)))
        near = near_duplicates(table.take(unique_idx), settings["near_dedup_threshold"])
        reasons.update({int(unique_idx[i]): ("near_duplicate", int(unique_idx[j])) for i, j in near.items()})

    drop = np.zeros(table.num_rows, dtype=bool)
    drop[list(reasons)] = True
    rej_idx = np.array(sorted(reasons), dtype=np.int64)
    of_idx = np.array([reasons[i][1] for i in rej_idx.tolist()], dtype=np.int64)
    # Only the rejected rows and the rows they repeat are turned into Python values.
    first = table.select(["kiln_id", "file", "row"]).take(pa.array(of_idx)).to_pydict()
    rejected = pa.table(
        {
            **{c: table.column(c).take(pa.array(rej_idx)) for c in ("kiln_id", "source", "file", "row")},
            "stage": pa.array(["build"] * len(rej_idx), pa.string()),
            "reason": [reasons[i][0] for i in rej_idx.tolist()],
            "detail": [
                f"same content as {f} row {r} ({k})" for f, r, k in zip(first["file"], first["row"], first["kiln_id"])
            ],
        },
        schema=REJECTED_SCHEMA,
    )
    kept = table.filter(pa.array(~drop))
    kept_ids = kept.column("kiln_id").to_numpy(zero_copy_only=False)
    split = split_by_hash(kept_ids, settings["seed"], settings["validation"], settings["test"])
    dd = {}
    stats = {"rows_in": table.num_rows, "rows_rejected": rejected.num_rows, "splits": {}}
    for name in SPLITS:
        part = kept.filter(pa.array(split == name))
        content = fingerprint(part)
        # Our content fingerprint doubles as the `datasets` one (else it pickles the whole table to make one).
        dd[name] = datasets.Dataset(part, fingerprint=content)
        stats["splits"][name] = {"rows": part.num_rows, "fingerprint": content}
    stats["rejected_by_reason"] = {
        r: sum(1 for v in reasons.values() if v[0] == r) for r in sorted({v[0] for v in reasons.values()})
    }
    save_splits(dd, out_dir)
    Path(rejected_path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rejected, rejected_path)
    Path(stats_path).write_text(json.dumps(stats, indent=2))
    log.info("dataset: %s", {k: v["rows"] for k, v in stats["splits"].items()})
    return stats
