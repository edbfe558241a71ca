"""Human-readable views of Kiln's records: data-stage statistics, sample generations and the
manifest (HTML pages the Snakemake report shows). The records are read as kiln.reports types."""

from __future__ import annotations

import html
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from kiln.compare import page
from kiln.manifest_record import Manifest
from kiln.metrics import label
from kiln.reports import (
    Contamination,
    DatasetStats,
    Edit,
    HarnessScores,
    Metrics,
    Score,
    ShardStats,
    Split,
    TokenizeStats,
)


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
@dataclass(frozen=True)
class DataView:
    """What the data page shows, gathered from the stage records (kiln.reports types)."""

    stages: list[tuple[str, int]]  # (stage, rows)
    splits: dict[str, Split]
    rejected: list[tuple[str, str, int]]  # (stage, reason, rows)
    edited: dict[str, int]  # cleaning step -> rows it changed
    examples: dict[str, list[Edit]]  # two before/after examples per step, from the first shards that have them
    tokenized: dict[str, TokenizeStats]  # by tokenization (model and settings hash)
    skipped_files: list[dict]  # set aside by `on_bad_file: skip`, each with its reason
    mixture: dict[str, dict]  # each source's share of train before and after its weight and cap
    contamination: Contamination
    orphaned_shards: list[str]


def data_stats(shard_stats: list[str | Path], dataset_stats: str | Path, tokenize_stats: list[str | Path]) -> DataView:
    """Rows per stage, rejected rows by stage and reason, and token lengths, from the stage records."""
    shards = [ShardStats.read(p) for p in shard_stats]
    built = DatasetStats.read(dataset_stats)
    rejected: Counter = Counter()
    for stage, reasons in [*(("clean", s.rejected_by_reason) for s in shards), ("build", built.rejected_by_reason)]:
        for reason, n in reasons.items():
            rejected[(stage, reason)] += n
    tokenized = {Path(p).stem: TokenizeStats.read(p) for p in tokenize_stats}
    stages = [
        ("collect (raw rows)", sum(s.rows_in for s in shards)),
        ("clean (kept)", sum(s.rows_clean for s in shards)),
        ("build (deduplicated, split)", sum(v.rows for v in built.splits.values())),
        *(
            (f"tokenize {key} (rows with loss)", sum(v.rows_kept for v in t.splits.values()))
            for key, t in tokenized.items()
        ),
    ]
    edited: Counter = Counter()
    for s in shards:
        edited.update(s.rows_edited_by)
    steps = sorted({op for s in shards for op in s.examples_by_step})
    return DataView(
        stages=stages,
        splits=built.splits,
        rejected=[(stage, reason, n) for (stage, reason), n in sorted(rejected.items())],
        edited={op: edited[op] for op in sorted(edited)},
        examples={op: [e for s in shards for e in s.examples_by_step.get(op, [])][:2] for op in steps},
        tokenized=tokenized,
        skipped_files=[s.skipped_file for s in shards if s.skipped_file],
        mixture=built.mixture,
        contamination=built.contamination,
        orphaned_shards=built.orphaned_shards,
    )


def contamination_table(audit: Contamination) -> str:
    """Held-out rows that nearly duplicate a train row, per split, with a few examples."""
    if audit.skipped:
        return f"<h3>Contamination audit: skipped</h3><p>{html.escape(audit.skipped)}</p>"
    if not audit.held_out():
        return ""
    action = "moved out (build.decontaminate)" if audit.decontaminated else "kept (build.decontaminate: false)"
    rows = [
        {
            "split": k,
            "rows": a.rows,
            "near-duplicates of train": a.near_duplicates_of_train,
            "examples": "; ".join(f"{e.held_out} ~ {e.train}" for e in a.examples),
        }
        for k, a in audit.held_out().items()
    ]
    title = f"Contamination audit (Jaccard above {audit.threshold:g}; {action})"
    return f"<h3>{html.escape(title)}</h3>" + _table(rows, table_id="contamination")


def _cleaning_rows(stats: DataView) -> list[dict]:
    rows_total = stats.stages[0][1] or 1
    return [
        {
            "step": k,
            "rows": v,
            "share of raw rows": f"{v / rows_total:.1%}",
            **{
                f"example {i + 1}": f"{json.dumps(e.before, ensure_ascii=False)} -> "
                f"{json.dumps(e.after, ensure_ascii=False)}"
                for i, e in enumerate(stats.examples.get(k, []))
            },
        }
        for k, v in stats.edited.items()
    ]


def _token_rows(tok: TokenizeStats) -> list[dict]:
    return [
        {
            "split": split,
            "rows": s.rows_kept,
            "tokens": s.tokens,
            "trainable tokens": s.trainable_tokens,
            "truncated": s.truncated,
            **{f"length {k}": v for k, v in s.length.items()},
        }
        for split, s in tok.splits.items()
    ]


def data_stats_page(stats: DataView, dataset: str) -> str:
    body = "<h3>Rows per stage</h3>" + _table(
        [{"stage": stage, "rows": n} for stage, n in stats.stages], table_id="rows-per-stage"
    )
    body += "<h3>Splits</h3>" + _table([{"split": k, **v.to_dict()} for k, v in stats.splits.items()])
    if stats.skipped_files:
        body += "<h3>Files set aside (on_bad_file: skip)</h3>" + _table(stats.skipped_files, table_id="skipped")
    if stats.mixture:
        mixture = [{"source": k, **v} for k, v in stats.mixture.items()]
        body += "<h3>Sources in train (mixture: weight, max_rows)</h3>" + _table(mixture, table_id="mixture")
    body += contamination_table(stats.contamination)
    if stats.orphaned_shards:
        body += "<h3>Orphaned shards (no current source file makes them; not read)</h3>" + _table(
            [{"shard": s} for s in stats.orphaned_shards], table_id="orphaned"
        )
    rejected = [{"stage": stage, "reason": reason, "rows": n} for stage, reason, n in stats.rejected]
    body += "<h3>Rejected rows by reason</h3>" + _table(rejected, table_id="rejected")
    body += "<h3>Rows changed by each cleaning step (examples: text as JSON strings, whitespace shown)</h3>"
    body += _table(
        _cleaning_rows(stats),
        ["step", "rows", "share of raw rows", "example 1", "example 2"],
        table_id="cleaning-steps",
    )
    for key, tok in stats.tokenized.items():
        title = f"Tokens ({key}, max_seq_len {tok.max_seq_len})"
        body += f"<h3>{html.escape(title)}</h3>" + _table(_token_rows(tok))
    return page(f"Data: {dataset}", body)


def plot_token_lengths(tokenize_stats: list[str | Path], out: str | Path) -> None:
    """Histogram of tokens per row (train split) for each tokenization of the dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    for path in tokenize_stats:
        tok = TokenizeStats.read(path)
        train = tok.splits.get("train")
        counts, edges = (train.length_histogram, train.length_bin_edges) if train else ([], [])
        if counts and len(edges) == len(counts) + 1:
            ax.stairs(counts, edges, fill=True, alpha=0.5, label=f"{Path(path).stem}")
        ax.axvline(tok.max_seq_len, color="k", linestyle=":", linewidth=1)
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


def label_tables(block: Score) -> str:
    """A label task's per-label counts and confusion matrix (rows: reference, columns: predicted)."""
    if not block.confusion:
        return ""
    per_label = [{"label": k, **v} for k, v in (block.per_label or {}).items()]
    predicted = sorted({p for row in block.confusion.values() for p in row})
    confusion = [{"reference": r, **{p: row.get(p, 0) for p in predicted}} for r, row in block.confusion.items()]
    return (
        "<h3>Labels (tuned): counts and F1</h3>"
        + _table(per_label, table_id="labels")
        + "<h3>Confusion matrix (tuned; rows: reference, columns: predicted)</h3>"
        + _table(confusion, ["reference", *predicted], table_id="confusion")
    )


def length_table(metrics: Metrics) -> str:
    """A free-text task's answer lengths in words, per model: rambling or clipped answers show here."""
    rows = [{"model": k, **s.length} for k, s in metrics.scores().items() if s.length]
    if not rows:
        return ""
    return "<h3>Answer lengths (words)</h3>" + _table(rows, table_id="lengths")


def regression_rows(metrics: Metrics) -> list[dict]:
    """Each regression set's loss and perplexity per model, and tuned minus base loss."""
    return [
        {
            "regression set": name,
            "rows": block.rows,
            **{
                f"{model} {what}": round(getattr(score, what), 4)
                for model, score in block.scores().items()
                for what in ("loss", "perplexity")
            },
            "tuned - base loss": round(_or_nan(block.tuned_minus_base_loss), 4),
        }
        for name, block in metrics.regression.items()
    ]


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def _summary_rows(m: Manifest) -> list[dict]:
    main, splits = m.metrics.main, m.data.splits
    return [
        {"what": "experiment", "value": m.experiment},
        {"what": "base model", "value": f"{m.base_model.id} (revision {m.base_model.revision})"},
        {"what": "base weights sha256", "value": m.base_model.weights},
        {"what": "data fingerprints", "value": {k: v.fingerprint for k, v in splits.items()}},
        {"what": "rows per split", "value": {k: v.rows for k, v in splits.items()}},
        {"what": "code", "value": m.code.to_dict()},
        {"what": "unpinned inputs", "value": m.unpinned_inputs() or "none"},
        {"what": "training", "value": m.training.to_dict()},
        {
            "what": f"{label(main)} base -> tuned",
            "value": f"{m.metrics.value('base', main):.3f} -> {m.metrics.value('tuned', main):.3f}",
        },
    ]


def _gguf_rows(m: Manifest) -> list[dict]:
    return [
        {
            "file": r.gguf,
            "size MB": r.size_mb,
            "token ids equal": f"{r.token_ids.identical} of {r.token_ids.prompts}",
            "max next-token prob diff": round(r.logprobs.max_abs_prob_diff, 4),
            "tolerance": r.logprobs.tolerance,
            "tokenizer": f"{r.metadata.tokenizer_model} / {r.metadata.tokenizer_pre}",
            "sha256": r.sha256,
        }
        for r in m.gguf.values()
    ]


def _harness_rows(harness: HarnessScores) -> list[dict]:
    return [
        {"task": task, "metric": metric, "base": value, "tuned": harness.tuned.get(task, {}).get(metric)}
        for task, scores in harness.base.items()
        for metric, value in scores.items()
    ]


def manifest_page(manifest: Manifest) -> str:
    m, met = manifest, manifest.metrics
    body = _table(_summary_rows(m), table_id="manifest-summary")
    names = [*met.task_metric_names, "loss"]
    scores = [{"model": k, **{name: s.value(name) for name in names}} for k, s in met.scores().items()]
    body += "<h3>Scores on the test rows (every model, the GGUF exports in llama.cpp included)</h3>"
    body += _table(scores, table_id="scores") + (label_tables(met.tuned) if met.tuned else "") + length_table(met)
    if m.gguf:
        body += "<h3>GGUF exports, verified in llama.cpp</h3>" + _table(_gguf_rows(m), table_id="gguf")
    if met.lm_eval:
        body += "<h3>lm-evaluation-harness (base vs tuned)</h3>" + _table(
            _harness_rows(met.lm_eval), table_id="lm-eval"
        )
    if regression_rows(met):
        body += "<h3>Regression sets (loss on answer tokens: forgetting)</h3>"
        body += _table(regression_rows(met), table_id="regression")
    if met.preference is not None:
        body += f"<h3>Held-out preference pairs ({met.preference.pairs}): base, SFT, {met.preference.method}</h3>"
        body += _table(met.preference.rows(), table_id="preference")
        if met.preference.unpaired is not None:
            body += "<h3>Held-out unpaired answers: the tuned model's reward against the SFT model's</h3>"
            body += _table([met.preference.unpaired.to_dict()], table_id="unpaired")
        if met.sft:
            body += _table([{"model": "SFT", **met.sft}], table_id="sft-task")
    stages = [{"stage": k, **(v.to_dict() if v else {})} for k, v in m.stages.items()]
    body += "<h3>Stages (Snakemake benchmark records)</h3>"
    body += _table(stages, ["stage", "jobs", "wall_s", "max_rss_mb", "cpu_time_s"])
    body += "<h3>Packages</h3>" + _table([{"package": k, "version": v} for k, v in m.packages.items()])
    body += "<h3>Hardware</h3>" + _table([{"what": k, "value": v} for k, v in m.hardware.items()])
    body += "<h3>Full manifest</h3><pre>" + html.escape(json.dumps(m.to_dict(), indent=2)) + "</pre>"
    return page(f"Manifest: {m.experiment}", body)
