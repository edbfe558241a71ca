"""Tokenize a built dataset with the base model's own tokenizer and chat template.

Conversations are rendered with the chat template in batches, encoded by the fast tokenizer in one
call per batch (with character offsets), and each token is marked trainable when it starts inside an
assistant answer (the answer and the end-of-turn token after it). Output: Arrow (``save_to_disk``)
with ``input_ids``, ``assistant_masks`` and the row's ``kiln_id``, plus token statistics.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

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


def _span_tokens(encoding, a: int, b: int) -> tuple[int, int]:
    """[first, end) of the tokens that start inside characters [a, b) of the encoded text."""
    first = encoding.char_to_token(a)
    if first is not None and encoding.token_to_chars(first)[0] < a:
        first += 1  # that token began before the answer (merged with the text before it)
    last = encoding.char_to_token(b - 1)
    if first is None or last is None:
        return 0, 0
    return first, last + 1


def tokenize_batch(batch: dict, tokenizer, max_seq_len: int, assistant_only: bool) -> dict:
    """A `datasets.map(batched=True)` function: messages -> input_ids, assistant_masks, counts.

    One chat-template render and one fast-tokenizer call per batch; each answer's tokens are found
    from its two character boundaries (``char_to_token``), not by walking every token's offsets.
    """
    texts = render(tokenizer, batch["messages"], batch["kind"])
    enc = tokenizer(texts, add_special_tokens=False)
    out = {"input_ids": [], "assistant_masks": [], "n_tokens": [], "truncated": []}
    eos = tokenizer.eos_token
    for i, (text, turns, kind) in enumerate(zip(texts, batch["messages"], batch["kind"])):
        ids = enc["input_ids"][i]
        n = len(ids)
        if kind == "text" or not assistant_only:
            mask = [1] * n
        else:
            mask = [0] * n
            encoding = enc.encodings[i]
            for a, b in assistant_spans(text, turns, eos):
                first, end = _span_tokens(encoding, a, b)
                mask[first:end] = [1] * (end - first)
        out["n_tokens"].append(n)
        out["truncated"].append(n > max_seq_len)
        out["input_ids"].append(ids[:max_seq_len])
        out["assistant_masks"].append(mask[:max_seq_len])
    return out


class TokenCache:
    """Tokens of rows already seen, by content hash: a new shard re-tokenizes only its own rows.

    Lives outside Snakemake's outputs (which a rerun deletes). Valid only for the tokenizer files,
    settings and tokenization code it was made with; anything else starts an empty cache.
    """

    COLUMNS = ("content_hash", "input_ids", "assistant_masks", "n_tokens")

    def __init__(self, cache_dir: str | Path | None, tokenizer_dir: str | Path, settings: dict):
        self.dir = Path(cache_dir) if cache_dir else None
        self.key = self._key(tokenizer_dir, settings)
        self.table = None
        if self.dir and (self.dir / "key.txt").exists() and (self.dir / "key.txt").read_text() == self.key:
            parts = sorted(self.dir.glob("part-*.parquet"))
            self.table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts else None
        elif self.dir and self.dir.exists():
            shutil.rmtree(self.dir)  # made with another tokenizer, settings or code

    @staticmethod
    def _key(tokenizer_dir, settings) -> str:
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        h.update(Path(__file__).read_bytes())
        for f in sorted(Path(tokenizer_dir).iterdir()):
            if f.name.startswith(("tokenizer", "special_tokens")) or f.suffix == ".jinja":
                h.update(f.name.encode() + f.read_bytes())
        return h.hexdigest()

    def lookup(self, hashes: pa.Array) -> pa.Array:
        """Index into the cache of each hash (null where not cached)."""
        if self.table is None:
            return pa.nulls(len(hashes), pa.int32())
        return pc.index_in(hashes, value_set=self.table.column("content_hash"))

    def add_and_save(self, new: list[pa.Table]) -> None:
        """Append the rows tokenized now as a new part (earlier parts are never rewritten)."""
        rows = [t.select(self.COLUMNS) for t in new if t.num_rows]
        if not self.dir or not rows:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        part = self.dir / f"part-{len(list(self.dir.glob('part-*.parquet'))):05d}.parquet"
        pq.write_table(pa.concat_tables(rows), part.with_suffix(".tmp"))
        part.with_suffix(".tmp").replace(part)
        (self.dir / "key.txt").write_text(self.key)


TOKENS_SCHEMA = pa.schema(
    [
        ("kiln_id", pa.string()),
        ("content_hash", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("assistant_masks", pa.list_(pa.int8())),
        ("n_tokens", pa.int32()),
    ]
)


def tokenize_rows(rows: pa.Table, tokenizer, settings: dict, batch_size: int = 1000) -> pa.Table:
    """Tokenize rows in batches straight into Arrow columns (one render and encode per batch)."""
    cols = {name: [] for name in TOKENS_SCHEMA.names}
    for batch in rows.select(["kiln_id", "content_hash", "kind", "messages"]).to_batches(batch_size):
        data = batch.to_pydict()
        out = tokenize_batch(data, tokenizer, settings["max_seq_len"], settings["assistant_only_loss"])
        cols["kiln_id"] += data["kiln_id"]
        cols["content_hash"] += data["content_hash"]
        for key in ("input_ids", "assistant_masks", "n_tokens"):
            cols[key] += out[key]
    return pa.table(cols, schema=TOKENS_SCHEMA)


def tokenize_split(ds, tokenizer, settings: dict, cache: TokenCache) -> tuple[pa.Table, pa.Table]:
    """(tokens of every row in order, the rows tokenized now): cached rows are reused."""
    ds = ds.flatten_indices() if ds._indices is not None else ds
    rows = ds.data.table
    where = cache.lookup(rows.column("content_hash").combine_chunks())
    hit = where.is_valid().to_numpy(zero_copy_only=False)
    new = tokenize_rows(rows.filter(pa.array(~hit)), tokenizer, settings)
    if not hit.any():
        return new, new
    cached = cache.table.take(pc.drop_null(where)).select(TokenCache.COLUMNS).cast(TOKENS_SCHEMA.remove(0))
    cached = cached.add_column(0, "kiln_id", rows.column("kiln_id").filter(pa.array(hit)))
    positions = np.concatenate([np.flatnonzero(hit), np.flatnonzero(~hit)])
    table = pa.concat_tables([cached, new]).append_column("_pos", pa.array(positions))
    return table.sort_by("_pos").drop_columns(["_pos"]), new


def tokenize_dataset(
    dataset_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    stats_path: str | Path,
    settings: dict,
    cache_dir: str | Path | None = None,
) -> dict:
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not tokenizer.is_fast:
        raise ValueError(f"{tokenizer_dir}: Kiln needs a fast tokenizer (character offsets for the loss mask)")
    dd = datasets.load_from_disk(str(dataset_dir))
    cache = TokenCache(cache_dir, tokenizer_dir, settings)
    out, fresh = {}, []
    stats = {"max_seq_len": settings["max_seq_len"], "packing": settings["packing"], "splits": {}}
    for split, ds in dd.items():
        table, new = tokenize_split(ds, tokenizer, settings, cache)
        fresh.append(new)
        n_tokens = table.column("n_tokens").to_numpy()
        masks = table.column("assistant_masks").combine_chunks()
        flat = masks.flatten().to_numpy()
        starts = masks.offsets.to_numpy()[:-1]
        trainable = np.add.reduceat(flat, starts) if len(flat) else np.zeros(len(starts), dtype=np.int64)
        trainable[np.diff(masks.offsets.to_numpy()) == 0] = 0
        has_loss = trainable > 0
        no_loss = table.column("kiln_id").filter(pa.array(~has_loss)).to_pylist()
        table = table.filter(pa.array(has_loss))
        split_stats = {
            "rows": len(ds),
            "rows_kept": table.num_rows,
            "rows_tokenized_now": new.num_rows,
            "rows_from_cache": len(ds) - new.num_rows,
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
        tok = datasets.Dataset(table.select(["kiln_id", "input_ids", "assistant_masks"]))
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
    cache.add_and_save(fresh)
    Path(stats_path).write_text(json.dumps(stats, indent=2))
    return stats
