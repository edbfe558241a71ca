"""Build: all clean shards -> cross-shard dedup -> per-source caps -> hash split -> contamination audit
-> per-source weights on the train split -> a `datasets` DatasetDict on disk.

Every row that does not reach a split is a build reject with its reason (duplicate, near_duplicate,
max_rows, contaminated, weight); every draw (caps, weights) is a hash of the seed and the row's id,
so it is deterministic and a row's fate does not depend on the other rows' order."""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
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


def _unit_hash(ids, seed: int, purpose: str) -> np.ndarray:
    """A uniform number in [0, 1) per id, from (purpose, seed, id) alone (the split's SipHash)."""
    import pandas as pd

    key = hashlib.sha256(f"kiln-{purpose}:{seed}".encode()).hexdigest()[:16]
    return pd.util.hash_array(np.asarray(ids, dtype=object), hash_key=key, categorize=False) / 2.0**64


def cap_rows(sources: np.ndarray, ids: np.ndarray, max_rows: dict[str, int], seed: int) -> np.ndarray:
    """Rows kept under each source's `max_rows`: the ones with the smallest hash of (seed, id), so a
    row stays chosen when rows are added elsewhere and the choice is the same on every machine."""
    keep = np.ones(len(ids), dtype=bool)
    u = _unit_hash(ids, seed, "max-rows")
    for name, cap in max_rows.items():
        idx = np.flatnonzero(sources == name)
        if len(idx) > cap:
            keep[idx[np.argsort(u[idx], kind="stable")[cap:]]] = False
    return keep


def weight_copies(sources: np.ndarray, ids: np.ndarray, weights: dict[str, float], seed: int) -> np.ndarray:
    """Copies of each train row under its source's `weight`: floor(w), plus one more with probability
    frac(w) drawn from a hash of (seed, id). 2.0 doubles a source, 0.5 keeps about half of it."""
    w = np.array([weights.get(s, 1.0) for s in sources], dtype=float)
    u = _unit_hash(ids, seed, "weight")
    return (np.floor(w) + (u < w - np.floor(w))).astype(np.int64)


def fingerprint(table: pa.Table) -> str:
    """A content fingerprint of a split: ids and content hashes, in row order."""
    lines = pc.binary_join_element_wise(table.column("kiln_id"), table.column("content_hash"), ":")
    text = "\n".join(lines.to_pylist()) + "\n" if table.num_rows else ""
    return hashlib.sha256(text.encode()).hexdigest()


def _word_shingles(text: str, n: int = 5) -> set[bytes]:
    words = text.lower().split()
    return {" ".join(words[i : i + n]).encode() for i in range(max(1, len(words) - n + 1))}


def _texts(table: pa.Table) -> list[str]:
    messages = table.column("messages").combine_chunks()
    return pc.binary_join(
        pa.ListArray.from_arrays(messages.offsets, messages.flatten().field("content")), "\n"
    ).to_pylist()


def _minhash(text: str, num_perm: int):
    from datasketch import MinHash

    mh = MinHash(num_perm=num_perm, seed=1)
    mh.update_batch(list(_word_shingles(text)))
    return mh


def near_duplicates(table: pa.Table, threshold: float, num_perm: int = 64) -> dict[int, int]:
    """Row index -> index of the earlier row it nearly duplicates (MinHash LSH over word 5-grams)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    dup_of: dict[int, int] = {}
    for i, text in enumerate(_texts(table)):
        mh = _minhash(text, num_perm)
        hits = lsh.query(mh)
        if hits:
            dup_of[i] = min(hits)
        else:
            lsh.insert(i, mh)
    return dup_of


def contamination(train: pa.Table, held_out: pa.Table, threshold: float, num_perm: int = 64) -> dict[int, int]:
    """Held-out row index -> index of a train row it nearly duplicates (MinHash LSH, word 5-grams):
    a test row the model has in effect seen in training scores memory, not skill."""
    from datasketch import MinHashLSH

    if train.num_rows == 0 or held_out.num_rows == 0:
        return {}
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    for i, text in enumerate(_texts(train)):
        lsh.insert(i, _minhash(text, num_perm))
    found = {}
    for i, text in enumerate(_texts(held_out)):
        hits = lsh.query(_minhash(text, num_perm))
        if hits:
            found[i] = min(hits)
    return found


def orphaned_shards(data_dir: str | Path, clean_paths: list[str]) -> list[str]:
    """Shards under the dataset's raw/, clean/ and rejected/ folders that no current source file
    makes (its file was deleted from a local glob, or its source renamed): listed in the stats, and
    never read (build reads only the clean shards of the current files, its inputs)."""
    root = Path(data_dir)
    current = {Path(p).resolve().relative_to((root / "clean").resolve()) for p in clean_paths}
    return [
        str(p.relative_to(root))
        for stage in ("raw", "clean", "rejected")
        for p in sorted((root / stage).glob("*/*.parquet"))
        if p.relative_to(root / stage) not in current
    ]


def _where(table: pa.Table, idx: list[int]) -> list[str]:
    cols = table.select(["kiln_id", "file", "row"]).take(pa.array(idx, pa.int64())).to_pydict()
    return [f"{f} row {r} ({k})" for f, r, k in zip(cols["file"], cols["row"], cols["kiln_id"])]


def build_dataset(
    clean_paths: list[str],
    out_dir: str | Path,
    rejected_path: str | Path,
    stats_path: str | Path,
    settings: dict,
    mixture: dict[str, dict] | None = None,
    data_dir: str | Path | None = None,
) -> dict:
    """`mixture`: source name -> its `weight` and `max_rows` (absent: 1.0 and no cap). `data_dir`:
    the dataset's folder, searched for orphaned shards."""
    import datasets
    import pandas as pd

    mixture = mixture or {}
    tables = [pq.read_table(p) for p in clean_paths]
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows == 0:
        raise ValueError(
            f"no clean rows in {len(clean_paths)} shard(s): every row was rejected; "
            "see the rejected/ shards for the reasons"
        )
    seed = settings["seed"]
    # row index in `table` -> (reason, detail) for every row that reaches no split.
    reasons: dict[int, tuple[str, str]] = {}

    # Exact duplicates across shards: the first occurrence in config/source/file/row order wins.
    hashes = table.column("content_hash").to_numpy(zero_copy_only=False)
    is_dup = pd.Series(hashes).duplicated(keep="first").to_numpy()
    first_of = pd.Series(np.flatnonzero(~is_dup), index=hashes[~is_dup])
    dup_idx = np.flatnonzero(is_dup).tolist()
    of = first_of.loc[hashes[is_dup]].to_numpy().tolist()
    for i, where in zip(dup_idx, _where(table, of)):
        reasons[i] = ("duplicate", f"same content as {where}")
    if settings.get("near_dedup"):
        unique_idx = np.array(sorted(set(range(table.num_rows)) - set(reasons)))
        near = near_duplicates(table.take(unique_idx), settings["near_dedup_threshold"])
        pairs = sorted((int(unique_idx[i]), int(unique_idx[j])) for i, j in near.items())
        for (i, _), where in zip(pairs, _where(table, [j for _, j in pairs])):
            reasons[i] = ("near_duplicate", f"nearly the same content as {where}")

    sources = table.column("source").to_numpy(zero_copy_only=False).astype(object)
    ids = table.column("kiln_id").to_numpy(zero_copy_only=False).astype(object)
    alive = np.ones(table.num_rows, dtype=bool)
    alive[list(reasons)] = False
    names = list(dict.fromkeys(sources.tolist()))
    mix_stats = {
        n: {"weight": mixture.get(n, {}).get("weight", 1.0), "rows_unique": int((alive & (sources == n)).sum())}
        for n in names
    }
    caps = {n: m["max_rows"] for n, m in mixture.items() if m.get("max_rows") is not None}
    if caps:
        idx = np.flatnonzero(alive)
        kept = cap_rows(sources[idx], ids[idx], caps, seed)
        for i in idx[~kept].tolist():
            reasons[i] = ("max_rows", f"source {sources[i]} keeps {caps[sources[i]]} rows (max_rows)")
        alive[idx[~kept]] = False
    for n in names:
        mix_stats[n]["max_rows"] = caps.get(n)
        mix_stats[n]["rows_after_max_rows"] = int((alive & (sources == n)).sum())

    split = np.full(table.num_rows, "", dtype=object)
    split[alive] = split_by_hash(ids[alive], seed, settings["validation"], settings["test"])

    # Contamination audit: held-out rows that nearly duplicate a train row (exact ones are gone).
    audit: dict = {"threshold": settings.get("contamination_threshold", 0.8), "decontaminated": False}
    cap = settings.get("contamination_max_rows", 200_000)
    if settings.get("contamination_audit", True) and int(alive.sum()) > cap:
        # MinHash in Python costs about 0.4 ms a row: a million rows would add minutes to every build.
        audit["skipped"] = (
            f"{int(alive.sum())} rows > build.contamination_max_rows ({cap}); raise it to audit (about 0.4 ms a row)"
        )
        log.warning("contamination audit skipped: %s", audit["skipped"])
    elif settings.get("contamination_audit", True):
        train_idx = np.flatnonzero(split == "train")
        for name in ("validation", "test"):
            held_idx = np.flatnonzero(split == name)
            found = contamination(table.take(train_idx), table.take(held_idx), audit["threshold"])
            pairs = sorted((int(held_idx[i]), int(train_idx[j])) for i, j in found.items())
            audit[name] = {
                "rows": len(held_idx),
                "near_duplicates_of_train": len(pairs),
                "examples": [
                    {"held_out": a, "train": b}
                    for a, b in zip(_where(table, [i for i, _ in pairs[:5]]), _where(table, [j for _, j in pairs[:5]]))
                ],
            }
            if settings.get("decontaminate"):
                audit["decontaminated"] = True
                for (i, _), where in zip(pairs, _where(table, [j for _, j in pairs])):
                    reasons[i] = ("contaminated", f"{name} row nearly the same as train {where}")
                    split[i] = ""
                    alive[i] = False

    # Source weights: copies of each train row (0 copies: a reject with its reason).
    train_idx = np.flatnonzero(split == "train")
    copies = weight_copies(sources[train_idx], ids[train_idx], {n: m["weight"] for n, m in mix_stats.items()}, seed)
    for i in train_idx[copies == 0].tolist():
        reasons[i] = ("weight", f"source {sources[i]} weight {mix_stats[sources[i]]['weight']:g}: not drawn into train")
    train_rows = np.repeat(train_idx, copies)
    before, after = len(train_idx), max(1, len(train_rows))
    for n, m in mix_stats.items():
        in_train = sources[train_idx] == n
        m["train_before_weight"] = int(in_train.sum())
        m["train_after_weight"] = int(copies[in_train].sum())
        m["share_before"] = round(m["train_before_weight"] / max(1, before), 4)
        m["share_after"] = round(m["train_after_weight"] / after, 4)

    rej_idx = sorted(reasons)
    rejected = pa.table(
        {
            **{c: table.column(c).take(pa.array(rej_idx, pa.int64())) for c in ("kiln_id", "source", "file", "row")},
            "stage": pa.array(["build"] * len(rej_idx), pa.string()),
            "reason": [reasons[i][0] for i in rej_idx],
            "detail": [reasons[i][1] for i in rej_idx],
        },
        schema=REJECTED_SCHEMA,
    )
    dd = {}
    stats = {"rows_in": table.num_rows, "rows_rejected": rejected.num_rows, "splits": {}}
    for name in SPLITS:
        rows = train_rows if name == "train" else np.flatnonzero(split == name)
        part = table.take(pa.array(rows, pa.int64()))
        content = fingerprint(part)
        # Our content fingerprint doubles as the `datasets` one (else it pickles the whole table to make one).
        dd[name] = datasets.Dataset(part, fingerprint=content)
        stats["splits"][name] = {"rows": part.num_rows, "fingerprint": content}
    counts = Counter(reason for reason, _ in reasons.values())
    stats["rejected_by_reason"] = dict(sorted(counts.items()))
    stats["mixture"] = mix_stats
    stats["contamination"] = audit
    stats["orphaned_shards"] = orphaned_shards(data_dir, clean_paths) if data_dir else []
    if stats["orphaned_shards"]:
        log.warning(
            "%d shard(s) no current source file makes (not read): %s",
            len(stats["orphaned_shards"]),
            stats["orphaned_shards"][:5],
        )
    save_splits(dd, out_dir)
    Path(rejected_path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rejected, rejected_path)
    Path(stats_path).write_text(json.dumps(stats, indent=2))
    log.info("dataset: %s", {k: v["rows"] for k, v in stats["splits"].items()})
    return stats
