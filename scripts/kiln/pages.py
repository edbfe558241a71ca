"""Human-readable views of Kiln's records: data-stage statistics, sample generations, the manifest
(HTML pages the Snakemake report shows), and the model card written next to a published model."""

from __future__ import annotations

import html
import json
import os
import shutil
from pathlib import Path

from kiln.compare import page
from kiln.metrics import MODELS, gguf_models, label, main_metric, model_keys, task_metrics


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
def model_card(manifest: dict) -> str:
    """README.md for the published model, generated from the manifest."""
    m = manifest
    exp = m["config"]["experiment"]
    tr = exp["training"]
    met = m["metrics"]
    splits = m["data"]["splits"]
    name = m["experiment"]
    code = m["code"]
    commit = code.get("commit") or "not a git checkout"
    if code.get("dirty"):
        commit += f" (uncommitted changes, diff sha256 {code['diff_sha256'][:16]}…)"

    example = m.get("prompt_example")
    if example:  # a real test conversation, in the format the model was trained on
        listed = ",\n".join(f"    {json.dumps(msg, ensure_ascii=False)}" for msg in example["messages"])
        snippet_messages = [f"messages = [\n{listed},\n]"]
        prompt_format = [
            "## Prompt format",
            "",
            "The model was trained on conversations in the format of the one in the snippet below (a test "
            "row, its system prompt included: leave that out and the answers change). Its expected answer:",
            "",
            "```text",
            example["reference"],
            "```",
            "",
        ]
    else:
        snippet_messages = ['messages = [{"role": "user", "content": "..."}]']
        prompt_format = []

    ggufs = gguf_models(met)
    # the 4-bit base beside the base where it was scored: quantizing's cost apart from the fine-tune's gain
    card_models = ["base", *(["base_4bit"] if "base_4bit" in met else []), "tuned", "adapter_4bit"]
    headings = {
        "base": "base model",
        "base_4bit": "4-bit base",
        "tuned": "this model",
        "adapter_4bit": "adapter on 4-bit base",
    }

    def metric_row(key: str, label: str) -> str:
        cells = [(met.get(k) or {}).get(key) for k in (*card_models, *ggufs)]
        return f"| {label} | " + " | ".join("" if c is None else f"{c:.4f}" for c in cells) + " |"

    base = m["base_model"]
    hub_id = base.get("hub_id")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [kiln, qlora, lora, sft]",
        # The Hub's model tree reads a repo id here; a model with none (a local folder, a random
        # test model) leaves it out rather than write something no tool can resolve.
        *([f"base_model: {hub_id}", "base_model_relation: finetune"] if hub_id else []),
        "---",
        "",
        f"# {name}",
        "",
        f"A fine-tune of **{hub_id or base['id']}** (Kiln model `{exp['model']}`) on the Kiln dataset "
        f"`{exp['dataset']}`, trained with {'4-bit NF4 QLoRA' if tr['quantization'] == 'nf4' else 'LoRA'} "
        "and merged into the base weights.",
        "",
        f"Base weights: {base_weights_line(base)}",
        "",
        *prompt_format,
        "## How to load it",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'path = "."  # this folder',
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path)",
        *snippet_messages,
        "inputs = tokenizer.apply_chat_template(",
        "    messages, add_generation_prompt=True, return_dict=True, return_tensors='pt'",
        ")",
        "output = model.generate(**inputs, max_new_tokens=64, do_sample=False)",
        "print(tokenizer.decode(output[0][inputs['input_ids'].shape[1]:], skip_special_tokens=True))",
        "```",
        "",
        "## Data",
        "",
        "| split | rows | fingerprint (sha256 of ids and content hashes) |",
        "|---|---|---|",
        *[f"| {k} | {v['rows']} | `{v['fingerprint']}` |" for k, v in splits.items()],
        "",
        f"Each row keeps its stable id and the source, file and row it came from "
        f"(`kiln trace ID --dataset {exp['dataset']}`).",
        "",
        "## Training",
        "",
        f"- backend: {m['training']['backend']} ({m['training']['backend_reason']}); compute dtype "
        f"{m['training']['compute_dtype']}; device {m['training']['device']}",
        f"- LoRA r={tr['lora_r']}, alpha={tr['lora_alpha']}, dropout={tr['lora_dropout']}, "
        f"targets {tr['target_modules']}",
        f"- {m['training']['steps']} steps, batch {tr['per_device_batch_size']} x {tr['gradient_accumulation_steps']}, "
        f"learning rate {tr['learning_rate']} ({tr['lr_scheduler']}), seed {tr['seed']}",
        f"- max_seq_len {exp['tokenize']['max_seq_len']}, loss on assistant tokens only: "
        f"{exp['tokenize']['assistant_only_loss']}, packing: {exp['tokenize']['packing']}",
        f"- tokens trained: {m['training']['tokens_trained']}; loss {m['training']['first_loss']:.4f} -> "
        f"{m['training']['final_loss']:.4f}",
        f"- merged onto the {m['merged']['report'].get('merge_onto')} weights, saved as "
        f"{m['merged']['report'].get('saved_dtype')}",
        "",
        f"## Evaluation ({met.get('generated_rows')} test rows, greedy decoding)",
        "",
        f"Main metric: {label(main_metric(met))}.",
        "",
        "| metric | "
        + " | ".join(headings[k] for k in card_models)
        + " |"
        + "".join(f" {k.removeprefix('gguf_')} GGUF (llama.cpp) |" for k in ggufs),
        "|---|" + "---|" * (len(card_models) + len(ggufs)),
        *[metric_row(name, label(name)) for name in [*task_metrics(met), "loss"]],
        "",
        *regression_card_lines(met),
        *gguf_card_lines(m),
        "## Provenance",
        "",
        f"- code: {commit}",
        f"- base weights sha256: {json.dumps(m['base_model'].get('weights'))}",
        "- packages: " + ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v),
        "- the full record: `manifest.json` in this folder (config, hashes, stage times, hardware)",
        *[f"- **unpinned**: {u}" for u in unpinned_inputs(m)],
        "",
    ]
    return "\n".join(lines)


def gguf_card_lines(m: dict) -> list[str]:
    """The GGUF exports beside this model (in the run's `gguf/` folder): what each is and what its
    verification in llama.cpp found."""
    reports = m.get("gguf") or {}
    if not reports:
        return []
    lines = [
        "## GGUF (llama.cpp, Ollama, LM Studio)",
        "",
        f"Exported by {next(iter(reports.values()))['converter']['name']} "
        f"{next(iter(reports.values()))['converter']['version']} into the run's `gguf/` folder, with an Ollama "
        "`Modelfile`; each file verified in llama.cpp against this model and scored above.",
        *(["", f"Note: {note}."] if (note := (next(iter(reports.values())).get("ollama") or {}).get("note")) else []),
        "",
        "| file | size | token ids equal (evaluated prompts) | max next-token probability diff | sha256 |",
        "|---|---|---|---|---|",
    ]
    for r in reports.values():
        t, lp = r["token_ids"], r["logprobs"]
        lines.append(
            f"| `{r['gguf']}` | {r['size_mb']} MB | {t['identical']} of {t['prompts']} | "
            f"{lp['max_abs_prob_diff']:.3g} (tolerance {lp['tolerance']}) | `{r['sha256']}` |"
        )
    return [*lines, ""]


def base_weights_line(base: dict) -> str:
    """Where the weights the model was trained on came from, in words (not always the Hub's)."""
    kind = base.get("kind")
    if kind == "gguf_package":
        (file,) = base["source_files"] or ["?"]
        return (
            f"the GGUF file `{file}` of the Python package `{base['id'].split(':')[0]}`, dequantized "
            f"and saved as {base.get('dtype')} (the rounding of that file's quantization is in them; they "
            "are not the Hub repo's original weights)."
        )
    if kind == "hub":
        where = f"`{base['id']}` at revision `{base.get('revision')}` from the Hugging Face Hub"
        return f"{where}, saved as {base.get('dtype')}."
    if kind == "local":
        return f"the local folder `{base['id']}`, saved as {base.get('dtype')}."
    return f"`{base['id']}` ({kind})."


def regression_card_lines(metrics: dict) -> list[str]:
    """The model card's regression-set table: what the fine-tune may have cost elsewhere."""
    rows = regression_rows(metrics)
    if not rows:
        return []
    return [
        "Regression sets (loss on answer tokens; a rise is forgetting):",
        "",
        "| regression set | rows | base model loss | this model loss | tuned - base |",
        "|---|---|---|---|---|",
        *[
            f"| {r['regression set']} | {r['rows']} | {r['base loss']:.4f} | {r['tuned loss']:.4f} "
            f"| {r['tuned - base loss']:+.4f} |"
            for r in rows
        ],
        "",
    ]


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


def publish(merged_dir: str | Path, manifest_path: str | Path, out_dir: str | Path) -> None:
    """The shippable model folder: the merged weights (hard links, no copy), its card and manifest."""
    src, out = Path(merged_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.rglob("*")):
        if f.is_dir() or f.name in ("README.md", "manifest.json") or f.name.startswith("."):
            # README and manifest are written below, never through a link into merged/; hidden
            # files (Snakemake's .snakemake_timestamp) are each folder's own: a shared inode would
            # make touching one mark the other as changed.
            continue
        dst = out / f.relative_to(src)
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, dst)
        except OSError:
            shutil.copy2(f, dst)
    manifest = json.loads(Path(manifest_path).read_text())
    shutil.copyfile(manifest_path, out / "manifest.json")
    (out / "README.md").write_text(model_card(manifest))
