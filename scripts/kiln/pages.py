"""Human-readable views of Kiln's records: data-stage statistics, sample generations, the manifest
(HTML pages the Snakemake report shows), and the model card written next to a published model."""

from __future__ import annotations

import html
import json
from pathlib import Path

from kiln.compare import page
from kiln.metrics import MODELS, label, main_metric, model_keys, task_metrics


def _table(rows: list[dict], columns: list[str] | None = None, table_id: str = "") -> str:
    if not rows:
        return "<p>(none)</p>"
    columns = columns or list(rows[0])
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in columns)
    body = "".join(
        "<tr>" + "".join(f"<td><pre>{html.escape(_cell(r.get(c)))}</pre></td>" for c in columns) + "</tr>" for r in rows
    )
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


# ---- data stages ------------------------------------------------------------------------------
def data_stats(shard_stats: list[str | Path], dataset_stats: str | Path, tokenize_stats: list[str | Path]) -> dict:
    """Rows per stage, rejected rows by stage and reason, and token lengths, from the stage records."""
    shards = [json.loads(Path(p).read_text()) for p in shard_stats]
    built = json.loads(Path(dataset_stats).read_text())
    rejected: dict[tuple[str, str], int] = {}
    for s in shards:
        for reason, n in s["rejected_by_reason"].items():
            rejected[("clean", reason)] = rejected.get(("clean", reason), 0) + n
    for reason, n in built.get("rejected_by_reason", {}).items():
        rejected[("build", reason)] = rejected.get(("build", reason), 0) + n
    tokenized = {Path(p).stem: json.loads(Path(p).read_text()) for p in tokenize_stats}
    stages = [
        {"stage": "collect (raw rows)", "rows": sum(s["rows_in"] for s in shards)},
        {"stage": "clean (kept)", "rows": sum(s["rows_clean"] for s in shards)},
        {"stage": "build (deduplicated, split)", "rows": sum(v["rows"] for v in built["splits"].values())},
    ]
    for key, tok in tokenized.items():
        stages.append(
            {"stage": f"tokenize {key} (rows with loss)", "rows": sum(v["rows_kept"] for v in tok["splits"].values())}
        )
    return {
        "stages": stages,
        "splits": [{"split": k, **v} for k, v in built["splits"].items()],
        "rejected": [{"stage": st, "reason": r, "rows": n} for (st, r), n in sorted(rejected.items())],
        "edited": {
            op: sum(s.get("rows_edited_by", {}).get(op, 0) for s in shards)
            for op in sorted({op for s in shards for op in s.get("rows_edited_by", {})})
        },
        # Two before/after examples per cleaning step, from the first shards that have them.
        "examples": {
            op: [e for s in shards for e in s.get("examples_by_step", {}).get(op, [])][:2]
            for op in sorted({op for s in shards for op in s.get("examples_by_step", {})})
        },
        "tokenized": tokenized,
        # Files set aside by `on_bad_file: skip`, each with its reason (no row of theirs was read).
        "skipped_files": [s["skipped_file"] for s in shards if s.get("skipped_file")],
        # Each source's share of train before and after its weight (and its max_rows cap).
        "mixture": [{"source": k, **v} for k, v in built.get("mixture", {}).items()],
        "contamination": built.get("contamination", {}),
        "orphaned_shards": built.get("orphaned_shards", []),
    }


def contamination_table(audit: dict) -> str:
    """Held-out rows that nearly duplicate a train row, per split, with a few examples."""
    if audit.get("skipped"):
        return f"<h3>Contamination audit: skipped</h3><p>{html.escape(audit['skipped'])}</p>"
    splits = [k for k in ("validation", "test") if k in audit]
    if not splits:
        return ""
    action = "moved out (build.decontaminate)" if audit.get("decontaminated") else "kept (build.decontaminate: false)"
    rows = [
        {
            "split": k,
            "rows": audit[k]["rows"],
            "near-duplicates of train": audit[k]["near_duplicates_of_train"],
            "examples": "; ".join(f"{e['held_out']} ~ {e['train']}" for e in audit[k]["examples"]),
        }
        for k in splits
    ]
    title = f"Contamination audit (Jaccard above {audit['threshold']:g}; {action})"
    return f"<h3>{html.escape(title)}</h3>" + _table(rows, table_id="contamination")


def data_stats_page(stats: dict, dataset: str) -> str:
    body = "<h3>Rows per stage</h3>" + _table(stats["stages"], table_id="rows-per-stage")
    body += "<h3>Splits</h3>" + _table(stats["splits"])
    if stats.get("skipped_files"):
        body += "<h3>Files set aside (on_bad_file: skip)</h3>" + _table(stats["skipped_files"], table_id="skipped")
    if stats.get("mixture"):
        body += "<h3>Sources in train (mixture: weight, max_rows)</h3>" + _table(stats["mixture"], table_id="mixture")
    body += contamination_table(stats.get("contamination") or {})
    if stats.get("orphaned_shards"):
        body += "<h3>Orphaned shards (no current source file makes them; not read)</h3>" + _table(
            [{"shard": s} for s in stats["orphaned_shards"]], table_id="orphaned"
        )
    body += "<h3>Rejected rows by reason</h3>" + _table(stats["rejected"], table_id="rejected")
    rows_total = sum(s["rows"] for s in stats["stages"][:1]) or 1
    body += "<h3>Rows changed by each cleaning step (examples: text as JSON strings, whitespace shown)</h3>"
    body += _table(
        [
            {
                "step": k,
                "rows": v,
                "share of raw rows": f"{v / rows_total:.1%}",
                **{
                    f"example {i + 1}": f"{json.dumps(e['before'], ensure_ascii=False)} -> "
                    f"{json.dumps(e['after'], ensure_ascii=False)}"
                    for i, e in enumerate(stats.get("examples", {}).get(k, []))
                },
            }
            for k, v in stats["edited"].items()
        ],
        ["step", "rows", "share of raw rows", "example 1", "example 2"],
        table_id="cleaning-steps",
    )
    for key, tok in stats["tokenized"].items():
        rows = [
            {
                "split": split,
                "rows": s["rows_kept"],
                "tokens": s["tokens"],
                "trainable tokens": s["trainable_tokens"],
                "truncated": s["truncated"],
                **{f"length {k}": v for k, v in s["length"].items()},
            }
            for split, s in tok["splits"].items()
        ]
        body += f"<h3>Tokens ({html.escape(key)}, max_seq_len {tok['max_seq_len']})</h3>" + _table(rows)
    return page(f"Data: {dataset}", body)


def plot_token_lengths(tokenize_stats: list[str | Path], out: str | Path) -> None:
    """Histogram of tokens per row (train split) for each tokenization of the dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    for path in tokenize_stats:
        tok = json.loads(Path(path).read_text())
        train = tok["splits"]["train"]
        counts, edges = train.get("length_histogram") or [], train.get("length_bin_edges") or []
        if counts and len(edges) == len(counts) + 1:
            ax.stairs(counts, edges, fill=True, alpha=0.5, label=f"{Path(path).stem}")
        ax.axvline(tok["max_seq_len"], color="k", linestyle=":", linewidth=1)
    ax.set_xlabel("tokens per row (before truncation; dotted: max_seq_len)")
    ax.set_ylabel("rows (train)")
    ax.legend(fontsize=7)
    ax.set_title("Token lengths")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


# ---- samples and manifest ---------------------------------------------------------------------
def samples_page(samples_path: str | Path, experiment: str, limit: int = 40, task: str = "") -> str:
    rows = []
    for line in Path(samples_path).read_text().splitlines()[:limit]:
        r = json.loads(line)
        rows.append(
            {k: r.get(k) for k in ("kiln_id", "prompt", "reference", "base", "tuned", "adapter_4bit") if k in r}
        )
    title = "sample generations (base vs tuned vs reference)"
    if task == "text":
        title = "continuations of held-out document prefixes (base vs tuned vs the document's own text)"
    return page(f"{experiment}: {title}", _table(rows, table_id="samples"))


def label_tables(block: dict) -> str:
    """A label task's per-label counts and confusion matrix (rows: reference, columns: predicted)."""
    if not block.get("confusion"):
        return ""
    per_label = [{"label": k, **v} for k, v in block["per_label"].items()]
    predicted = sorted({p for row in block["confusion"].values() for p in row})
    confusion = [{"reference": r, **{p: row.get(p, 0) for p in predicted}} for r, row in block["confusion"].items()]
    return (
        "<h3>Labels (tuned): counts and F1</h3>"
        + _table(per_label, table_id="labels")
        + "<h3>Confusion matrix (tuned; rows: reference, columns: predicted)</h3>"
        + _table(confusion, ["reference", *predicted], table_id="confusion")
    )


def length_table(metrics: dict) -> str:
    """A free-text task's answer lengths in words, per model: rambling or clipped answers show here."""
    rows = [{"model": k, **metrics[k]["length"]} for k in model_keys(metrics) if (metrics.get(k) or {}).get("length")]
    if not rows:
        return ""
    return "<h3>Answer lengths (words)</h3>" + _table(rows, table_id="lengths")


def regression_rows(metrics: dict) -> list[dict]:
    """Each regression set's loss and perplexity per model, and tuned minus base loss."""
    rows = []
    for name, block in (metrics.get("regression") or {}).items():
        row = {"regression set": name, "rows": block["rows"]}
        for model in MODELS:
            if model in block:
                row[f"{model} loss"] = round(block[model]["loss"], 4)
                row[f"{model} perplexity"] = round(block[model]["perplexity"], 4)
        row["tuned - base loss"] = round(block.get("tuned_minus_base_loss", float("nan")), 4)
        rows.append(row)
    return rows


def manifest_page(manifest: dict) -> str:
    m = manifest
    tuned, base = m["metrics"]["tuned"], m["metrics"]["base"]
    main = main_metric(m["metrics"])
    summary = [
        {"what": "experiment", "value": m["experiment"]},
        {"what": "base model", "value": f"{m['base_model']['id']} (revision {m['base_model'].get('revision')})"},
        {"what": "base weights sha256", "value": m["base_model"].get("weights")},
        {"what": "data fingerprints", "value": {k: v["fingerprint"] for k, v in m["data"]["splits"].items()}},
        {"what": "rows per split", "value": {k: v["rows"] for k, v in m["data"]["splits"].items()}},
        {"what": "code", "value": m["code"]},
        {"what": "unpinned inputs", "value": unpinned_inputs(m) or "none"},
        {"what": "training", "value": m["training"]},
        {"what": f"{label(main)} base -> tuned", "value": f"{base[main]:.3f} -> {tuned[main]:.3f}"},
    ]
    stages = [{"stage": k, **(v or {})} for k, v in m["stages"].items()]
    body = _table(summary, table_id="manifest-summary")
    scores = [
        {"model": k, **{name: (m["metrics"][k] or {}).get(name) for name in [*task_metrics(m["metrics"]), "loss"]}}
        for k in model_keys(m["metrics"])
    ]
    body += "<h3>Scores on the test rows (every model, the GGUF exports in llama.cpp included)</h3>"
    body += _table(scores, table_id="scores") + label_tables(tuned) + length_table(m["metrics"])
    if m.get("gguf"):
        rows = [
            {
                "file": r["gguf"],
                "size MB": r["size_mb"],
                "token ids equal": f"{r['token_ids']['identical']} of {r['token_ids']['prompts']}",
                "max next-token prob diff": round(r["logprobs"]["max_abs_prob_diff"], 4),
                "tolerance": r["logprobs"]["tolerance"],
                "tokenizer": f"{r['metadata']['tokenizer_model']} / {r['metadata']['tokenizer_pre']}",
                "sha256": r["sha256"],
            }
            for r in m["gguf"].values()
        ]
        body += "<h3>GGUF exports, verified in llama.cpp</h3>" + _table(rows, table_id="gguf")
    if m["metrics"].get("lm_eval"):
        harness = m["metrics"]["lm_eval"]
        rows = [
            {"task": task, "metric": metric, **{k: harness[k][task].get(metric) for k in ("base", "tuned")}}
            for task in harness["base"]
            for metric in harness["base"][task]
        ]
        body += "<h3>lm-evaluation-harness (base vs tuned)</h3>" + _table(rows, table_id="lm-eval")
    if regression_rows(m["metrics"]):
        body += "<h3>Regression sets (loss on answer tokens: forgetting)</h3>"
        body += _table(regression_rows(m["metrics"]), table_id="regression")
    body += "<h3>Stages (Snakemake benchmark records)</h3>"
    body += _table(stages, ["stage", "jobs", "wall_s", "max_rss_mb", "cpu_time_s"])
    body += "<h3>Packages</h3>" + _table([{"package": k, "version": v} for k, v in m["packages"].items()])
    body += "<h3>Hardware</h3>" + _table([{"what": k, "value": v} for k, v in m["hardware"].items()])
    body += "<h3>Full manifest</h3><pre>" + html.escape(json.dumps(m, indent=2)) + "</pre>"
    return page(f"Manifest: {m['experiment']}", body)


# ---- model card and the published model folder ---------------------------------------------------


def unpinned_inputs(manifest: dict) -> list[str]:
    """Hub inputs taken at a revision that is not a commit (allowed by allow_unpinned): they may
    hold other bytes if fetched again."""
    cfg = manifest.get("config") or {}
    out = []
    model = cfg.get("model") or {}
    if model.get("allow_unpinned"):
        out.append(f"base model {model.get('repo_id')} at revision {model.get('revision')!r} (allow_unpinned)")
    for src in (cfg.get("dataset") or {}).get("sources", []):
        if src.get("allow_unpinned"):
            where = f"data source {src['name']} ({src.get('path')})"
            out.append(f"{where} at revision {src.get('revision')!r} (allow_unpinned)")
    return out
