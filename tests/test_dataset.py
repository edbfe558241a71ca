import json
from dataclasses import replace

import datasets
import pyarrow.parquet as pq
from hypothesis import given, settings
from hypothesis import strategies as st
from test_clean import chat, raw_table

from kiln.clean import clean_table
from kiln.dataset import build_dataset, split_by_hash
from kiln.spec import BuildSettings, TokenizeSettings

BUILD = BuildSettings(near_dedup=False, near_dedup_threshold=0.8, validation=0.1, test=0.1, seed=0)


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
        [shard], tmp_path / "ds", tmp_path / "rej.parquet", tmp_path / "s.json", replace(BUILD, near_dedup=True)
    )
    assert stats["rejected_by_reason"] == {"near_duplicate": 1}


def test_an_empty_split_is_saved_loadable_and_tokenized(tmp_path):
    """`build.validation: 0` (or a dataset too small for a split) left a split with no data file, and
    tokenize crashed with an IndexError inside datasets.load_from_disk."""
    from test_tokenize import TOKENIZER

    from kiln.tokenize import tokenize_dataset

    a = write_shard(tmp_path, "a", [chat(f"order {i}", "ok") for i in range(30)])
    settings = replace(BUILD, validation=0.0)
    stats = build_dataset([a], tmp_path / "ds", tmp_path / "rej.parquet", tmp_path / "s.json", settings)
    assert stats["splits"]["validation"]["rows"] == 0
    dd = datasets.load_from_disk(str(tmp_path / "ds"))
    assert len(dd["validation"]) == 0 and dd["validation"].column_names == dd["train"].column_names
    tok = tokenize_dataset(
        tmp_path / "ds",
        TOKENIZER,
        tmp_path / "tok",
        tmp_path / "t.json",
        TokenizeSettings(max_seq_len=64, assistant_only_loss=True, packing=False),
    )
    assert tok["splits"]["validation"]["rows_kept"] == 0 and tok["splits"]["train"]["rows_kept"] > 0
    assert len(datasets.load_from_disk(str(tmp_path / "tok"))["validation"]) == 0


def _source_shard(tmp_path, name, records):
    """A clean shard whose rows come from source `name`."""
    import pyarrow as pa

    clean, _, _ = clean_table(raw_table(records))
    clean = clean.set_column(clean.schema.get_field_index("source"), "source", pa.array([name] * clean.num_rows))
    path = tmp_path / f"{name}.parquet"
    pq.write_table(clean, path)
    return str(path)


def test_source_weights_and_caps_are_deterministic_and_accounted_for(tmp_path):
    a = _source_shard(tmp_path, "a", [chat(f"apple order {i}", "ok") for i in range(300)])
    b = _source_shard(tmp_path, "b", [chat(f"banana order {i}", "ok") for i in range(100)])
    mixture = {"a": {"weight": 0.5, "max_rows": 200}, "b": {"weight": 2.0, "max_rows": None}}

    def build(name, shards=(a, b)):
        return build_dataset(
            list(shards), tmp_path / name, tmp_path / f"{name}.parquet", tmp_path / f"{name}.json", BUILD, mixture
        )

    stats = build("ds")
    mix = stats["mixture"]
    assert mix["a"]["rows_unique"] == 300 and mix["a"]["rows_after_max_rows"] == 200
    assert mix["b"]["train_after_weight"] == 2 * mix["b"]["train_before_weight"]
    assert 0.35 < mix["a"]["train_after_weight"] / mix["a"]["train_before_weight"] < 0.65
    assert mix["a"]["share_before"] > 0.5 > mix["a"]["share_after"]
    dd = datasets.load_from_disk(str(tmp_path / "ds"))
    train_sources = dd["train"]["source"]
    assert train_sources.count("b") == mix["b"]["train_after_weight"] and len(dd["train"]) == sum(
        m["train_after_weight"] for m in mix.values()
    )
    for split in ("validation", "test"):  # held-out rows are not weighted: each once
        assert len(set(dd[split]["kiln_id"])) == len(dd[split])
    rejected = pq.read_table(tmp_path / "ds.parquet").to_pylist()
    reasons = [r["reason"] for r in rejected]
    capped = [r for r in rejected if r["reason"] == "max_rows"]
    assert len(capped) == 100 and all(r["source"] == "a" and "keeps 200 rows (max_rows)" in r["detail"] for r in capped)
    assert reasons.count("weight") == mix["a"]["train_before_weight"] - mix["a"]["train_after_weight"]
    # Every row is accounted for: in a split (train rows once, however many copies) or rejected.
    unique = sum(len(set(dd[s]["kiln_id"])) for s in dd)
    assert unique + len(rejected) == stats["rows_in"] == 400
    # The same inputs give the same draw; more rows of b leave a's draw as it was.
    assert build("again")["splits"] == stats["splits"]
    more_b = _source_shard(tmp_path, "b", [chat(f"banana order {i}", "ok") for i in range(150)])
    grown = build("grown", (a, more_b))
    counts = ("rows_after_max_rows", "train_before_weight", "train_after_weight")
    assert [grown["mixture"]["a"][k] for k in counts] == [mix["a"][k] for k in counts]
    assert grown["splits"]["validation"]["rows"] > stats["splits"]["validation"]["rows"]


def test_contamination_is_audited_and_moved_out_when_asked(tmp_path):
    records = []
    for i in range(40):  # 40 pairs of near-duplicates (Jaccard 56/57 over word 5-grams)
        text = " ".join(f"w{i}_{k}" for k in range(60))
        records += [chat(text, "ok"), chat(text + " again", "ok")]
    shard = write_shard(tmp_path, "a", records)
    build = replace(BUILD, validation=0.2, test=0.3)
    stats = build_dataset([shard], tmp_path / "ds", tmp_path / "rej.parquet", tmp_path / "s.json", build)
    dd = datasets.load_from_disk(str(tmp_path / "ds"))

    def pair(row):
        return row["messages"][0]["content"].split(" ")[0]

    train_pairs = {pair(r) for r in dd["train"]}
    for split in ("validation", "test"):
        expected = sum(pair(r) in train_pairs for r in dd[split])
        assert stats["contamination"][split]["near_duplicates_of_train"] == expected > 0
        assert len(stats["contamination"][split]["examples"]) == min(5, expected)
    assert stats["contamination"]["decontaminated"] is False

    clean = build_dataset(
        [shard], tmp_path / "ds2", tmp_path / "rej2.parquet", tmp_path / "s2.json", replace(build, decontaminate=True)
    )
    dd2 = datasets.load_from_disk(str(tmp_path / "ds2"))
    assert not any(pair(r) in train_pairs for s in ("validation", "test") for r in dd2[s])
    moved = [r for r in pq.read_table(tmp_path / "rej2.parquet").to_pylist() if r["reason"] == "contaminated"]
    assert (
        len(moved)
        == clean["rejected_by_reason"]["contaminated"]
        == sum(stats["contamination"][s]["near_duplicates_of_train"] for s in ("validation", "test"))
    )
    assert "nearly the same as train f row" in moved[0]["detail"]
    assert dd2["train"]["kiln_id"] == dd["train"]["kiln_id"]


def test_a_mixture_and_the_contamination_audit_reach_the_data_page(workflow_factory, tmp_path):
    """Two sources, one capped and weighted down, the other weighted up, through Snakemake: the
    build stats, the data page and the rejects agree."""
    from conftest import tiny_config

    notes = tmp_path / "notes.jsonl"
    notes.write_text(
        "".join(
            json.dumps({"prompt": f"Note {i} about the {w} kiln and its glaze", "completion": f"A {w} kiln, note {i}."})
            + "\n"
            for i, w in enumerate(["hot", "cold", "new", "old"] * 30)
        )
    )
    cfg = tiny_config()
    cfg["datasets"]["orders"]["clean"].pop("answer_schema")
    synthetic = cfg["datasets"]["orders"]["sources"][0]
    cfg["datasets"]["orders"]["sources"] = [
        {**synthetic, "weight": 2},
        {"name": "notes", "kind": "local", "path": str(notes), "max_rows": 50, "weight": 0.5},
    ]
    wf = workflow_factory(cfg)
    wf.run("results/data/orders/report/data_stats.html")
    stats = json.loads(wf.path("data/orders/dataset_stats.json").read_text())
    mix = stats["mixture"]
    assert mix["notes"]["rows_unique"] == 120 and mix["notes"]["rows_after_max_rows"] == 50
    assert mix[synthetic["name"]]["train_after_weight"] == 2 * mix[synthetic["name"]]["train_before_weight"]
    assert mix["notes"]["share_after"] < mix["notes"]["share_before"]
    rejected = pq.read_table(wf.path("data/orders/build_rejected.parquet")).to_pylist()
    assert sum(r["reason"] == "max_rows" for r in rejected) == 70
    page = wf.path("data/orders/report/data_stats.html").read_text()
    assert "Sources in train (mixture: weight, max_rows)" in page and 'id="mixture"' in page
    assert "Contamination audit (Jaccard above 0.8; kept (build.decontaminate: false))" in page
    assert stats["contamination"]["test"]["rows"] == stats["splits"]["test"]["rows"]


def test_a_deleted_source_file_leaves_listed_orphans_never_read(workflow_factory, tmp_path):
    """A file removed from a local glob: its shards are listed as orphaned in the stats and the
    data page, and none of its rows reach the dataset. The page also shows each cleaning step's
    before/after examples, whitespace visible."""
    from conftest import tiny_config

    data = tmp_path / "data"
    data.mkdir()
    for name in ("a", "b"):
        rows = [
            {"prompt": f"Question {name}{i}:  why   fire   clay? ", "completion": f"Answer {name}{i}: to\tharden it."}
            for i in range(30)
        ]
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config()
    cfg["datasets"]["orders"]["clean"].pop("answer_schema")
    cfg["datasets"]["orders"]["sources"] = [{"name": "qa", "kind": "local", "path": str(data / "*.jsonl")}]
    wf = workflow_factory(cfg)
    target = "results/data/orders/report/data_stats.html"
    wf.run(target)
    page = wf.path("data/orders/report/data_stats.html").read_text()
    assert 'id="cleaning-steps"' in page and "Question a0:  why   fire   clay? " in page
    assert "Question a0: why fire clay?" in page  # the after side of the whitespace example
    (data / "b.jsonl").unlink()
    wf.run(target)
    stats = json.loads(wf.path("data/orders/dataset_stats.json").read_text())
    assert stats["orphaned_shards"] == [
        "raw/qa/b.jsonl.parquet",
        "clean/qa/b.jsonl.parquet",
        "rejected/qa/b.jsonl.parquet",
    ]
    dd = datasets.load_from_disk(str(wf.path("data/orders/dataset")))
    assert all("b" not in f.split("/")[-1] for s in dd for f in dd[s]["file"]) and stats["rows_in"] == 30
    page = wf.path("data/orders/report/data_stats.html").read_text()
    assert "Orphaned shards" in page and "clean/qa/b.jsonl.parquet" in page


def test_the_contamination_audit_says_when_it_is_skipped(tmp_path):
    shard = write_shard(tmp_path, "a", [chat(f"order {i}", "ok") for i in range(30)])
    build = replace(BUILD, contamination_max_rows=10)
    stats = build_dataset([shard], tmp_path / "ds", tmp_path / "rej.parquet", tmp_path / "s.json", build)
    assert stats["contamination"]["skipped"].startswith("30 rows > build.contamination_max_rows (10)")
    assert "test" not in stats["contamination"]
