"""KTO (issue 27): Kiln's tokenized preference rows become the labelled answers TRL's KTOTrainer
makes of the same records (its own tokenization, its KL completions), and a pair's two answers stay
next to each other where TRL's unpairing puts all chosen answers first."""

from __future__ import annotations

import types

import datasets
import pytest
from conftest import TOKENIZER
from transformers import AutoTokenizer

from kiln.kto import KTO_COLUMNS, unpaired_rows, with_kl_completions
from kiln.pair_tokens import tokenize_pairs
from kiln.records import to_canonical
from kiln.synthetic_pairs import generate_pairs


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def _trl_rows(records: list[dict], tokenizer, tmp_path, batch_size: int, kl: bool) -> datasets.Dataset:
    """TRL's own KTOTrainer._prepare_dataset on the text records."""
    from trl import KTOConfig, KTOTrainer

    fake = types.SimpleNamespace(
        _tokenizer=tokenizer, calculate_KL=kl, desirable_weight=1.0, undesirable_weight=1.0
    )  # the attributes _prepare_dataset reads
    args = KTOConfig(
        output_dir=str(tmp_path), max_length=None, use_cpu=True, bf16=False, per_device_train_batch_size=batch_size
    )
    return KTOTrainer._prepare_dataset(fake, datasets.Dataset.from_list(records), tokenizer, args, "t")


def _ours(records: list[dict], tokenizer) -> datasets.Dataset:
    rows = [
        {"kiln_id": str(i), "kind": to_canonical(r)[1], "messages": to_canonical(r)[2]} for i, r in enumerate(records)
    ]
    tokens, stats = tokenize_pairs(datasets.Dataset.from_list(rows), tokenizer, 4096)
    return unpaired_rows(tokens), stats


def test_unpaired_rows_are_the_ids_and_kl_completions_trls_kto_trainer_makes(tokenizer, tmp_path):
    records = [
        {"prompt": p["prompt"], "completion": p["chosen" if i % 3 else "rejected"], "label": bool(i % 3)}
        for i, p in enumerate(generate_pairs(10, seed=2))
    ]
    ours, stats = _ours(records, tokenizer)
    assert stats["unpaired"] == 10 and stats["pairs"] == 0
    theirs = _trl_rows(records, tokenizer, tmp_path, batch_size=4, kl=True)
    mine = with_kl_completions(ours, 4)
    for col in (*KTO_COLUMNS, "KL_completion_ids"):
        assert mine[col] == theirs[col], col
    assert sum(mine["label"]) == 6 and len(mine) == 10


def test_a_pair_gives_its_two_answers_next_to_each_other(tokenizer, tmp_path):
    records = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in generate_pairs(6, seed=3)]
    ours, stats = _ours(records, tokenizer)
    assert stats["pairs"] == 6 and stats["unpaired"] == 0
    theirs = _trl_rows(records, tokenizer, tmp_path, batch_size=4, kl=False)
    key = lambda row: (tuple(row["prompt_ids"]), tuple(row["completion_ids"]), row["label"])  # noqa: E731
    assert sorted(map(key, ours)) == sorted(map(key, theirs))  # the same labelled answers...
    assert theirs["label"] == [True] * 6 + [False] * 6  # ...which TRL orders all chosen first
    assert ours["label"] == [True, False] * 6  # Kiln: each pair's two answers together
    assert all(ours[i]["prompt_ids"] == ours[i + 1]["prompt_ids"] for i in range(0, 12, 2))
