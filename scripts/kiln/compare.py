"""Compare experiments: one row each (key settings, metrics, delta against the base model), as CSV,
a markdown table and an HTML table, plus loss curves overlaid and a bar chart of the main metric."""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from kiln.manifest_record import Manifest
from kiln.metrics import label, scale
from kiln.reports import Metrics

SETTINGS = [  # after the metrics: the settings that tell runs apart
    "main_metric",
    "dataset",
    "model",
    "backend",
    "learning_rate",
    "lora_r",
    "max_steps",
    "max_seq_len",
    "packing",
    "train_rows",
    "tokens_trained",
    "final_train_loss",
    "train_wall_s",
    "code_commit",
]


def _difference(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def metric_columns(metrics: Metrics) -> dict:
    """Metric cells of one experiment: its main metric for every model and the delta, the tuned
    model's other task metrics, then the losses. Names come from the metrics file (any task)."""
    main, value = metrics.main, metrics.value
    row = {
        f"base_{main}": value("base", main),
        f"tuned_{main}": value("tuned", main),
        f"delta_{main}": _difference(value("tuned", main), value("base", main)),
        f"adapter_4bit_{main}": value("adapter_4bit", main),
        f"base_4bit_{main}": value("base_4bit", main),
        **{f"{k}_{main}": s.value(main) for k, s in metrics.ggufs().items()},
        **{f"tuned_{name}": value("tuned", name) for name in metrics.task_metric_names if name != main},
        "base_loss": value("base", "loss"),
        "tuned_loss": value("tuned", "loss"),
        "delta_loss": _difference(value("tuned", "loss"), value("base", "loss")),
    }
    for name, block in metrics.regression.items():  # forgetting, next to the gain
        row[f"regression_{name}_delta_loss"] = block.tuned_minus_base_loss
    if metrics.preference is not None:  # a preference run: the pairs, and the task beside the SFT model
        pref = metrics.preference
        row |= {f"{k}_preference_accuracy": getattr(pref, k).preference_accuracy for k in ("base", "sft", "tuned")}
        row["tuned_reward_margin"] = pref.tuned.mean_reward_margin
        sft = (metrics.sft or {}).get(main)
        row[f"sft_{main}"], row[f"delta_{main}_vs_sft"] = sft, _difference(value("tuned", main), sft)
    return row


def experiment_row(manifest: Manifest) -> dict:
    """The comparison row of one experiment, from its manifest."""
    exp, run, train_stage = manifest.config.experiment, manifest.training, manifest.stages.get("train")
    return {
        "experiment": manifest.experiment,
        **metric_columns(manifest.metrics),
        "main_metric": manifest.metrics.main,
        "dataset": exp.dataset,
        "model": exp.model,
        "backend": run.backend,
        "learning_rate": exp.training.learning_rate,
        "lora_r": exp.training.lora_r,
        "max_steps": exp.training.max_steps,
        "max_seq_len": exp.tokenize.max_seq_len,
        "packing": exp.tokenize.packing,
        "train_rows": manifest.data.splits.get("train").rows,
        "tokens_trained": run.tokens_trained,
        "final_train_loss": run.final_loss,
        "train_wall_s": train_stage.wall_s if train_stage else None,
        "code_commit": manifest.code.short(),
    }


def comparison_table(manifests: list[Manifest]) -> pd.DataFrame:
    """One row per experiment; metric columns are the union over experiments (tasks may differ)."""
    rows = [experiment_row(m) for m in manifests]
    columns: dict[str, None] = {"experiment": None}
    for row in rows:
        columns.update((k, None) for k in row if k not in SETTINGS)
    return pd.DataFrame(rows, columns=[*columns, *SETTINGS])


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def to_markdown(df: pd.DataFrame) -> str:
    header = "| " + " | ".join(df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    rows = ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([header, rule, *rows]) + "\n"


def to_html(df: pd.DataFrame, title: str) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in df.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
        for row in df.itertuples(index=False)
    )
    return page(title, f'<table id="experiments"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>')


def page(title: str, body: str) -> str:
    """A small self-contained HTML page (the report shows each in a frame)."""
    style = (
        "body{font-family:sans-serif;font-size:13px;margin:12px}"
        "table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ccc;padding:3px 6px;"
        "vertical-align:top;text-align:left}th{background:#f0f0f0}pre{white-space:pre-wrap;margin:0}"
    )
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h2>{html.escape(title)}</h2>{body}</body></html>\n"
    )


def plot_loss_curves(logs: dict[str, str | Path], out: str | Path) -> None:
    """Training (solid) and validation (dashed) loss of every experiment on one chart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for i, (name, path) in enumerate(sorted(logs.items())):
        records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        color = f"C{i % 10}"
        train = [(r["step"], r["loss"]) for r in records if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
        if train:
            ax.plot(*zip(*train), color=color, label=f"{name} train")
        if evals:
            ax.plot(*zip(*evals), color=color, linestyle="--", marker="o", markersize=3, label=f"{name} validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (assistant tokens)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Loss curves of all experiments")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_metric(manifests: list[Manifest], out: str | Path) -> None:
    """Bars of each experiment's main metric: base model, tuned (merged), adapter on the 4-bit base."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    names = [m.experiment for m in manifests]
    mains = [m.metrics.main for m in manifests]
    x = np.arange(len(names))
    kinds = [("base", "base model"), ("base_4bit", "4-bit base"), ("tuned", "tuned (merged)")]
    kinds += [("adapter_4bit", "adapter on 4-bit base")]
    kinds = [k for k in kinds if any(k[0] in m.metrics.scores() for m in manifests)]  # no empty bars
    fig, ax = plt.subplots(figsize=(max(5, 1.4 * len(names) + 2), 4), dpi=110)
    width = 0.8 / len(kinds)
    for j, (kind, text) in enumerate(kinds):
        values = [float(m.metrics.value(kind, main) or 0.0) for m, main in zip(manifests, mains)]
        bars = ax.bar(x + (j - (len(kinds) - 1) / 2) * width, values, width, label=text)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ticks = [f"{n}\n({label(mm)})" if len(set(mains)) > 1 else n for n, mm in zip(names, mains)]
    ax.set_xticks(x, ticks, rotation=20, ha="right", fontsize=8)
    top = max((scale(mm) or 0.0) for mm in mains) or None
    if top:
        ax.set_ylim(0, top * 1.08)
    ylabel = label(mains[0]) if len(set(mains)) == 1 else "main metric of each experiment"
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} on the test split")
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def write_comparison(
    manifest_paths: list[str | Path],
    train_logs: dict[str, str | Path],
    csv_path: str | Path,
    md_path: str | Path,
    html_path: str | Path,
    loss_png: str | Path,
    metric_png: str | Path,
) -> pd.DataFrame:
    manifests = [Manifest.read(p) for p in manifest_paths]
    df = comparison_table(manifests)
    df.to_csv(csv_path, index=False)
    Path(md_path).write_text(to_markdown(df))
    Path(html_path).write_text(to_html(df, "Experiments: settings, metrics and delta against the base model"))
    plot_loss_curves(train_logs, loss_png)
    plot_metric(manifests, metric_png)
    return df
