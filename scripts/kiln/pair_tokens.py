"""Preference rows tokenized in the tokenize stage (issue 27): ``prompt_ids`` / ``chosen_ids`` /
``rejected_ids`` as TRL's ``DPOTrainer._prepare_dataset`` makes them (tests/test_dpo.py holds the two
to the same ids). A KTO unpaired row (one answer, desirable or not) has the same columns with the
other answer's ids empty; its prompt and answer ids are those TRL's ``KTOTrainer._prepare_dataset``
makes (the same rule: the completion starts where prompt and prompt + answer diverge). Apart from
kiln.dpo / kiln.kto (the trainers) so that the tokenize stage's code is only this: a change of
training code does not re-tokenize every dataset."""

from __future__ import annotations

import logging

import numpy as np

from kiln.pairs import PREFERENCE_KINDS, split_prompt

log = logging.getLogger(__name__)
PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def pair_tokens(tokenizer, turns: list[dict]) -> tuple[list[int], list[int], list[int]]:
    """One canonical pair's prompt, chosen and rejected ids, as TRL's DPOTrainer tokenizes a
    conversational pair (trl 1.15 dpo_trainer.py ``tokenize_fn``); an unpaired row's answer absent
    gives [] (KTOTrainer's ``tokenize_fn`` for the one it has)."""
    from trl.data_utils import common_prefix_length

    prompt, answers = split_prompt(turns)

    def ids(messages, **kwargs):
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]

    prompt_ids = ids(prompt, add_generation_prompt=True)
    full = {
        role: ids(prompt + [{"role": "assistant", "content": answers[role]}])
        for role in ("chosen", "rejected")
        if role in answers
    }
    n = min(common_prefix_length(prompt_ids, seq) for seq in full.values())
    chosen, rejected = (full[role][n:] if role in full else [] for role in ("chosen", "rejected"))
    return prompt_ids[:n], chosen, rejected


def tokenize_pairs(ds, tokenizer, max_seq_len: int):
    """A split of pairs -> (datasets.Dataset of kiln_id + PAIR_COLUMNS, its stats). A pair whose
    prompt alone fills max_seq_len would train on nothing (TRL drops it too): left out and counted."""
    import datasets

    rows = {"kiln_id": [], **{c: [] for c in PAIR_COLUMNS}}
    dropped, lengths, tokens, trainable, unpaired = [], [], 0, 0, 0
    for kiln_id, kind, turns in zip(ds["kiln_id"], ds["kind"], ds["messages"], strict=True):
        if kind not in PREFERENCE_KINDS:
            raise ValueError(
                f"row {kiln_id} is a {kind} row in a dataset of preference rows (dpo and kto train on pairs "
                "or labelled answers only)"
            )
        p, c, r = pair_tokens(tokenizer, turns)
        if len(p) >= max_seq_len:
            dropped.append(kiln_id)
            continue
        unpaired += kind == "unpaired"
        for col, value in zip(("kiln_id", *PAIR_COLUMNS), (kiln_id, p, c, r)):
            rows[col].append(value)
        lengths.append(len(p) + max(len(c), len(r)))
        # what training sees of the row's sequences (each cut to max_seq_len, its start kept)
        seen = [min(len(p) + len(a), max_seq_len) for a in (c, r) if a]
        tokens += sum(seen)
        trainable += sum(n - len(p) for n in seen)
    n = np.asarray(lengths, dtype=np.int64)
    stats = {
        "rows": len(ds),
        "rows_kept": len(rows["kiln_id"]),
        "pairs": len(rows["kiln_id"]) - unpaired,
        # KTO's unpaired rows (one answer, desirable or not): their other answer's ids are empty
        "unpaired": unpaired,
        "dropped_prompt_fills_max_seq_len": {"count": len(dropped), "kiln_ids": dropped[:100]},
        "truncated": int(np.sum(n > max_seq_len)),
        "tokens_before_truncation": int(n.sum()),
        # both sequences of each pair: prompt + chosen and prompt + rejected
        "tokens": int(tokens),
        "trainable_tokens": int(trainable),
        # a pair's length: its prompt and its longer answer
        "length": {
            q: int(np.percentile(n, p)) if len(n) else 0
            for q, p in (("min", 0), ("p50", 50), ("p95", 95), ("max", 100))
        },
        "length_histogram": np.histogram(n, bins=20)[0].tolist() if len(n) else [],
        "length_bin_edges": np.histogram_bin_edges(n, bins=20).round(1).tolist() if len(n) else [],
    }
    features = datasets.Features(
        {"kiln_id": datasets.Value("string"), **{c: datasets.List(datasets.Value("int32")) for c in PAIR_COLUMNS}}
    )
    return datasets.Dataset.from_dict(rows, features=features), stats


def is_pair_dataset(dd) -> bool:
    """A built dataset of preference rows (its first row, in any split, is a pair or an unpaired row)."""
    return any(len(ds) and ds[0]["kind"] in PREFERENCE_KINDS for ds in dd.values())


def tokenize_pair_dataset(dd, tokenizer, max_seq_len: int, out_dir, stats_path) -> dict:
    """The tokenize stage for a dataset of pairs: every split through ``tokenize_pairs``, saved."""
    import json
    from pathlib import Path

    from kiln.tables import save_splits

    out, stats = {}, {"max_seq_len": max_seq_len, "packing": False, "pairs": True, "splits": {}}
    for split, ds in dd.items():
        out[split], stats["splits"][split] = tokenize_pairs(ds, tokenizer, max_seq_len)
        if stats["splits"][split]["truncated"]:
            log.warning(
                "%s: %d pairs longer than max_seq_len=%d are truncated in training (TRL keeps their start)",
                split,
                stats["splits"][split]["truncated"],
                max_seq_len,
            )
    save_splits(out, out_dir)
    Path(stats_path).write_text(json.dumps(stats, indent=2))
    return stats
