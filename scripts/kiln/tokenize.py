"""Tokenize a built dataset with the base model's own tokenizer and chat template.

Conversations are rendered with the chat template in batches, encoded by the fast tokenizer in one
call per batch (with character offsets), and each token is marked trainable when it starts inside an
assistant answer (the answer and the end-of-turn token after it). Output: Arrow (``save_to_disk``)
with ``input_ids``, ``assistant_masks`` and the row's ``kiln_id``, plus token statistics.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


def assistant_spans(text: str, turns: list[dict], eos: str | None) -> list[tuple[int, int]]:
    """Character spans of the assistant answers inside a rendered conversation."""
    spans, cursor = [], 0
    for turn in turns:
        start = text.find(turn["content"], cursor) if turn["content"] else -1
        if start < 0:
            continue
        end = start + len(turn["content"])
        cursor = end
        if turn["role"] == "assistant":
            if eos and text.startswith(eos, end):
                end += len(eos)  # the model must learn to stop
            spans.append((start, end))
    return spans


def render(tokenizer, batch_messages: list[list[dict]], kinds: list[str]) -> list[str]:
    """Chat rows through the model's chat template (one batched call); text rows + end-of-text."""
    chat_idx = [i for i, k in enumerate(kinds) if k == "chat"]
    texts = [
        m[0]["content"] + (tokenizer.eos_token or "") if k == "text" else None for m, k in zip(batch_messages, kinds)
    ]
    if chat_idx:
        rendered = tokenizer.apply_chat_template([batch_messages[i] for i in chat_idx], tokenize=False)
        for i, text in zip(chat_idx, rendered):
            texts[i] = text
    return texts


def tokenize_batch(batch: dict, tokenizer, max_seq_len: int, assistant_only: bool) -> dict:
    """A `datasets.map(batched=True)` function: messages -> input_ids, assistant_masks, counts."""
    texts = render(tokenizer, batch["messages"], batch["kind"])
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = {"input_ids": [], "assistant_masks": [], "n_tokens": [], "truncated": []}
    for text, turns, kind, ids, offsets in zip(
        texts, batch["messages"], batch["kind"], enc["input_ids"], enc["offset_mapping"]
    ):
        if kind == "text" or not assistant_only:
            mask = np.ones(len(ids), dtype=np.int8)
        else:
            starts = np.fromiter((s for s, _ in offsets), dtype=np.int64, count=len(offsets))
            mask = np.zeros(len(ids), dtype=np.int8)
            for a, b in assistant_spans(text, turns, tokenizer.eos_token):
                mask[(starts >= a) & (starts < b)] = 1
        out["n_tokens"].append(len(ids))
        out["truncated"].append(len(ids) > max_seq_len)
        out["input_ids"].append(ids[:max_seq_len])
        out["assistant_masks"].append(mask[:max_seq_len].tolist())
    return out


def tokenize_dataset(
    dataset_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    stats_path: str | Path,
    settings: dict,
    num_proc: int = 1,
) -> dict:
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not tokenizer.is_fast:
        raise ValueError(f"{tokenizer_dir}: Kiln needs a fast tokenizer (character offsets for the loss mask)")
    dd = datasets.load_from_disk(str(dataset_dir))
    keep = ["kiln_id"]
    out, stats = {}, {"max_seq_len": settings["max_seq_len"], "packing": settings["packing"], "splits": {}}
    for split, ds in dd.items():
        tok = ds.map(
            tokenize_batch,
            batched=True,
            batch_size=1000,
            num_proc=num_proc if len(ds) > 5000 else None,
            remove_columns=[c for c in ds.column_names if c not in keep],
            fn_kwargs={
                "tokenizer": tokenizer,
                "max_seq_len": settings["max_seq_len"],
                "assistant_only": settings["assistant_only_loss"],
            },
            desc=f"tokenize {split}",
        )
        n_tokens = np.asarray(tok["n_tokens"], dtype=np.int64)
        trainable = np.asarray([sum(m) for m in tok["assistant_masks"]], dtype=np.int64)
        no_loss = tok.filter(lambda m: 1 not in m, input_columns="assistant_masks")["kiln_id"]
        tok = tok.filter(lambda m: 1 in m, input_columns="assistant_masks")
        split_stats = {
            "rows": len(ds),
            "rows_kept": len(tok),
            "dropped_no_trainable_tokens": {"count": len(no_loss), "kiln_ids": no_loss[:100]},
            "truncated": int(np.sum(n_tokens > settings["max_seq_len"])),
            "tokens_before_truncation": int(n_tokens.sum()),
            "tokens": int(np.minimum(n_tokens, settings["max_seq_len"]).sum()),
            "trainable_tokens": int(trainable.sum()),
            "length": {
                q: int(np.percentile(n_tokens, p)) if len(n_tokens) else 0
                for q, p in (("min", 0), ("p50", 50), ("p95", 95), ("max", 100))
            },
            "length_histogram": np.histogram(n_tokens, bins=20)[0].tolist() if len(n_tokens) else [],
        }
        tok = tok.remove_columns(["n_tokens", "truncated"])
        if settings["packing"] and len(tok):
            from trl.data_utils import pack_dataset

            tok = pack_dataset(tok.remove_columns(["kiln_id"]), settings["max_seq_len"], strategy="bfd")
            split_stats["packed_sequences"] = len(tok)
        out[split] = tok
        stats["splits"][split] = split_stats
        if split_stats["truncated"]:
            log.warning(
                "%s: %d rows longer than max_seq_len=%d were truncated",
                split,
                split_stats["truncated"],
                settings["max_seq_len"],
            )
    datasets.DatasetDict(out).save_to_disk(str(out_dir))
    Path(stats_path).write_text(json.dumps(stats, indent=2))
    return stats
