"""Task types (issue 13): labels and plain text through evaluation, comparison, pages, the model card
and the report, each judged by its own metrics; `evaluate.task: auto` says what it chose and why."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import Workflow, tiny_config

from kiln.metrics import detect_task, label_scores
from kiln.pages import label_tables
from kiln.reports import Score

WORDS = ["quick", "late", "broken", "lovely", "slow", "perfect", "cold", "fresh", "noisy", "bright", "rude", "kind"]


def test_auto_detection_says_what_and_why():
    chat = ["chat"] * 4
    assert detect_task(["text"] * 3, [])[0] == "text"
    assert detect_task(chat, ['{"a": 1}', '{"a": 2}', '{"b": 0}', "{}"])[0] == "json"
    task, why = detect_task(chat * 3, ["positive", "negative", "positive", "neutral"] * 3)
    assert task == "label" and "3 distinct answers over 12 rows" in why
    assert detect_task(chat, ["A long answer about trips.", "Another one.", "Third.", "Fourth."])[0] == "chat"


def test_label_scores():
    s = label_scores(["pos", "neg", "pos", "maybe"], ["pos", "neg", "neg", "neg"])
    assert s["accuracy"] == 0.5 == s["exact_match"]
    # pos: precision 1/2, recall 1/1 -> 2/3; neg: precision 1/1, recall 1/3 -> 1/2.
    assert s["macro_f1"] == pytest.approx((2 / 3 + 1 / 2) / 2)
    assert s["confusion"] == {"neg": {"neg": 1, "pos": 1, "maybe": 1}, "pos": {"pos": 1}}
    assert s["per_label"]["neg"] == {"reference": 3, "predicted": 1, "correct": 1, "f1": 0.5}
    assert s["other_predictions"] == 1
    html = label_tables(Score.from_dict(s))
    assert "<h3>Confusion matrix" in html and "maybe" in html
    assert label_tables(Score.from_dict({"accuracy": 1.0})) == ""


def _repro_checks(wf: Workflow, experiment: str) -> dict:
    """What `kiln repro` checks for this experiment's task, by name: its metric comparison run on the
    experiment's own manifest and metrics (the full retrain in an empty folder is the same code for
    every task, and runs end to end in tests/test_free_text.py; retraining here too would add two
    minutes to CI for no other code path)."""
    from kiln.manifest_record import Manifest
    from kiln.reports import Metrics
    from kiln.repro import compare_metrics

    manifest = Manifest.read(wf.path(f"{experiment}/manifest.json"))
    metrics = Metrics.read(wf.path(f"{experiment}/metrics.json"))
    checks = {c.check: c for c in compare_metrics(manifest, metrics)}
    assert all(c.ok for c in checks.values()), checks
    return checks


def _experiment(cfg: dict, dataset: str, source: dict) -> dict:
    cfg["datasets"] = {dataset: {"sources": [source], "build": {"validation": 0.1, "test": 0.2, "seed": 0}}}
    exp = cfg["experiments"].pop("tiny")
    exp["dataset"] = dataset
    cfg["experiments"][dataset] = exp
    return cfg


@pytest.mark.slow
def test_a_label_task_is_scored_by_accuracy_macro_f1_and_a_confusion_matrix(tmp_path):
    rows = []
    for i in range(80):
        word = WORDS[i % len(WORDS)]
        sentiment = "negative" if word in ("late", "broken", "slow", "cold", "noisy", "rude") else "positive"
        # Numbers after blank lines: the texts whose tokens llama.cpp split otherwise (issue 24)
        prompt = f"Review {i}: the delivery was {word}.\n\n{i % 9 + 1} items\n{i % 7} returns\n\nSentiment?"
        rows.append({"prompt": prompt, "completion": sentiment})
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "general.txt").write_text("".join(f"A plain sentence about kilns, number {i}.\n" for i in range(12)))
    cfg = tiny_config()
    orders = cfg["datasets"]["orders"]
    cfg = _experiment(cfg, "reviews", {"name": "mine", "kind": "local", "path": "reviews.jsonl"})
    # Regression sets: a dataset of the config, and a file glob (becomes a one-source dataset).
    cfg["datasets"]["orders"] = orders
    cfg["experiments"]["reviews"]["evaluate"]["regression"] = ["orders", "general.txt"]
    wf = Workflow(tmp_path, cfg)
    proc = wf.run()
    metrics = json.loads(wf.path("reviews/metrics.json").read_text())
    # The run ends with its result on the console, not only "N of N steps (100%) done".
    b, t = metrics["base"]["macro_f1"], metrics["tuned"]["macro_f1"]
    assert f"Kiln: reviews: macro F1 {b:.4g} -> {t:.4g}" in proc.stderr
    assert "Kiln: the report: snakemake --report results/report.html" in proc.stderr
    regression = metrics["regression"]
    scored = min(12, cfg["experiments"]["reviews"]["evaluate"]["max_samples"])  # at most max_samples rows
    assert list(regression) == ["orders", "general.txt"] and regression["general.txt"]["rows"] == scored
    for block in regression.values():
        assert block["tuned_minus_base_loss"] == pytest.approx(block["tuned"]["loss"] - block["base"]["loss"])
        assert block["base"]["perplexity"] > 1 and block["adapter_4bit"]["loss_tokens"] > 0
    assert metrics["task"] == "label" and "2 distinct answers" in metrics["task_reason"]
    # the 4-bit base without the adapter, scored like the others: quantizing's cost on its own
    assert metrics["base_4bit"]["loss"] > 0 and "macro_f1" in metrics["base_4bit"]
    assert (
        "| metric | base model | 4-bit base | this model | adapter on 4-bit base |"
        in wf.path("reviews/model/README.md").read_text()
    )
    verify = json.loads(wf.path("reviews/gguf/verify-q8_0.json").read_text())  # the GGUF reads training's tokens
    assert verify["ok"] and verify["token_ids"]["identical"] == verify["token_ids"]["prompts"] > 0
    assert metrics["main_metric"] == "macro_f1"
    assert metrics["task_metrics"] == ["accuracy", "macro_f1", "exact_match"]
    tuned = metrics["tuned"]
    assert set(tuned["confusion"]) == {"negative", "positive"} and 0 <= tuned["macro_f1"] <= 1
    assert sum(v["reference"] for v in tuned["per_label"].values()) == tuned["n"]
    with open(wf.path("experiments.csv")) as f:
        row = next(csv.DictReader(f))
    assert row["main_metric"] == "macro_f1"
    assert float(row["delta_macro_f1"]) == pytest.approx(tuned["macro_f1"] - metrics["base"]["macro_f1"])
    assert float(row["regression_orders_delta_loss"]) == pytest.approx(regression["orders"]["tuned_minus_base_loss"])
    page = wf.path("reviews/manifest.html").read_text()
    assert "Confusion matrix (tuned; rows: reference, columns: predicted)" in page and 'id="confusion"' in page
    assert "Regression sets (loss on answer tokens: forgetting)" in page and 'id="regression"' in page
    card = wf.path("reviews/model/README.md").read_text()
    general = regression["general.txt"]
    assert (
        f"| general.txt | {scored} | {general['base']['loss']:.4f} | {general['tuned']['loss']:.4f} "
        f"| {general['tuned_minus_base_loss']:+.4f} |"
    ) in card
    assert "Main metric: macro F1." in card and f"| macro F1 | {metrics['base']['macro_f1']:.4f} |" in card
    report = tmp_path / "report.html"
    wf.run("--report", str(report))
    assert report.stat().st_size > 10_000
    checks = _repro_checks(wf, "reviews")
    # The rebuild's config carries the regression sets: each entry becomes the dataset it named,
    # local paths made absolute, and it passes the parse-time checks from another folder.
    from kiln.config import regression_dataset_name, validate
    from kiln.manifest_record import Manifest
    from kiln.repro import repro_config

    again = repro_config(Manifest.read(wf.path("reviews/manifest.json")), "results", base_dir=wf.workdir)
    general = regression_dataset_name("general.txt")
    assert again["experiments"]["reviews"]["evaluate"]["regression"] == ["orders", general]
    assert again["datasets"][general]["sources"][0]["path"] == str(tmp_path / "general.txt")
    assert set(validate(again)["datasets"]) == {"reviews", "orders", general}
    assert checks["metrics.tuned.macro_f1"].ok and checks["metrics.tuned.accuracy"].ok
    assert "metrics.tuned.valid_json" not in checks and "metrics.tuned.chrf" not in checks


@pytest.mark.slow
def test_a_plain_text_dataset_is_scored_by_perplexity(tmp_path):
    from test_lm_eval import write_task

    lines = [f"Note {i}: the {WORDS[i % len(WORDS)]} kiln fired its batch of cups at dawn." for i in range(80)]
    (tmp_path / "notes.txt").write_text("\n".join(lines) + "\n")
    cfg = _experiment(tiny_config(), "notes", {"name": "mine", "kind": "local", "path": "notes.txt"})
    (tmp_path / "tasks").mkdir()
    write_task(tmp_path / "tasks")  # lm-evaluation-harness, opt-in, on a local task
    cfg["experiments"]["notes"]["evaluate"]["lm_eval"] = {"tasks": ["kiln_mc"], "include_path": "tasks"}
    wf = Workflow(tmp_path, cfg)
    proc = wf.run()
    metrics = json.loads(wf.path("notes/metrics.json").read_text())
    assert metrics["task"] == "text" and metrics["main_metric"] == "perplexity"
    # the 4-bit base scored like the others; the closing summary warns exactly when the published
    # model's perplexity is above the base's
    assert metrics["base_4bit"]["perplexity"] > 1
    worse = metrics["tuned"]["perplexity"] > metrics["base"]["perplexity"]
    assert ("Kiln: WARNING notes: the published model is worse than its base" in proc.stderr) == worse
    assert metrics["task_metrics"] == ["perplexity"] and metrics["generated_rows"] == 8
    assert metrics["tuned"]["continuations"] == 8
    harness = metrics["lm_eval"]
    assert harness["tasks"] == ["kiln_mc"] and set(harness) == {"tasks", "base", "tuned"}
    assert 0 <= harness["tuned"]["kiln_mc"]["acc,none"] <= 1
    assert "lm-evaluation-harness" in wf.path("notes/manifest.html").read_text()
    samples = [json.loads(line) for line in wf.path("notes/samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and all(s["prompt"].startswith("Note ") for s in samples)
    for s in samples:  # the prefix and the reference (the document's own next tokens) make one line
        assert s["prompt"] + s["reference"] in lines and s["reference"]
        assert set(s) >= {"base", "tuned", "adapter_4bit"}
    assert "continuations of held-out document prefixes" in wf.path("notes/samples.html").read_text()
    assert metrics["tuned"]["perplexity"] > 1 and metrics["tuned"]["loss_tokens"] > 0
    with open(wf.path("experiments.csv")) as f:
        row = next(csv.DictReader(f))
    assert row["main_metric"] == "perplexity"
    assert float(row["tuned_perplexity"]) == pytest.approx(metrics["tuned"]["perplexity"])
    assert "Main metric: perplexity." in wf.path("notes/model/README.md").read_text()
    report = tmp_path / "report.html"
    wf.run("--report", str(report))
    assert report.stat().st_size > 10_000
    checks = _repro_checks(wf, "notes")
    # Perplexity follows the loss (no fixed scale): the loss check holds it; no generation metric.
    assert checks["metrics.tuned.loss"].ok and not [c for c in checks if c.startswith("metrics.") and "loss" not in c]


def test_the_run_summary_names_each_experiments_main_metric():
    from kiln.metrics import run_summary

    metrics = {
        "a": {
            "task": "json",
            "main_metric": "exact_match",
            "base": {"exact_match": 0.0},
            "tuned": {"exact_match": 0.92},
            "adapter_4bit": {"exact_match": 0.98},
        },
        "b": {"task": "text", "main_metric": "perplexity", "base": {"perplexity": 9.5}, "tuned": {"perplexity": 3.25}},
    }
    lines = run_summary(metrics, "results").splitlines()
    assert lines[0] == "Kiln: a: exact match 0 -> 0.92 (adapter on the 4-bit base 0.98); model: results/a/model"
    # The published model is 6 points below the adapter it came from: the run says so, and why.
    assert lines[1].startswith("Kiln: WARNING a: the published model scores exact match 0.92, the adapter it came")
    assert "merge.onto: dequantized" in lines[1]
    assert lines[2:] == [
        "Kiln: b: perplexity 9.5 -> 3.25; model: results/b/model",
        "Kiln: the report: snakemake --report results/report.html",
    ]
    assert run_summary({}, "results") == ""


def test_the_published_model_is_held_to_one_point_of_its_adapter():
    from kiln.metrics import published_check, published_warning

    def m(tuned, adapter, main="exact_match"):
        return {"main_metric": main, "tuned": {main: tuned}, "adapter_4bit": {main: adapter}}

    assert published_check(m(0.984375, 0.984375))["ok"] and published_warning(m(0.984375, 0.984375)) is None
    assert published_check(m(0.975, 0.984))["ok"]  # within one point
    assert not published_check(m(0.921875, 0.984375))["ok"]
    assert published_check(m(0.99, 0.95))["ok"]  # better than the adapter is never a problem
    assert published_check(m(30.0, 30.5, "chrf"))["ok"] and not published_check(m(28.0, 30.5, "chrf"))["ok"]
    assert not published_check(m(3.3, 3.2, "perplexity"))["ok"]  # lower is better: 3% worse
    assert published_check({"main_metric": "exact_match", "tuned": {"exact_match": 1.0}}) is None


def test_a_fine_tune_worse_than_its_base_ends_with_a_warning_and_the_4bit_bases_score():
    """kiln.metrics.run_summary: the published model below its base on the main metric is a
    `Kiln: WARNING` line with the 4-bit base's score beside it and what usually helps; at or above
    the base, no line."""
    from kiln.metrics import run_summary

    metrics = {
        "task": "text",
        "main_metric": "perplexity",
        "base": {"perplexity": 18.16},
        "base_4bit": {"perplexity": 18.65},
        "tuned": {"perplexity": 18.89},
    }
    text = run_summary({"topics": metrics}, "results")
    assert "Kiln: WARNING topics: the published model is worse than its base: perplexity 18.16 -> 18.89" in text
    assert "the 4-bit base without the adapter: 18.65" in text and "training.quantization: none" in text
    better = {**metrics, "tuned": {"perplexity": 17.0}}
    assert "worse than its base" not in run_summary({"topics": better}, "results")
