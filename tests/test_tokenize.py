import dataclasses
import json

import datasets
from conftest import TOKENIZER
from transformers import AutoTokenizer

from kiln.spec import TokenizeSettings
from kiln.tokenize import tokenize_batch, tokenize_dataset

TOK = AutoTokenizer.from_pretrained(str(TOKENIZER))
CHAT = [
    {"role": "system", "content": "Extract."},
    {"role": "user", "content": "Order 3 lamps"},
    {"role": "assistant", "content": '{"n": 3}'},
    {"role": "user", "content": "and 4?"},
    {"role": "assistant", "content": '{"n": 4}'},
]


def trainable_text(out, i=0):
    ids = [t for t, m in zip(out["input_ids"][i], out["assistant_masks"][i], strict=True) if m]
    return TOK.decode(ids)


def test_loss_falls_on_every_assistant_answer_and_its_end_of_turn_only():
    out = tokenize_batch({"messages": [CHAT], "kind": ["chat"]}, TOK, 512, True)
    assert trainable_text(out) == '{"n": 3}<|im_end|>{"n": 4}<|im_end|>'
    assert TOK.decode(out["input_ids"][0]).startswith("<|im_start|>system\nExtract.<|im_end|>")


def test_all_tokens_train_when_assistant_only_is_off_and_for_text_rows():
    out = tokenize_batch(
        {"messages": [CHAT, [{"role": "text", "content": "plain words"}]], "kind": ["chat", "text"]}, TOK, 512, False
    )
    assert all(out["assistant_masks"][0]) and all(out["assistant_masks"][1])
    assert TOK.decode(out["input_ids"][1]) == "plain words<|im_end|>"


def test_truncation_is_counted():
    out = tokenize_batch({"messages": [CHAT], "kind": ["chat"]}, TOK, 10, True)
    assert len(out["input_ids"][0]) == 10 and out["truncated"] == [True] and out["n_tokens"][0] > 10


def write_dataset(tmp_path, rows):
    ds = datasets.Dataset.from_list(
        [{"kiln_id": str(i), "content_hash": str(i), "kind": "chat", "messages": m} for i, m in enumerate(rows)]
    )
    datasets.DatasetDict({"train": ds, "validation": ds.select([0]), "test": ds.select([0])}).save_to_disk(
        str(tmp_path / "ds")
    )
    return tmp_path / "ds"


def test_tokenize_dataset_reports_truncation_and_drops_rows_left_without_loss(tmp_path):
    long_prompt = [{"role": "user", "content": "word " * 100}, {"role": "assistant", "content": "ok"}]
    path = write_dataset(tmp_path, [CHAT, long_prompt])
    stats = tokenize_dataset(
        path,
        TOKENIZER,
        tmp_path / "tok",
        tmp_path / "s.json",
        TokenizeSettings(max_seq_len=80, assistant_only_loss=True, packing=False),
    )
    train = stats["splits"]["train"]
    assert train["truncated"] == 1 and train["rows_kept"] == 1
    assert train["dropped_no_trainable_tokens"] == {"count": 1, "kiln_ids": ["1"]}
    assert train["trainable_tokens"] == 2 * len(TOK('{"n": 3}<|im_end|>', add_special_tokens=False).input_ids)


def test_packing_uses_trl_and_keeps_masks_aligned(tmp_path):
    path = write_dataset(tmp_path, [CHAT] * 6)
    stats = tokenize_dataset(
        path,
        TOKENIZER,
        tmp_path / "tok",
        tmp_path / "s.json",
        TokenizeSettings(max_seq_len=128, assistant_only_loss=True, packing=True),
    )
    packed = datasets.load_from_disk(str(tmp_path / "tok"))["train"]
    assert stats["splits"]["train"]["packed_sequences"] == len(packed) < 6
    for row in packed:
        assert len(row["input_ids"]) == len(row["assistant_masks"]) == sum(row["seq_lengths"]) <= 128


def test_cache_tokenizes_only_new_rows_and_gives_identical_output(tmp_path):
    rows = [CHAT]
    rows += [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(20)]
    settings = TokenizeSettings(max_seq_len=64, assistant_only_loss=True, packing=False)

    def build(rows, name):
        ds = datasets.Dataset.from_list(
            [
                {"kiln_id": str(i), "content_hash": json.dumps(m), "kind": "chat", "messages": m}
                for i, m in enumerate(rows)
            ]
        )
        datasets.DatasetDict({"train": ds, "validation": ds.select([0]), "test": ds.select([1])}).save_to_disk(
            str(tmp_path / name)
        )
        return tmp_path / name

    cache = tmp_path / "cache"
    first = tokenize_dataset(
        build(rows, "d1"), TOKENIZER, tmp_path / "t1", tmp_path / "s1.json", settings, cache_dir=cache
    )
    assert first["splits"]["train"]["rows_tokenized_now"] == len(rows)
    grown = rows + [[{"role": "user", "content": "new"}, {"role": "assistant", "content": "row"}]]
    second = tokenize_dataset(
        build(grown, "d2"), TOKENIZER, tmp_path / "t2", tmp_path / "s2.json", settings, cache_dir=cache
    )
    assert second["splits"]["train"]["rows_tokenized_now"] == 1
    assert second["splits"]["train"]["rows_from_cache"] == len(rows)
    nocache = tokenize_dataset(build(grown, "d3"), TOKENIZER, tmp_path / "t3", tmp_path / "s3.json", settings)
    cached_rows = datasets.load_from_disk(str(tmp_path / "t2"))["train"].to_list()
    assert cached_rows == datasets.load_from_disk(str(tmp_path / "t3"))["train"].to_list()
    assert nocache["splits"]["train"]["trainable_tokens"] == second["splits"]["train"]["trainable_tokens"]
    # Other settings: the cache does not apply.
    other = tokenize_dataset(
        build(grown, "d4"),
        TOKENIZER,
        tmp_path / "t4",
        tmp_path / "s4.json",
        dataclasses.replace(settings, max_seq_len=32),
        cache_dir=cache,
    )
    assert other["splits"]["train"]["rows_from_cache"] == 0
