import json

import datasets
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st
from test_clean import chat, raw_table

from kiln.clean import clean_table
from kiln.dataset import build_dataset, split_by_hash

BUILD = {"near_dedup": False, "near_dedup_threshold": 0.8, "validation": 0.1, "test": 0.1, "seed": 0}


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=80, unique=True),
    st.lists(st.text(min_size=1, max_size=12), max_size=80),
    st.integers(0, 5),
)
def test_adding_rows_never_moves_an_existing_row(ids, new_ids, seed):
    before = dict(zip(ids, split_by_hash(ids, seed, 0.2, 0.2), strict=True))
    grown = ids + new_ids
    after = dict(zip(grown, split_by_hash(grown[::-1], seed, 0.2, 0.2)[::-1], strict=True))
    assert all(after[i] == before[i] for i in ids)


def test_split_shares_are_close_to_the_config():
    split = split_by_hash([str(i) for i in range(20000)], 0, 0.1, 0.05)
    assert abs((split == "validation").mean() - 0.1) < 0.01 and abs((split == "test").mean() - 0.05) < 0.01


def write_shard(tmp_path, name, records):
    clean, _, _ = clean_table(raw_table(records))
    path = tmp_path / f"{name}.parquet"
    pq.write_table(clean, path)
    return str(path)


def test_cross_shard_dedup_split_and_fingerprints(tmp_path):
    a = write_shard(tmp_path, "a", [chat(f"order {i}", "ok") for i in range(50)])
    b = write_shard(tmp_path, "b", [chat(f"order {i}", "ok") for i in range(40, 60)])  # 10 repeats of a
    stats = build_dataset([a, b], tmp_path / "ds", tmp_path / "rej.parquet", tmp_path / "s.json", BUILD)
    dd = datasets.load_from_disk(str(tmp_path / "ds"))
    assert sum(len(dd[s]) for s in dd) == 60
    rejected = pq.read_table(tmp_path / "rej.parquet").to_pylist()
    assert len(rejected) == 10 and {r["reason"] for r in rejected} == {"duplicate"}
    assert all("a.parquet" not in r["detail"] and "row" in r["detail"] for r in rejected)
    assert stats["rows_in"] == 70 and stats["rows_rejected"] == 10
    # Same inputs -> same fingerprints; different content -> different ones.
    again = build_dataset([a, b], tmp_path / "ds2", tmp_path / "rej2.parquet", tmp_path / "s2.json", BUILD)
    assert again["splits"] == stats["splits"]
    assert json.loads((tmp_path / "s.json").read_text())["splits"]["train"]["fingerprint"]


def test_near_duplicates_are_removed_when_asked(tmp_path):
    base = " ".join(f"word{i}" for i in range(60))
    shard = write_shard(
        tmp_path,
        "a",
        [chat(base, "ok"), chat(base + " extra", "ok"), chat("something entirely different about bikes", "ok")],
    )
    stats = build_dataset(
        [shard], tmp_path / "ds", tmp_path / "rej.parquet", tmp_path / "s.json", {**BUILD, "near_dedup": True}
    )
    assert stats["rejected_by_reason"] == {"near_duplicate": 1}


def test_an_empty_split_is_saved_loadable_and_tokenized(tmp_path):
    """`build.validation: 0` (or a dataset too small for a split) left a split with no data file, and
    tokenize crashed with an IndexError inside datasets.load_from_disk."""
    from test_tokenize import TOKENIZER

    from kiln.tokenize import tokenize_dataset

    a = write_shard(tmp_path, "a", [chat(f"order {i}", "ok") for i in range(30)])
    settings = {**BUILD, "validation": 0.0}
    stats = build_dataset([a], tmp_path / "ds", tmp_path / "rej.parquet", tmp_path / "s.json", settings)
    assert stats["splits"]["validation"]["rows"] == 0
    dd = datasets.load_from_disk(str(tmp_path / "ds"))
    assert len(dd["validation"]) == 0 and dd["validation"].column_names == dd["train"].column_names
    tok = tokenize_dataset(
        tmp_path / "ds",
        TOKENIZER,
        tmp_path / "tok",
        tmp_path / "t.json",
        {"max_seq_len": 64, "assistant_only_loss": True, "packing": False},
    )
    assert tok["splits"]["validation"]["rows_kept"] == 0 and tok["splits"]["train"]["rows_kept"] > 0
    assert len(datasets.load_from_disk(str(tmp_path / "tok"))["validation"]) == 0
