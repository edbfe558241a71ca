"""Data-stage throughput on messy synthetic rows, each stage beside a naive baseline in the same run.

    python benchmarks/data_stages.py --rows 1000000 --out benchmarks/results/data_stages.json

Reports rows/s for clean (vs row-by-row Python doing the same operations), build (vs a row-by-row
dedup/split into `Dataset.from_list`) and tokenize (vs un-batched `datasets.map`, and vs the
tokenizer's own batch encode of the same rendered texts), plus the cost of an incremental update
(1% new rows in a new shard) as a share of a full rebuild. Targets (issue 2): clean >= 10x naive;
tokenize within 1.5x of batch encode; incremental <= 10% of full.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import platform
import re
import shutil
import tempfile
import time
import unicodedata
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from kiln.answers import check_answer
from kiln.clean import clean_shard, clean_table
from kiln.dataset import build_dataset, split_by_hash
from kiln.sources import canonical_rows, write_raw
from kiln.spec import BuildSettings, CleanSettings, TokenizeSettings
from kiln.synthetic import ANSWER_SCHEMA, generate
from kiln.textfix import CONTROL, QUOTED_RUN, normalize_layout_text
from kiln.tokenize import render, tokenize_batch, tokenize_dataset

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tests" / "fixtures" / "smollm2-tokenizer"
SCHEMA = ANSWER_SCHEMA
# The defaults from kiln.spec, with what this benchmark sets.
CLEAN = CleanSettings(min_chars=10, max_chars=4000, answer_schema=SCHEMA)
BUILD = BuildSettings()
TOKENIZE = {**TokenizeSettings.defaults(), "max_seq_len": 256}


def timed(fn, *args, **kwargs):
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


# ---- naive baselines: the same work, one row at a time in plain Python ----------------------------
_CONTROL, _WS, _EDGE, _NL = (
    re.compile(CONTROL),
    re.compile(r"[ \t\xa0]+"),
    re.compile(r"(?m) +$|^ +"),
    re.compile(r"\n{3,}"),
)


# Which turns keep their layout (kiln.textfix's Arrow patterns, in Python's `re` dialect).
_CODE = re.compile(r"^[ \t]*(?:```|~~~)|<[Pp][Rr][Ee][\s>]|^[ \t]*\|.*\|[ \t]*$|\n(?: {2,}|\t)[ \t]*\S", re.M)
_LAYOUT = re.compile(
    r"\A\s*(?:\{[\s\S]*\}|\[[\s\S]*\])\s*\Z" + r"|" + QUOTED_RUN + r"|(?m:^[ \t]*(?:- |[\w\"'.-]+:(?: |$)))"
)


def naive_whitespace(text: str, code: bool) -> str:
    if code or _LAYOUT.search(text):
        text = normalize_layout_text(text)
        return text if code else text.strip()
    return _NL.sub("\n\n", _EDGE.sub("", _WS.sub(" ", text))).strip()


def naive_clean(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    clean, rejected, seen = [], [], set()
    for row in rows:
        if row["error"]:
            rejected.append({**row, "reason": "unreadable"})
            continue
        turns = []
        for turn in row["messages"]:
            text = unicodedata.normalize("NFC", turn["content"])
            code = bool(_CODE.search(text))  # decided before unescaping, as kiln.textfix does
            if "&" in text and not code:
                text = html.unescape(text)
            text = naive_whitespace(_CONTROL.sub("", text.replace("\r\n", "\n")), code)
            turns.append({"role": turn["role"], "content": text})
        n_chars = sum(len(t["content"]) for t in turns)
        reason = None
        if turns[-1]["role"] != "assistant" or not turns[-1]["content"]:
            reason = "empty_answer"
        elif not 10 <= n_chars <= 4000:
            reason = "length"
        elif problem := check_answer(turns[-1]["content"], SCHEMA):
            reason = problem.split("|")[0]
        else:
            digest = hashlib.sha256(json.dumps(turns).encode()).hexdigest()
            if digest in seen:
                reason = "duplicate"
            seen.add(digest)
        (rejected if reason else clean).append({**row, "messages": turns, "reason": reason})
    return clean, rejected


RAW_COLUMNS = ["kiln_id", "source", "file", "row", "format", "kind", "messages", "error"]


def naive_clean_files(raw_paths: list[Path], out_paths: list[Path]) -> tuple[tuple[int, float], float]:
    """The naive stage file to file, as a workflow runs it: read rows, loop, write clean + rejected."""
    kept, loop = 0, 0.0
    for raw, out in zip(raw_paths, out_paths, strict=True):
        rows = pq.read_table(raw, columns=RAW_COLUMNS).to_pylist()
        (clean, rejected), t = timed(naive_clean, rows)
        loop += t
        out.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(clean), out)
        pq.write_table(pa.Table.from_pylist(rejected), out.with_suffix(".rej.parquet"))
        kept += len(clean)
    return kept, loop


def naive_build(rows: list[dict], out_dir: Path) -> None:
    import datasets

    seen, splits = set(), {"train": [], "validation": [], "test": []}
    for row in rows:
        key = json.dumps(row["messages"])
        if key in seen:
            continue
        seen.add(key)
        split = split_by_hash([row["kiln_id"]], 0, 0.05, 0.05)[0]
        splits[split].append({k: row[k] for k in ("kiln_id", "source", "file", "row", "kind", "messages")})
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(out_dir))


# ---- the run ----------------------------------------------------------------------------------------
def make_shard(path: Path, rows: int, seed: int) -> None:
    records = generate(rows, seed=seed, mess_rate=0.12)
    items = ((i, r, json.dumps(r), None) for i, r in enumerate(records, 1))
    write_raw(canonical_rows(items, source="synthetic", file=f"seed{seed}", fmt="auto", columns={}), path)


def main(rows: int, shards: int, out: Path | None, naive_tokenize_rows: int, only_clean: bool = False) -> dict:
    import datasets
    from transformers import AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="kiln-bench-"))
    per = rows // shards
    result: dict = {"rows": rows, "shards": shards, "machine": machine()}
    raw = [tmp / f"raw/{i}.parquet" for i in range(shards)]
    _, t = timed(lambda: [make_shard(p, per, seed=i) for i, p in enumerate(raw)])
    result["collect_s"] = round(t, 1)

    clean_paths = [tmp / f"clean/{i}.parquet" for i in range(shards)]

    def clean_all(paths, outs):
        for p, o in zip(paths, outs, strict=True):
            clean_shard(p, o, o.with_suffix(".rej.parquet"), o.with_suffix(".json"), CLEAN)

    _, t_clean = timed(clean_all, raw, clean_paths)
    tables = [pq.read_table(p, columns=RAW_COLUMNS) for p in raw]
    _, t_clean_mem = timed(lambda ts: [clean_table(t, CLEAN) for t in ts], tables)
    del tables
    naive_paths = [tmp / f"naive_clean/{i}.parquet" for i in range(shards)]
    (naive_kept, t_naive_loop), t_naive = timed(naive_clean_files, raw, naive_paths)
    kept = sum(pq.read_metadata(p).num_rows for p in clean_paths)
    assert kept == naive_kept, (kept, naive_kept)  # the baseline does the same work
    result["clean"] = {
        "rows_per_s": round(rows / t_clean),
        "naive_rows_per_s": round(rows / t_naive),
        "speedup": round(t_naive / t_clean, 1),
        "seconds": round(t_clean, 1),
        "in_memory": {
            "rows_per_s": round(rows / t_clean_mem),
            "naive_rows_per_s": round(rows / t_naive_loop),
            "speedup": round(t_naive_loop / t_clean_mem, 1),
        },
    }
    if only_clean:  # after a change to cleaning alone: the clean figures, dated, into the kept file
        result["clean"]["date"] = result["machine"]["date"]
        shutil.rmtree(tmp)
        kept_result = json.loads(out.read_text()) if out and out.exists() else {}
        if kept_result.get("rows") not in (None, rows):
            raise SystemExit(f"{out} was made with {kept_result['rows']} rows, not {rows}")
        result = {**kept_result, "clean": result["clean"]}
        if out:
            out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result["clean"], indent=2))
        return result

    ds_dir = tmp / "dataset"
    _, t_build = timed(
        build_dataset, [str(p) for p in clean_paths], ds_dir, tmp / "brej.parquet", tmp / "bstats.json", BUILD
    )
    clean_rows = [r for p in clean_paths for r in pq.read_table(p).to_pylist()]
    _, t_nbuild = timed(naive_build, clean_rows, tmp / "naive_ds")
    shutil.rmtree(tmp / "naive_ds")
    result["build"] = {
        "rows_per_s": round(kept / t_build),
        "naive_rows_per_s": round(kept / t_nbuild),
        "speedup": round(t_nbuild / t_build, 1),
        "seconds": round(t_build, 1),
    }
    del clean_rows

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    n_ds = sum(len(s) for s in datasets.load_from_disk(str(ds_dir)).values())
    cache = tmp / "token-cache"
    _, t_tok = timed(tokenize_dataset, ds_dir, TOKENIZER, tmp / "tok", tmp / "tok.json", TOKENIZE, cache)
    train = datasets.load_from_disk(str(ds_dir))["train"]
    texts = []
    for i in range(0, len(train), 1000):
        b = train[i : i + 1000]
        texts += render(tok, b["messages"], b["kind"])
    _, t_enc = timed(lambda: [tok(texts[i : i + 1000], add_special_tokens=False) for i in range(0, len(texts), 1000)])
    sub = train.select(range(min(naive_tokenize_rows, len(train))))

    def one(row):
        out = tokenize_batch({"messages": [row["messages"]], "kind": [row["kind"]]}, tok, 256, True)
        return {k: v[0] for k, v in out.items()}

    _, t_unb = timed(sub.map, one, remove_columns=sub.column_names)
    # Compare on the train split (the encode baseline covers it); kiln's time covers all splits.
    kiln_train_rate = n_ds / t_tok
    result["tokenize"] = {
        "rows_per_s": round(kiln_train_rate),
        "seconds": round(t_tok, 1),
        "batch_encode_rows_per_s": round(len(texts) / t_enc),
        "ratio_to_batch_encode": round((len(texts) / t_enc) / kiln_train_rate, 2),
        "unbatched_map_rows_per_s": round(len(sub) / t_unb),
        "speedup_vs_unbatched": round(kiln_train_rate / (len(sub) / t_unb), 1),
    }

    # Incremental: one new shard of 1% of the rows, vs rebuilding everything from raw.
    new_raw = tmp / "raw/new.parquet"
    _, t_collect_new = timed(make_shard, new_raw, rows // 100, seed=10_000)
    new_clean = tmp / "clean/new.parquet"
    _, t_clean_new = timed(clean_all, [new_raw], [new_clean])
    all_clean = [str(p) for p in clean_paths + [new_clean]]
    shutil.rmtree(ds_dir)
    _, t_build2 = timed(build_dataset, all_clean, ds_dir, tmp / "brej.parquet", tmp / "bstats.json", BUILD)
    _, t_tok2 = timed(tokenize_dataset, ds_dir, TOKENIZER, tmp / "tok2", tmp / "tok2.json", TOKENIZE, cache)
    _, t_tok_full = timed(tokenize_dataset, ds_dir, TOKENIZER, tmp / "tok3", tmp / "tok3.json", TOKENIZE)
    incremental = t_collect_new + t_clean_new + t_build2 + t_tok2
    full = result["collect_s"] + t_collect_new + t_clean + t_clean_new + t_build2 + t_tok_full
    result["incremental"] = {
        "seconds": round(incremental, 1),
        "full_rebuild_seconds": round(full, 1),
        "share_of_full": round(incremental / full, 3),
        "parts_s": {
            "collect_new": round(t_collect_new, 1),
            "clean_new": round(t_clean_new, 1),
            "build": round(t_build2, 1),
            "tokenize_with_cache": round(t_tok2, 1),
            "tokenize_from_scratch": round(t_tok_full, 1),
        },
    }
    shutil.rmtree(tmp)
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    return result


def machine() -> dict:
    import os

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--shards", type=int, default=10)
    ap.add_argument("--naive-tokenize-rows", type=int, default=20_000)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--only-clean", action="store_true", help="measure clean alone; merge into --out")
    args = ap.parse_args()
    main(args.rows, args.shards, args.out, args.naive_tokenize_rows, args.only_clean)
