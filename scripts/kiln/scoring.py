"""Scoring generated answers against references, by task (kiln.metrics.TASK_METRICS names which
metrics each task reports): JSON exact match, valid JSON and per-field accuracy; labels through
kiln.metrics.label_scores; free text exact match, chrF (sacrebleu), ROUGE-L (rouge-score) and lengths."""

from __future__ import annotations

import json
import re

from kiln.metrics import label_scores


def parse_json(text: str):
    try:
        return json.loads(text)
    except (json.JSONDecodeError, TypeError):
        return None


class _WordTokenizer:
    """Lower-cased Unicode word runs. rouge-score's default tokenizer keeps only ASCII letters and
    digits, so a German answer loses its umlaut words and a Chinese one scores 0 against itself."""

    @staticmethod
    def tokenize(text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F-measure over rows (rouge-score, Google's reimplementation of ROUGE-1.5.5)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    return sum(scores) / max(1, len(scores))


def length_stats(predictions: list[str], references: list[str]) -> dict:
    """Answer lengths in words: a tuned model that rambles or stops short shows here, not in chrF."""
    pred = [len(_WordTokenizer.tokenize(p)) for p in predictions]
    ref = [len(_WordTokenizer.tokenize(r)) for r in references]
    n = max(1, len(pred))
    return {
        "prediction_words_mean": sum(pred) / n,
        "reference_words_mean": sum(ref) / n,
        "ratio": sum(pred) / max(1, sum(ref)),
        "empty_predictions": sum(1 for p in predictions if not p.strip()),
    }


def score(predictions: list[str], references: list[str], task: str | None = None) -> dict:
    """Task metrics (kiln.metrics.TASK_METRICS): json: exact match, valid JSON, field accuracy;
    label: accuracy, macro-F1, per-label counts, confusion; chat: exact match, chrF, ROUGE-L and
    answer lengths; text: none from generation (its perplexity comes from the loss; its
    continuations are samples). Without a task: json or chat, by the references."""
    n = len(references)
    refs = [parse_json(r) for r in references]
    if task is None:
        task = "json" if n > 0 and all(isinstance(r, dict) for r in refs) else "chat"
    out: dict = {"n": n}
    if task == "text" or n == 0:
        return out
    if task == "label":
        return {**out, **label_scores(predictions, references)}
    if task == "json":
        preds = [parse_json(p.strip()) for p in predictions]
        out["exact_match"] = sum(p == r for p, r in zip(preds, refs, strict=True)) / n
        out["valid_json"] = sum(isinstance(p, dict) for p in preds) / n
        fields = sorted({k for r in refs for k in r})
        out["field_accuracy"] = {
            f: sum(isinstance(p, dict) and p.get(f) == r.get(f) for p, r in zip(preds, refs, strict=True)) / n
            for f in fields
        }
        out["mean_field_accuracy"] = sum(out["field_accuracy"].values()) / max(1, len(fields))
    else:
        from sacrebleu.metrics import CHRF

        out["exact_match"] = sum(p.strip() == r.strip() for p, r in zip(predictions, references, strict=True)) / n
        out["chrf"] = CHRF().corpus_score(predictions, [references]).score
        out["rouge_l"] = rouge_l(predictions, references)
        out["length"] = length_stats(predictions, references)
    return out
