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
from itertools import chain
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from kiln.families import answer_lead
from kiln.spec import TokenizeSettings
from kiln.tables import TOKENS_SCHEMA, save_splits

log = logging.getLogger(__name__)


def assistant_spans(text: str, turns: list[dict], eos: str | None, lead: str = "") -> list[tuple[int, int]]:
    """Character spans of the assistant answers inside a rendered conversation: each answer, the
    end-of-turn token after it, and ``lead`` before it (what the template writes between the
    generation prompt and the answer, kiln.families.answer_lead: Mistral's space, which shares a
    token with the answer's first characters)."""
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
            if lead and text.endswith(lead, 0, start):
                start -= len(lead)
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


def _backend(tokenizer):
    """The `tokenizers` object behind a fast tokenizer, with no truncation or padding of its own."""
    backend = getattr(tokenizer, "_kiln_backend", None)
    if backend is None:
        from tokenizers import Tokenizer

        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        backend.no_truncation()
        backend.no_padding()
        tokenizer._kiln_backend = backend
    return backend


def encode_flat(batch: dict, tokenizer, assistant_only: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render and encode a batch; return (token ids, trainable mask, tokens per row) as flat arrays.

    One chat-template render and one `tokenizers` `encode_batch` call per batch (it runs on every
    core); each answer's tokens are found from its two character boundaries (``char_to_token``),
    and the mask is written for the whole batch at once from those boundaries.
    """
    texts = render(tokenizer, batch["messages"], batch["kind"])
    encodings = _backend(tokenizer).encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter((len(e) for e in encodings), dtype=np.int64, count=len(encodings))
    total = int(lengths.sum())
    ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=total)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(lengths) else lengths
    edges = np.zeros(total + 1, dtype=np.int32)  # +1 where a trainable run starts, -1 where it ends
    eos = tokenizer.eos_token
    lead = answer_lead(tokenizer) if assistant_only and "chat" in batch["kind"] else ""
    for i, (text, turns, kind) in enumerate(zip(texts, batch["messages"], batch["kind"])):
        if kind == "text" or not assistant_only:
            runs = [(0, int(lengths[i]))]
        else:
            runs = [_span_tokens(encodings[i], a, b) for a, b in assistant_spans(text, turns, eos, lead)]
        for first, end in runs:
            if end > first:
                edges[starts[i] + first] += 1
                edges[starts[i] + end] -= 1
    mask = (np.cumsum(edges[:-1]) > 0).astype(np.int8)
    return ids, mask, lengths


def tokenize_batch(batch: dict, tokenizer, max_seq_len: int, assistant_only: bool) -> dict:
    """A `datasets.map(batched=True)` function: messages -> input_ids, assistant_masks, counts."""
    ids, mask, lengths = encode_flat(batch, tokenizer, assistant_only)
    bounds = np.concatenate([[0], np.cumsum(lengths)])
    out = {"input_ids": [], "assistant_masks": [], "n_tokens": lengths.tolist(), "truncated": []}
    for a, n in zip(bounds[:-1], lengths):
        out["input_ids"].append(ids[a : a + min(n, max_seq_len)].tolist())
        out["assistant_masks"].append(mask[a : a + min(n, max_seq_len)].tolist())
        out["truncated"].append(bool(n > max_seq_len))
    return out


# The tokenization code as this process loaded it (read once: an edit made while a run is going
# on must not change the key of that run's cache).
_CODE = Path(__file__).read_bytes()


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
            # Uncompressed Arrow IPC, memory-mapped: opening the cache reads almost nothing.
            parts = [pa.ipc.open_file(pa.memory_map(str(p))).read_all() for p in sorted(self.dir.glob("part-*.arrow"))]
            self.table = pa.concat_tables(parts) if parts else None
        elif self.dir and self.dir.exists():
            shutil.rmtree(self.dir)  # made with another tokenizer, settings or code

    @staticmethod
    def _key(tokenizer_dir, settings) -> str:
        h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
        h.update(_CODE)
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
        part = self.dir / f"part-{len(list(self.dir.glob('part-*.arrow'))):05d}.arrow"
        table = pa.concat_tables(rows)
        with pa.OSFile(str(part.with_suffix(".tmp")), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        part.with_suffix(".tmp").replace(part)
        (self.dir / "key.txt").write_text(self.key)


def tokenize_rows(rows: pa.Table, tokenizer, s: TokenizeSettings, batch_size: int = 1000) -> pa.Table:
    """Tokenize rows in batches straight into Arrow columns; truncation is one vectorised cut."""
    max_len, parts = s.max_seq_len, []
    for batch in rows.select(["kiln_id", "content_hash", "kind", "messages"]).to_batches(batch_size):
        data = batch.to_pydict()
        ids, mask, lengths = encode_flat(data, tokenizer, s.assistant_only_loss)
        position = np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        keep = position < max_len
        offsets = pa.array(np.concatenate([[0], np.cumsum(np.minimum(lengths, max_len))]), pa.int32())
        parts.append(
            pa.table(
                {
                    "kiln_id": batch.column("kiln_id"),
                    "content_hash": batch.column("content_hash"),
                    "input_ids": pa.ListArray.from_arrays(offsets, pa.array(ids[keep])),
                    "assistant_masks": pa.ListArray.from_arrays(offsets, pa.array(mask[keep])),
                    "n_tokens": pa.array(lengths, pa.int32()),
                },
                schema=TOKENS_SCHEMA,
            )
        )
    return pa.concat_tables(parts) if parts else TOKENS_SCHEMA.empty_table()


def tokenize_split(ds, tokenizer, settings: TokenizeSettings, cache: TokenCache) -> tuple[pa.Table, pa.Table]:
    """(tokens of every row in order, the rows tokenized now): cached rows are reused."""
    ds = ds.flatten_indices() if ds._indices is not None else ds
    rows = ds.data.table
    where = cache.lookup(rows.column("content_hash").combine_chunks())
    hit = where.is_valid().to_numpy(zero_copy_only=False)
    new = tokenize_rows(rows.filter(pa.array(~hit)), tokenizer, settings)
    if not hit.any():
        return new, new
    # One take, in row order, over the cache and the new rows side by side.
    columns = list(TokenCache.COLUMNS)
    both = pa.concat_tables([cache.table.select(columns).cast(TOKENS_SCHEMA.remove(0)), new.select(columns)])
    index = np.empty(len(hit), dtype=np.int64)
    index[hit] = pc.drop_null(where).to_numpy()
    index[~hit] = cache.table.num_rows + np.arange(new.num_rows)
    table = both.take(pa.array(index)).add_column(0, "kiln_id", rows.column("kiln_id"))
    return table, new


def tokenize_dataset(
    dataset_dir: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    stats_path: str | Path,
    settings: TokenizeSettings,
    cache_dir: str | Path | None = None,
) -> dict:
    import datasets
    from transformers import AutoTokenizer

    s = settings
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if not tokenizer.is_fast:
        raise ValueError(f"{tokenizer_dir}: Kiln needs a fast tokenizer (character offsets for the loss mask)")
    dd = datasets.load_from_disk(str(dataset_dir))
    from kiln.pair_tokens import is_pair_dataset, tokenize_pair_dataset

    if is_pair_dataset(dd):  # preference pairs: prompt / chosen / rejected ids, as TRL's DPOTrainer reads them
        return tokenize_pair_dataset(dd, tokenizer, s.max_seq_len, out_dir, stats_path)
    cache = TokenCache(cache_dir, tokenizer_dir, s.to_dict())  # keyed by the settings as data
    out, fresh = {}, []
    stats = {"max_seq_len": s.max_seq_len, "packing": s.packing, "splits": {}}
    for split, ds in dd.items():
        table, new = tokenize_split(ds, tokenizer, s, cache)
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
            "truncated": int(np.sum(n_tokens > s.max_seq_len)),
            "tokens_before_truncation": int(n_tokens.sum()),
            "tokens": int(np.minimum(n_tokens, s.max_seq_len).sum()),
            "trainable_tokens": int(trainable.sum()),
            "length": {
                q: int(np.percentile(n_tokens, p)) if len(n_tokens) else 0
                for q, p in (("min", 0), ("p50", 50), ("p95", 95), ("max", 100))
            },
            "length_histogram": np.histogram(n_tokens, bins=20)[0].tolist() if len(n_tokens) else [],
            "length_bin_edges": np.histogram_bin_edges(n_tokens, bins=20).round(1).tolist() if len(n_tokens) else [],
        }
        # A fingerprint from the input split's and the tokenization's (else `datasets` pickles the table).
        made_from = f"{getattr(ds, '_fingerprint', '')}:{cache.key}:{split}"
        tok = datasets.Dataset(
            table.select(["kiln_id", "input_ids", "assistant_masks"]),
            fingerprint=hashlib.sha256(made_from.encode()).hexdigest()[:32],
        )
        # Only what training reads is packed: the test split stays one row a document, in the
        # dataset's order (evaluation lines each tokenized row up with its test row).
        if s.packing and len(tok) and split != "test":
            from trl.data_utils import pack_dataset

            tok = pack_dataset(tok.remove_columns(["kiln_id"]), s.max_seq_len, strategy="bfd")
            split_stats["packed_sequences"] = len(tok)
        out[split] = tok
        stats["splits"][split] = split_stats
        if split_stats["truncated"]:
            log.warning(
                "%s: %d rows longer than max_seq_len=%d were truncated",
                split,
                split_stats["truncated"],
                s.max_seq_len,
            )
    save_splits(out, out_dir)
    cache.add_and_save(fresh)
    Path(stats_path).write_text(json.dumps(stats, indent=2))
    return stats
