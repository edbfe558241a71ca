"""Preference records (issue 27) through the data stages: TRL's formats mapped, both answers
cleaned and checked, bad pairs rejected with their reason, a pair's split drawn from its prompt, the
wrong kind of record refused at collect naming its file and row, and the config refusals."""

from __future__ import annotations

import copy
import json

import pyarrow as pa
import pytest
from conftest import tiny_config

from kiln.clean import clean_table
from kiln.config import ConfigError, validate
from kiln.dataset import build_dataset
from kiln.experiment import SourceSpec
from kiln.pairs import split_keys
from kiln.records import RecordError, to_canonical
from kiln.sources import CollectError, canonical_rows, collect_shard
from kiln.spec import BuildSettings, CleanSettings
from kiln.synthetic import ANSWER_SCHEMA
from kiln.synthetic_pairs import FAILURES, SURFACES, generate_pairs
from kiln.tables import RAW_SCHEMA

SYSTEM = {"role": "system", "content": "Answer in JSON."}
USER = {"role": "user", "content": "Order: 2 kettles for Ann."}
PROMPT = [SYSTEM, USER]
CANONICAL = [SYSTEM, USER, {"role": "chosen", "content": "good"}, {"role": "rejected", "content": "bad"}]


@pytest.mark.parametrize(
    "record",
    [
        # conversational prompt / chosen / rejected
        {
            "prompt": PROMPT,
            "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}],
        },
        # the prompt as a shared `messages` prefix, answers as strings
        {"messages": PROMPT, "chosen": "good", "rejected": "bad"},
        # TRL's implicit prompt: whole conversations sharing every turn but the last
        {
            "chosen": [*PROMPT, {"role": "assistant", "content": "good"}],
            "rejected": [*PROMPT, {"role": "assistant", "content": "bad"}],
        },
    ],
    ids=["conversational", "messages-prefix", "implicit-prompt"],
)
def test_each_trl_pair_format_maps_to_one_canonical_pair(record):
    fmt, kind, turns = to_canonical(record)
    assert (fmt, kind, turns) == ("preference", "preference", CANONICAL)


def test_a_plain_pair_is_one_user_turn_and_kto_rows_carry_their_label_as_the_answer_role():
    assert to_canonical({"prompt": "Hi", "chosen": "a", "rejected": "b"})[2] == [
        {"role": "user", "content": "Hi"},
        {"role": "chosen", "content": "a"},
        {"role": "rejected", "content": "b"},
    ]
    good = to_canonical({"prompt": "Hi", "completion": "a", "label": True})
    bad = to_canonical({"prompt": PROMPT, "completion": [{"role": "assistant", "content": "b"}], "label": False})
    assert good == ("unpaired", "unpaired", [{"role": "user", "content": "Hi"}, {"role": "chosen", "content": "a"}])
    assert bad[2] == [*PROMPT, {"role": "rejected", "content": "b"}]


@pytest.mark.parametrize(
    "record, field, words",
    [
        ({"prompt": "Hi", "chosen": "a"}, "(record)", "no known format"),  # not a pair: no format matches
        ({"prompt": "Hi", "chosen": None, "rejected": "b"}, "chosen", "null"),
        ({"chosen": "a", "rejected": "b"}, "prompt", "needs the prompt"),
        (
            {"prompt": [*PROMPT, {"role": "assistant", "content": "x"}], "chosen": "a", "rejected": "b"},
            "prompt[2]",
            "ends with an assistant",
        ),
        (
            {"prompt": "Hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
            "chosen",
            "one assistant turn",
        ),
        (
            {
                "chosen": [*PROMPT, {"role": "assistant", "content": "a"}],
                "rejected": [USER, {"role": "assistant", "content": "b"}],
            },
            "rejected",
            "share every turn",
        ),
        ({"prompt": "Hi", "completion": "a", "label": "yes"}, "label", "true (desirable) or false"),
    ],
)
def test_a_record_that_is_not_a_usable_pair_names_its_field(record, field, words):
    with pytest.raises(RecordError) as err:
        to_canonical(record)
    assert err.value.field == field and words in str(err.value)


def _raw(records: list[dict]) -> pa.Table:
    items = [(i, r, json.dumps(r), None) for i, r in enumerate(records, 1)]
    rows = canonical_rows(items, source="s", file="pairs.jsonl", fmt="auto", columns={})
    return pa.Table.from_pylist(rows, schema=RAW_SCHEMA)


def _pair(chosen: str, rejected: str, user: str = "Order: 2 kettles for Ann.") -> dict:
    return {"prompt": [SYSTEM, {"role": "user", "content": user}], "chosen": chosen, "rejected": rejected}


GOOD = json.dumps(
    {"customer": "Ann", "product": "kettle", "quantity": 2, "unit_price": 9.5, "city": "Lyon", "date": "2025-01-02"}
)


def test_clean_rejects_identical_and_empty_answers_and_a_chosen_answer_off_the_schema():
    raw = _raw(
        [
            _pair(GOOD, GOOD.replace("2025-01-02", "01/02/2025")),  # kept: the rejected answer is the failure
            _pair(GOOD, GOOD + "  "),  # identical once whitespace is cleaned
            _pair("   ", GOOD),  # the chosen answer is empty after cleaning
            _pair(GOOD, ""),  # the rejected answer is empty
            _pair(GOOD.replace('"quantity": 2', '"quantity": "2"'), GOOD, user="Order: 3 mugs."),  # chosen fails
        ]
    )
    clean, rejected, stats = clean_table(raw, CleanSettings(answer_schema=ANSWER_SCHEMA))
    assert clean.column("row").to_pylist() == [1]
    why = dict(
        zip(
            rejected.column("row").to_pylist(),
            zip(rejected.column("reason").to_pylist(), rejected.column("detail").to_pylist()),
        )
    )
    assert why[2] == ("identical_answers", "chosen and rejected are the same text after cleaning")
    assert why[3] == ("empty_answer", "the chosen answer is empty after cleaning")
    assert why[4] == ("empty_answer", "the rejected answer is empty after cleaning")
    assert why[5][0] == "answer_schema" and "quantity" in why[5][1], why[5]
    assert stats["rows_in"] == 5 and stats["rows_rejected"] == 4


def test_both_answers_are_cleaned_and_both_count_in_the_content_hash():
    raw = _raw([_pair("a &amp; b", "c\x07d"), _pair("a & b", "c d"), _pair("a & b", "cd")])
    clean, rejected, _ = clean_table(raw, CleanSettings())
    turns = clean.column("messages").to_pylist()[0]
    assert [t["content"] for t in turns[-2:]] == ["a & b", "cd"]
    # row 3 equals row 1 once both are cleaned; row 2's rejected answer differs ("c d"): kept
    assert rejected.column("row").to_pylist() == [3] and rejected.column("reason").to_pylist() == ["duplicate"]


def test_every_pair_on_one_prompt_lands_in_one_split(tmp_path):
    pairs = [_pair(f"good {j}", f"bad {j}", user=f"order {i}") for i in range(60) for j in range(3)]
    clean, _, _ = clean_table(_raw(pairs), CleanSettings())
    shard = tmp_path / "clean.parquet"
    import pyarrow.parquet as pq

    pq.write_table(clean, shard)
    build_dataset(
        [str(shard)],
        tmp_path / "ds",
        tmp_path / "rej.parquet",
        tmp_path / "stats.json",
        BuildSettings(validation=0.2, test=0.2),
    )
    import datasets

    dd = datasets.load_from_disk(str(tmp_path / "ds"))
    split_of = {}
    for split, ds in dd.items():
        for turns in ds["messages"]:
            split_of.setdefault(turns[1]["content"], set()).add(split)
    assert len(split_of) == 60 and all(len(s) == 1 for s in split_of.values())
    assert {next(iter(s)) for s in split_of.values()} == {"train", "validation", "test"}
    keys = split_keys(clean)
    assert len(set(keys)) == 60 and keys != clean.column("kiln_id").to_pylist()


def test_collect_refuses_a_row_of_the_wrong_kind_naming_its_file_and_row(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(_pair("a", "b")) + "\n" + json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    src = SourceSpec(name="s", kind="local", path=str(path))
    with pytest.raises(
        CollectError,
        match=r"mixed.jsonl: row 2: a chat record \(prompt_completion format\), but dataset 'p' is trained "
        r"with method dpo",
    ):
        collect_shard(src, "mixed.jsonl", tmp_path / "raw.parquet", dataset="p", kinds=["preference"])
    with pytest.raises(CollectError, match=r"row 1: a preference record .* trained with method sft"):
        collect_shard(src, "mixed.jsonl", tmp_path / "raw.parquet", dataset="p", kinds=["chat", "text"])


def test_the_shipped_pairs_are_one_failure_each_and_every_chosen_answer_passes_the_schema():
    pairs = generate_pairs(len(FAILURES) * 20, seed=5)
    assert {p["failure"] for p in pairs} == set(FAILURES) | set(SURFACES)
    assert all(p["chosen"][0]["content"] != p["rejected"][0]["content"] for p in pairs)
    clean, rejected, _ = clean_table(_raw(pairs), CleanSettings(answer_schema=ANSWER_SCHEMA))
    assert rejected.num_rows == 0 and clean.num_rows == len(pairs)
    assert generate_pairs(30, seed=5) == pairs[:30]  # deterministic for a seed


def _dpo_config(**training) -> dict:
    cfg = tiny_config()
    cfg["datasets"]["pairs"] = {"sources": [{"name": "p", "kind": "local", "path": "pairs.jsonl"}]}
    cfg["experiments"]["tiny-dpo"] = copy.deepcopy(cfg["experiments"]["tiny"])
    cfg["experiments"]["tiny-dpo"]["dataset"] = "pairs"
    cfg["experiments"]["tiny-dpo"]["training"].update(method="dpo", from_experiment="tiny", **training)
    return cfg


def test_a_dpo_experiment_validates_and_its_settings_are_typed():
    cfg = validate(_dpo_config(beta=0.3, loss_type="ipo", sft_weight=0.5))
    t = cfg["experiments"]["tiny-dpo"]["training"]
    assert (t["method"], t["beta"], t["loss_type"], t["label_smoothing"], t["sft_weight"]) == (
        "dpo",
        0.3,
        "ipo",
        0.0,
        0.5,
    )


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda c: c["experiments"]["tiny-dpo"]["training"].update(from_experiment="nope"),
            "from_experiment: 'nope' is not in `experiments`",
        ),
        (
            lambda c: c["experiments"]["tiny-dpo"]["training"].pop("from_experiment"),
            "from_experiment: method 'dpo' starts from an SFT experiment",
        ),
        (
            lambda c: c["experiments"]["tiny"]["training"].update(from_experiment="tiny-dpo"),
            "from_experiment: set for method 'sft'",
        ),
        (
            lambda c: c["experiments"]["tiny-dpo"]["training"].update(lora_r=8),
            "training.lora_r: 8 differs from 'tiny' (4)",
        ),
        (
            lambda c: c["experiments"]["tiny-dpo"]["training"].update(beta=0),
            "beta: 0 is less than or equal to the minimum",
        ),
        (
            lambda c: c["experiments"]["tiny-dpo"]["training"].update(loss_type="kto"),
            "loss_type: 'kto' is not a loss of method dpo; use one of sigmoid, ipo, hinge, robust",
        ),
        (
            lambda c: c["experiments"]["tiny-dpo"]["training"].update(loss_type="robust", label_smoothing=0.5),
            "robust loss needs 0 <= label_smoothing < 0.5",
        ),
        (
            lambda c: c["experiments"]["tiny-dpo"]["training"].update(backend="unsloth"),
            "training.backend: not available with method dpo",
        ),
        (
            lambda c: c["experiments"]["tiny-dpo"]["tokenize"].update(packing=True),
            "tokenize.packing: preference rows are not packed",
        ),
        (
            lambda c: c["datasets"]["pairs"]["sources"][0].update(format="messages"),
            "has format 'messages'; method dpo trains on pairs",
        ),
        (lambda c: c["experiments"]["tiny"].update(dataset="pairs"), "dataset: 'pairs' holds the preference pairs"),
    ],
    ids=[
        "unknown",
        "missing",
        "sft-with-source",
        "lora-shape",
        "beta",
        "loss",
        "robust",
        "unsloth",
        "packing",
        "format",
        "sft-on-pairs",
    ],
)
def test_a_dpo_experiment_that_cannot_work_is_refused_at_parse_time_in_one_line(change, message):
    cfg = _dpo_config()
    change(cfg)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_from_experiment_must_be_sft_on_the_same_model():
    cfg = _dpo_config()
    cfg["experiments"]["tiny-dpo2"] = copy.deepcopy(cfg["experiments"]["tiny-dpo"])
    cfg["experiments"]["tiny-dpo2"]["training"]["from_experiment"] = "tiny-dpo"
    with pytest.raises(ConfigError, match="'tiny-dpo' is a dpo experiment; name the SFT experiment"):
        validate(cfg)
    cfg = _dpo_config()
    cfg["models"]["tiny2"] = copy.deepcopy(cfg["models"]["tiny"])
    cfg["experiments"]["tiny-dpo"]["model"] = "tiny2"
    with pytest.raises(ConfigError, match="'tiny' trains model 'tiny', this experiment 'tiny2'"):
        validate(cfg)


def _kto_config(**training) -> dict:
    cfg = _dpo_config()
    cfg["experiments"]["tiny-kto"] = copy.deepcopy(cfg["experiments"]["tiny-dpo"])
    cfg["experiments"]["tiny-kto"]["training"].update(method="kto", loss_type="kto", **training)
    return cfg


def test_a_kto_experiment_validates_and_its_settings_are_typed():
    cfg = validate(_kto_config(desirable_weight=1.2, undesirable_weight=0.8, beta=0.2))
    t = cfg["experiments"]["tiny-kto"]["training"]
    assert (t["method"], t["loss_type"], t["beta"], t["desirable_weight"], t["undesirable_weight"]) == (
        "kto",
        "kto",
        0.2,
        1.2,
        0.8,
    )
    from kiln.preference import expected_kinds

    # pairs (dpo and kto both train on them): only pairs; a kto-only dataset takes unpaired rows too
    assert expected_kinds(cfg, "pairs") == ["preference"]
    del cfg["experiments"]["tiny-dpo"]
    assert expected_kinds(cfg, "pairs") == ["preference", "unpaired"]


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda t: t.update(loss_type="sigmoid"),
            "training.loss_type: 'sigmoid' is not a loss of method kto; use one of kto, apo_zero_unpaired",
        ),
        (lambda t: t.update(sft_weight=1.0), "training.sft_weight: dpo only"),
        (lambda t: t.update(per_device_batch_size=1), "training.per_device_batch_size: the kto loss estimates"),
        (lambda t: t.update(desirable_weight=0), "desirable_weight: 0 is less than or equal to the minimum"),
        (lambda t: t.pop("from_experiment"), "from_experiment: method 'kto' starts from an SFT experiment"),
        (lambda t: t.update(backend="unsloth"), "training.backend: not available with method kto"),
    ],
    ids=["dpo-loss", "sft-weight", "batch-1", "weight-0", "no-source", "unsloth"],
)
def test_a_kto_experiment_that_cannot_work_is_refused_at_parse_time_in_one_line(change, message):
    cfg = _kto_config()
    change(cfg["experiments"]["tiny-kto"]["training"])
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_collect_tells_which_method_takes_a_row_of_another_kind(tmp_path):
    unpaired = {"prompt": "Order: 2 kettles", "completion": "{}", "label": False}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(_pair("a", "b")) + "\n" + json.dumps(unpaired) + "\n")
    src = SourceSpec(name="s", kind="local", path=str(path))
    with pytest.raises(CollectError, match=r"row 2: an unpaired record .* train unpaired rows with method kto"):
        collect_shard(src, "rows.jsonl", tmp_path / "raw.parquet", dataset="p", kinds=["preference"])
    # a kto dataset takes both; a chat row is refused there, saying what kto needs
    collect_shard(src, "rows.jsonl", tmp_path / "raw.parquet", dataset="p", kinds=["preference", "unpaired"])
    path.write_text(json.dumps({"prompt": "x", "completion": "y"}) + "\n")
    with pytest.raises(CollectError, match=r"row 1: a chat record .* trained with method kto, which needs answers"):
        collect_shard(src, "rows.jsonl", tmp_path / "raw2.parquet", dataset="p", kinds=["preference", "unpaired"])
