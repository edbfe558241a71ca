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

from kiln.pairs import split_keys
from kiln.spec import BuildSettings
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


class _Fates:
    """The built table's rows and what became of each: a build reject's (reason, detail), or the
    split it reached."""

    def __init__(self, table: pa.Table):
        self.table = table
        self.sources = table.column("source").to_numpy(zero_copy_only=False).astype(object)
        self.ids = table.column("kiln_id").to_numpy(zero_copy_only=False).astype(object)
        self.reasons: dict[int, tuple[str, str]] = {}  # row index -> (reason, detail)
        self.split = np.full(table.num_rows, "", dtype=object)

    @property
    def alive(self) -> np.ndarray:
        alive = np.ones(self.table.num_rows, dtype=bool)
        alive[list(self.reasons)] = False
        return alive

    def where(self, idx) -> list[str]:
        return _where(self.table, list(idx))

    def reject_pairs(self, pairs: list[tuple[int, int]], reason: str, detail) -> None:
        """(row, the row it is compared with): a reject whose detail names where the other is."""
        for (i, _), where in zip(pairs, self.where(j for _, j in pairs)):
            self.reasons[i] = (reason, detail(where))
            self.split[i] = ""


def _read_clean(clean_paths: list[str]) -> pa.Table:
    tables = [pq.read_table(p) for p in clean_paths]
    table = pa.concat_tables(tables) if tables else None
    if table is None or table.num_rows == 0:
        raise ValueError(
            f"no clean rows in {len(clean_paths)} shard(s): every row was rejected; "
            "see the rejected/ shards for the reasons"
        )
    return table


def _drop_duplicates(rows: _Fates, settings: BuildSettings) -> None:
    """Exact duplicates across shards (the first occurrence in config/source/file/row order
    wins), then near-duplicates when asked."""
    import pandas as pd

    hashes = rows.table.column("content_hash").to_numpy(zero_copy_only=False)
    is_dup = pd.Series(hashes).duplicated(keep="first").to_numpy()
    first_of = pd.Series(np.flatnonzero(~is_dup), index=hashes[~is_dup])
    pairs = list(zip(np.flatnonzero(is_dup).tolist(), first_of.loc[hashes[is_dup]].to_numpy().tolist()))
    rows.reject_pairs(pairs, "duplicate", lambda where: f"same content as {where}")
    if settings.near_dedup:
        unique_idx = np.flatnonzero(rows.alive)
        near = near_duplicates(rows.table.take(unique_idx), settings.near_dedup_threshold)
        pairs = sorted((int(unique_idx[i]), int(unique_idx[j])) for i, j in near.items())
        rows.reject_pairs(pairs, "near_duplicate", lambda where: f"nearly the same content as {where}")


def _cap_sources(rows: _Fates, mixture: dict[str, dict], seed: int) -> dict[str, dict]:
    """Each source's `max_rows`; returns the mixture's stats so far (weight, rows before and after)."""
    names = list(dict.fromkeys(rows.sources.tolist()))
    alive = rows.alive
    mix = {
        n: {"weight": mixture.get(n, {}).get("weight", 1.0), "rows_unique": int((alive & (rows.sources == n)).sum())}
        for n in names
    }
    caps = {n: m["max_rows"] for n, m in mixture.items() if m.get("max_rows") is not None}
    if caps:
        idx = np.flatnonzero(alive)
        kept = cap_rows(rows.sources[idx], rows.ids[idx], caps, seed)
        for i in idx[~kept].tolist():
            rows.reasons[i] = ("max_rows", f"source {rows.sources[i]} keeps {caps[rows.sources[i]]} rows (max_rows)")
    alive = rows.alive
    for n in names:
        mix[n]["max_rows"] = caps.get(n)
        mix[n]["rows_after_max_rows"] = int((alive & (rows.sources == n)).sum())
    return mix


def _audit_contamination(rows: _Fates, settings: BuildSettings) -> dict:
    """Held-out rows that nearly duplicate a train row (exact ones are gone); moved out with
    `decontaminate`."""
    audit: dict = {"threshold": settings.contamination_threshold, "decontaminated": False}
    n_alive, cap = int(rows.alive.sum()), settings.contamination_max_rows
    if not settings.contamination_audit:
        return audit
    if n_alive > cap:
        # MinHash in Python costs about 0.4 ms a row: a million rows would add minutes to every build.
        audit["skipped"] = (
            f"{n_alive} rows > build.contamination_max_rows ({cap}); raise it to audit (about 0.4 ms a row)"
        )
        log.warning("contamination audit skipped: %s", audit["skipped"])
        return audit
    train_idx = np.flatnonzero(rows.split == "train")
    for name in ("validation", "test"):
        held_idx = np.flatnonzero(rows.split == name)
        found = contamination(rows.table.take(train_idx), rows.table.take(held_idx), audit["threshold"])
        pairs = sorted((int(held_idx[i]), int(train_idx[j])) for i, j in found.items())
        examples = zip(rows.where(i for i, _ in pairs[:5]), rows.where(j for _, j in pairs[:5]))
        audit[name] = {
            "rows": len(held_idx),
            "near_duplicates_of_train": len(pairs),
            "examples": [{"held_out": a, "train": b} for a, b in examples],
        }
        if settings.decontaminate:
            audit["decontaminated"] = True
            rows.reject_pairs(pairs, "contaminated", lambda where, n=name: f"{n} row nearly the same as train {where}")
    return audit


def _weigh_train(rows: _Fates, mix: dict[str, dict], seed: int) -> np.ndarray:
    """Copies of each train row under its source's weight (0 copies: a reject with its reason);
    returns the train rows' indices, repeated."""
    train_idx = np.flatnonzero(rows.split == "train")
    sources = rows.sources[train_idx]
    copies = weight_copies(sources, rows.ids[train_idx], {n: m["weight"] for n, m in mix.items()}, seed)
    for i in train_idx[copies == 0].tolist():
        weight = mix[rows.sources[i]]["weight"]
        rows.reasons[i] = ("weight", f"source {rows.sources[i]} weight {weight:g}: not drawn into train")
    train_rows = np.repeat(train_idx, copies)
    before, after = len(train_idx), max(1, len(train_rows))
    for n, m in mix.items():
        in_train = sources == n
        m["train_before_weight"] = int(in_train.sum())
        m["train_after_weight"] = int(copies[in_train].sum())
        m["share_before"] = round(m["train_before_weight"] / max(1, before), 4)
        m["share_after"] = round(m["train_after_weight"] / after, 4)
    return train_rows


def _rejected_table(rows: _Fates) -> pa.Table:
    idx = sorted(rows.reasons)
    return pa.table(
        {
            **{c: rows.table.column(c).take(pa.array(idx, pa.int64())) for c in ("kiln_id", "source", "file", "row")},
            "stage": pa.array(["build"] * len(idx), pa.string()),
            "reason": [rows.reasons[i][0] for i in idx],
            "detail": [rows.reasons[i][1] for i in idx],
        },
        schema=REJECTED_SCHEMA,
    )


def _splits(rows: _Fates, train_rows: np.ndarray) -> tuple[dict, dict]:
    """The `datasets` splits and their stats (rows, content fingerprint)."""
    import datasets

    dd, stats = {}, {}
    for name in SPLITS:
        idx = train_rows if name == "train" else np.flatnonzero(rows.split == name)
        part = rows.table.take(pa.array(idx, pa.int64()))
        content = fingerprint(part)
        # Our content fingerprint doubles as the `datasets` one (else it pickles the whole table to make one).
        dd[name] = datasets.Dataset(part, fingerprint=content)
        stats[name] = {"rows": part.num_rows, "fingerprint": content}
    return dd, stats


def build_dataset(
    clean_paths: list[str],
    out_dir: str | Path,
    rejected_path: str | Path,
    stats_path: str | Path,
    settings: BuildSettings,
    mixture: dict[str, dict] | None = None,
    data_dir: str | Path | None = None,
) -> dict:
    """`mixture`: source name -> its `weight` and `max_rows` (absent: 1.0 and no cap). `data_dir`:
    the dataset's folder, searched for orphaned shards."""
    rows = _Fates(_read_clean(clean_paths))
    _drop_duplicates(rows, settings)
    mix = _cap_sources(rows, mixture or {}, settings.seed)
    alive = rows.alive
    # a pair's split is its prompt's (kiln.pairs.split_keys): no prompt in two splits
    keys = np.asarray(split_keys(rows.table), dtype=object)
    rows.split[alive] = split_by_hash(keys[alive], settings.seed, settings.validation, settings.test)
    audit = _audit_contamination(rows, settings)
    train_rows = _weigh_train(rows, mix, settings.seed)
    rejected = _rejected_table(rows)
    dd, split_stats = _splits(rows, train_rows)
    orphans = orphaned_shards(data_dir, clean_paths) if data_dir else []
    if orphans:
        log.warning("%d shard(s) no current source file makes (not read): %s", len(orphans), orphans[:5])
    stats = {
        "rows_in": rows.table.num_rows,
        "rows_rejected": rejected.num_rows,
        "splits": split_stats,
        "rejected_by_reason": dict(sorted(Counter(reason for reason, _ in rows.reasons.values()).items())),
        "mixture": mix,
        "contamination": audit,
        "orphaned_shards": orphans,
    }
    save_splits(dd, out_dir)
    Path(rejected_path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(rejected, rejected_path)
    Path(stats_path).write_text(json.dumps(stats, indent=2))
    log.info("dataset: %s", {k: v["rows"] for k, v in stats["splits"].items()})
    return stats
