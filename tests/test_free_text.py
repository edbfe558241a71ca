"""A free-text task (answers are sentences, not JSON) through evaluation, comparison, pages, the
report and the reproducibility check: metrics are whatever the task produced, judged by chrF."""

from __future__ import annotations

import csv
import json
import subprocess

import pytest
from conftest import KILN, Workflow, tiny_config

CITIES = ["Paris", "Rome", "Oslo", "Lima", "Cairo", "Tokyo", "Quito", "Bern", "Dublin", "Hanoi", "Accra", "Riga"]


def free_text_config(folder) -> dict:
    rows = []
    for i in range(72):
        city = CITIES[i % len(CITIES)]
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"Describe a trip to {city} in one sentence (note {i})."},
                    {"role": "assistant", "content": f"A trip to {city} means long walks and good food, day {i}."},
                ]
            }
        )
    (folder / "trips.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tiny_config()
    cfg["datasets"] = {
        "trips": {
            "sources": [{"name": "mine", "kind": "local", "path": "trips.jsonl"}],
            "build": {"validation": 0.1, "test": 0.15, "seed": 0},
        }
    }
    exp = cfg["experiments"].pop("tiny")
    exp["dataset"] = "trips"
    exp["evaluate"]["main_metric"] = "chrf"
    cfg["experiments"]["trips"] = exp
    return cfg


@pytest.mark.slow
def test_a_free_text_experiment_goes_through_compare_pages_report_and_repro(tmp_path):
    wf = Workflow(tmp_path, free_text_config(tmp_path))
    wf.run()
    metrics = json.loads(wf.path("trips/metrics.json").read_text())
    assert metrics["main_metric"] == "chrf" and metrics["task_metrics"] == ["exact_match", "chrf", "rouge_l"]
    assert "valid_json" not in metrics["tuned"] and 0 <= metrics["tuned"]["rouge_l"] <= 1
    assert metrics["tuned"]["length"]["reference_words_mean"] > 10

    with open(wf.path("experiments.csv")) as f:
        row = next(csv.DictReader(f))
    assert row["main_metric"] == "chrf"
    assert float(row["tuned_chrf"]) == pytest.approx(metrics["tuned"]["chrf"])
    assert float(row["delta_chrf"]) == pytest.approx(metrics["tuned"]["chrf"] - metrics["base"]["chrf"])
    assert float(row["tuned_exact_match"]) == pytest.approx(metrics["tuned"]["exact_match"])
    assert "tuned_valid_json" not in row

    card = wf.path("trips/model/README.md").read_text()
    assert "Main metric: chrF." in card and f"| chrF | {metrics['base']['chrf']:.4f} |" in card
    assert "valid JSON" not in card
    page = wf.path("trips/manifest.html").read_text()
    assert "chrF base -&gt; tuned" in page and "<h3>Answer lengths (words)</h3>" in page
    assert f"| ROUGE-L F | {metrics['base']['rouge_l']:.4f} |" in card

    report = tmp_path / "report.html"
    wf.run("--report", str(report))
    assert report.stat().st_size > 10_000

    # Retrain from the manifest in an empty folder: chrF is among the checks, and it reproduces.
    out = subprocess.run(
        [*KILN, "repro", "trips", "--workdir", str(tmp_path / "again"), "--json"],
        capture_output=True,
        text=True,
        cwd=wf.workdir,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    checks = {c["check"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["metrics.tuned.chrf"]["ok"] and "tolerance 5" in checks["metrics.tuned.chrf"]["difference"]
    assert "metrics.tuned.valid_json" not in checks and checks["metrics.tuned.rouge_l"]["ok"]
