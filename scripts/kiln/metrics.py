"""Metrics as data: what each metric means and its scale, and which ones a task's metrics.json holds.

Evaluation decides which metrics a task gets (JSON answers: exact match, valid JSON, field accuracy;
free text: exact match, chrF). Everything downstream (comparison, pages, model card, report,
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
    "loss": ("loss (test, assistant tokens)", None, False),
    "perplexity": ("perplexity", None, False),
}
MODELS = ("base", "tuned", "adapter_4bit")  # the three models evaluation scores, in display order
NOT_METRICS = {"n", "eval_seconds", "loss_tokens"}  # counts and timings in a model's block


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
    """The task's scored metrics (all but loss and perplexity), over every model, in file order."""
    names: dict[str, None] = {}
    for model in MODELS:
        for name in scalar_metrics(metrics.get(model)):
            if name not in ("loss", "perplexity"):
                names[name] = None
    return list(names)


def main_metric(metrics: dict) -> str:
    """The metric an experiment is judged by: the one its evaluate settings named."""
    return metrics.get("main_metric") or "exact_match"


def check_main_metric(name: str, produced: list[str], where: str = "evaluate.main_metric") -> None:
    if name not in produced:
        raise ValueError(
            f"{where} is {name!r}, but this task's evaluation produces {', '.join(produced)}; "
            f"set {where} to one of them"
        )
