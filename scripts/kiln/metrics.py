"""Metrics as data: what each metric means and its scale, and which ones a task's metrics.json holds.

Evaluation decides which metrics a task gets (JSON answers: exact match, valid JSON, field accuracy;
free text: exact match, chrF, ROUGE-L). Everything downstream (comparison, pages, model card, report,
reproducibility check) reads the names from the metrics file through this module instead of
assuming the JSON task's keys, and the main metric is the one named in ``evaluate.main_metric``.
"""

from __future__ import annotations

# name -> (label, scale: the value of a perfect score, higher_is_better). Unknown names still show.
KNOWN = {
    "exact_match": ("exact match", 1.0, True),
    "valid_json": ("valid JSON", 1.0, True),
    "mean_field_accuracy": ("mean field accuracy", 1.0, True),
    "chrf": ("chrF", 100.0, True),
    "rouge_l": ("ROUGE-L F", 1.0, True),
    "accuracy": ("accuracy", 1.0, True),
    "macro_f1": ("macro F1", 1.0, True),
    "loss": ("loss (test, assistant tokens)", None, False),
    "perplexity": ("perplexity", None, False),
}


def higher_is_better(name: str) -> bool:
    return KNOWN.get(name, (None, None, True))[2]


# The models evaluation scores, in display order: the base, the base quantized to 4 bits without
# the adapter (what quantizing alone costs; only where training ran on an NF4 base), the published
# (merged) model, and the adapter on the 4-bit base it was trained against.
MODELS = ("base", "base_4bit", "tuned", "adapter_4bit")
# Counts and timings in a model's block.
NOT_METRICS = {
    "n",
    "eval_seconds",
    "loss_tokens",
    "other_predictions",
    "continuations",
    "generated_tokens",
    "tokens_per_second",
    "identical_to_tuned",
}


def gguf_models(metrics: dict) -> list[str]:
    """The exported GGUF files evaluate scored (``gguf_<type>``), in file order."""
    return [k for k in metrics if k.startswith("gguf_") and isinstance(metrics[k], dict)]


def model_keys(metrics: dict) -> list[str]:
    """Every model block of a metrics file: the three of MODELS, then the GGUF exports."""
    return [*[k for k in MODELS if k in metrics], *gguf_models(metrics)]


def label(name: str) -> str:
    return KNOWN.get(name, (name.replace("_", " "), None, True))[0]


def scale(name: str) -> float | None:
    return KNOWN.get(name, (None, None, True))[1]


def scalar_metrics(block: dict | None) -> dict[str, float]:
    """The numeric metrics of one model's block (loss and perplexity included), in file order."""
    return {
        k: v
        for k, v in (block or {}).items()
        if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def task_metrics(metrics: dict) -> list[str]:
    """The task's scored metrics (all but loss and perplexity, unless perplexity is what a text
    task is scored by), over every model, in file order."""
    if metrics.get("task") == "text":
        return ["perplexity"]
    names: dict[str, None] = {}
    for model in MODELS:
        for name in scalar_metrics(metrics.get(model)):
            if name not in ("loss", "perplexity"):
                names[name] = None
    return list(names)


TASKS = ("json", "label", "chat", "text")
# The metric a task is judged by unless evaluate.main_metric names another of its metrics.
TASK_MAIN = {"json": "exact_match", "label": "macro_f1", "chat": "chrf", "text": "perplexity"}
TASK_METRICS = {
    "json": ["exact_match", "valid_json", "mean_field_accuracy"],
    "label": ["accuracy", "macro_f1", "exact_match"],
    "chat": ["exact_match", "chrf", "rouge_l"],
    "text": ["perplexity"],
}
LABEL_MAX_CHARS = 40  # a label is short and one line; more distinct values than LABEL_SHARE of rows is text
LABEL_SHARE = 0.5


def _json_object(text: str):
    import json

    try:
        value = json.loads(text)
    except (ValueError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def detect_task(kinds: list[str], references: list[str]) -> tuple[str, str]:
    """(task, why) from the test rows: no chat rows -> text; every answer a JSON object -> json;
    short one-line answers drawn from a small set -> label; else chat (free text)."""
    if not any(k == "chat" for k in kinds):
        return "text", "the test rows are plain text (no chat turns)"
    if not references:
        return "chat", "no answers to look at"
    if all(_json_object(r) is not None for r in references):
        return "json", f"all {len(references)} reference answers are JSON objects"
    distinct = {r.strip() for r in references}
    short = all(len(r.strip()) <= LABEL_MAX_CHARS and "\n" not in r.strip() for r in references)
    if short and len(distinct) <= max(2, LABEL_SHARE * len(references)):
        return "label", (
            f"{len(distinct)} distinct answers over {len(references)} rows, each one line of at most "
            f"{LABEL_MAX_CHARS} characters"
        )
    return "chat", "answers are free text (not JSON objects, not a small set of short labels)"


def label_scores(predictions: list[str], references: list[str]) -> dict:
    """Accuracy, macro-F1 over the reference labels, per-label counts and the confusion matrix.

    Written here rather than taken from scikit-learn: the few lines of F1 do not justify a large
    dependency, and the confusion matrix is wanted as a JSON map, not an array."""
    preds = [p.strip() for p in predictions]
    refs = [r.strip() for r in references]
    n = len(refs)
    labels = sorted(set(refs))
    confusion: dict[str, dict[str, int]] = {lab: {} for lab in labels}
    for p, r in zip(preds, refs, strict=True):
        confusion[r][p] = confusion[r].get(p, 0) + 1
    per_label, f1s = {}, []
    for lab in labels:
        tp = confusion[lab].get(lab, 0)
        predicted = sum(1 for p in preds if p == lab)
        actual = sum(confusion[lab].values())
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_label[lab] = {"reference": actual, "predicted": predicted, "correct": tp, "f1": f1}
        f1s.append(f1)
    accuracy = sum(p == r for p, r in zip(preds, refs, strict=True)) / n if n else 0.0
    return {
        "accuracy": accuracy,
        "macro_f1": sum(f1s) / len(f1s) if f1s else 0.0,
        "exact_match": accuracy,
        "per_label": per_label,
        "confusion": confusion,
        "other_predictions": sum(1 for p in preds if p not in confusion),
    }


def main_metric(metrics: dict) -> str:
    """The metric an experiment is judged by: the one its evaluate settings named."""
    return metrics.get("main_metric") or "exact_match"


def resolve_main_metric(setting: str, task: str) -> str:
    return TASK_MAIN[task] if setting == "auto" else setting


PUBLISHED_TOLERANCE = 0.01  # of the main metric's scale (1 point of a rate); relative where it has none


def published_check(metrics: dict) -> dict | None:
    """Does the published (merged) model score like the adapter it came from? The gap on the main
    metric, worse-is-positive, against a tolerance of one point of its scale (1% relative for a
    metric without one, such as perplexity). None when either model was not scored."""
    main = main_metric(metrics)
    tuned, adapter = (metrics.get("tuned") or {}).get(main), (metrics.get("adapter_4bit") or {}).get(main)
    if tuned is None or adapter is None:
        return None
    gap = (adapter - tuned) if higher_is_better(main) else (tuned - adapter)
    tolerance = PUBLISHED_TOLERANCE * (scale(main) or abs(adapter))
    return {
        "metric": main,
        "tuned": tuned,
        "adapter_4bit": adapter,
        "gap": gap,
        "tolerance": tolerance,
        "ok": gap <= tolerance,
    }


def published_warning(metrics: dict, merge: dict | None = None) -> str | None:
    """The loud line for a published model that scores below its adapter, and what to do."""
    check = published_check(metrics)
    if not check or check["ok"]:
        return None
    how = ""
    if merge:
        how = f" (merged onto the {merge.get('merge_onto')} weights, saved as {merge.get('saved_dtype')})"
    drift = (metrics.get("merge_drift") or {}).get("identical_generations")
    same = f"; {drift:.0%} of its generations are the adapter's" if drift is not None else ""
    return (
        f"the published model{how} scores {label(check['metric'])} {check['tuned']:.4g}, the adapter it "
        f"came from {check['adapter_4bit']:.4g}: more than the tolerance {check['tolerance']:.3g} apart{same}. "
        "The merge is exact (see merge_report.json); the gap is the adapter meeting other weights than it "
        "was trained against. `merge.onto: dequantized` publishes the weights it was trained on; "
        "`merge.dtype: float32` keeps the adapter's small updates that a 16-bit save rounds away."
    )


def below_base_warning(metrics: dict) -> str | None:
    """The line for a published model that scores worse than its base on the main metric, with the
    4-bit base's score (quantizing alone) beside it, and what usually helps."""
    main = main_metric(metrics)
    base, tuned = (metrics.get("base") or {}).get(main), (metrics.get("tuned") or {}).get(main)
    if base is None or tuned is None or (tuned >= base if higher_is_better(main) else tuned <= base):
        return None
    q = (metrics.get("base_4bit") or {}).get(main)
    quant = f"; the 4-bit base without the adapter: {q:.4g} (what quantizing alone costs)" if q is not None else ""
    return (
        f"the published model is worse than its base: {label(main)} {base:.4g} -> {tuned:.4g}{quant}. What "
        "usually helps: more steps (training.max_steps), training.quantization: none for a small model, "
        "merge.onto: original"
    )


def run_summary(metrics_by_experiment: dict[str, dict], results: str, notes: dict | None = None) -> str:
    """The lines a finished run ends with: each experiment's main metric, base -> tuned (and the
    adapter on the 4-bit base), where its model is, a note per experiment where one was recorded
    (``notes``: name -> text or None), and how to make the report."""
    lines = []
    for name, m in metrics_by_experiment.items():
        main = main_metric(m)
        base, tuned = (m.get("base") or {}).get(main), (m.get("tuned") or {}).get(main)
        if base is None or tuned is None:
            continue
        adapter = (m.get("adapter_4bit") or {}).get(main)
        extra = f" (adapter on the 4-bit base {adapter:.4g})" if adapter is not None else ""
        lines.append(f"Kiln: {name}: {label(main)} {base:.4g} -> {tuned:.4g}{extra}; model: {results}/{name}/model")
        for warning in (published_warning(m), below_base_warning(m)):
            if warning:
                lines.append(f"Kiln: WARNING {name}: {warning}")
        if (notes or {}).get(name):
            lines.append(f"Kiln: NOTE {name}: {notes[name]}")
    if lines:
        lines.append(f"Kiln: the report: snakemake --report {results}/report.html")
    return "\n".join(lines)


def check_main_metric(name: str, produced: list[str], where: str = "evaluate.main_metric") -> None:
    if name not in produced:
        raise ValueError(
            f"{where} is {name!r}, but this task's evaluation produces {', '.join(produced)}; "
            f"set {where} to one of them"
        )
