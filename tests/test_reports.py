"""The run's records read back as types (kiln.reports, kiln.manifest_record): every record the tiny
run wrote reads, gives back what was read, and a record that does not fit is refused naming the
file and the field; a manifest of an older shape (fields added since missing) still reads."""

from __future__ import annotations

import json

import pytest

from kiln.manifest_record import Manifest
from kiln.reports import DatasetStats, GgufReport, Metrics, ShardStats, TokenizeStats, TrainSummary


def _records(tiny_run) -> dict:
    results = tiny_run.path("")
    return {
        Manifest: [results / "tiny/manifest.json"],
        Metrics: [results / "tiny/metrics.json"],
        TrainSummary: [results / "tiny/train_summary.json"],
        GgufReport: sorted((results / "tiny/gguf").glob("verify-*.json")),
        DatasetStats: sorted((results / "data").glob("*/dataset_stats.json")),
        ShardStats: sorted((results / "data").glob("*/stats/*/*.json")),
        TokenizeStats: sorted((results / "data").glob("*/tokenized/*.json")),
    }


def test_every_record_of_a_run_reads_as_its_type_and_gives_back_what_was_read(tiny_run):
    for kind, paths in _records(tiny_run).items():
        assert paths, f"the tiny run wrote no {kind.__name__} record"
        for path in paths:
            record = kind.read(path)
            assert record.to_dict() == json.loads(path.read_text()), path


def test_the_audit_reads_the_manifest_as_attributes(tiny_run):
    m = Manifest.read(tiny_run.path("tiny/manifest.json"))
    raw = json.loads(tiny_run.path("tiny/manifest.json").read_text())
    assert m.config.experiment.training.lora_r == raw["config"]["experiment"]["training"]["lora_r"]
    assert m.metrics.value("tuned", "loss") == raw["metrics"]["tuned"]["loss"]
    assert m.metrics.main == raw["metrics"]["main_metric"]
    assert set(m.metrics.scores()) >= {"base", "tuned", "adapter_4bit"}
    assert m.data.splits["train"].fingerprint == raw["data"]["splits"]["train"]["fingerprint"]
    assert m.code.short() == (raw["code"]["commit"][:10] + ("+dirty" if raw["code"]["dirty"] else ""))


def test_a_manifest_of_an_older_shape_still_reads(tiny_run):
    """Fields that came after the first manifests (prompt example, GGUF reports, seeds, the
    workflow's packages, stage times, the merge and export settings) have defaults."""
    raw = json.loads(tiny_run.path("tiny/manifest.json").read_text())
    for key in ("prompt_example", "gguf", "seeds", "workflow_packages", "stages", "hardware", "adapter"):
        raw.pop(key, None)
    for key in ("merge", "export", "evaluate"):
        raw["config"]["experiment"].pop(key, None)
    raw["config"].pop("regression_datasets", None)
    old = Manifest.from_dict(raw, "old/manifest.json")
    assert old.gguf == {} and old.prompt_example is None and old.unpinned_inputs() == []
    assert old.config.experiment.merge.onto  # the settings' own defaults
    assert old.to_dict() == raw


@pytest.mark.parametrize(
    "where, value, field",
    [
        (("training", "steps"), "many", "training.steps"),
        (("metrics", "tuned", "loss"), "low", "metrics.tuned.loss"),
        (("config", "experiment", "training", "lora_rank"), 8, "training"),
    ],
)
def test_a_record_that_does_not_fit_names_the_file_and_the_field(tiny_run, tmp_path, where, value, field):
    raw = json.loads(tiny_run.path("tiny/manifest.json").read_text())
    node = raw
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = value
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps(raw))
    with pytest.raises(ValueError) as err:
        Manifest.read(bad)
    assert str(bad) in str(err.value) and field in str(err.value), err.value
    assert "rebuild it" in str(err.value) or "not a setting" in str(err.value)


def test_a_run_outside_a_git_checkout_reads(tiny_run):
    """A workflow copied or unpacked without .git: the code version has no commit, a note instead."""
    raw = json.loads(tiny_run.path("tiny/manifest.json").read_text())
    raw["code"] = {"commit": None, "dirty": None, "note": "/x is not a git checkout (or git is missing)"}
    m = Manifest.from_dict(raw, "copy/manifest.json")
    assert m.code.short() is None and m.to_dict() == raw


def test_a_missing_field_is_named(tmp_path):
    bad = tmp_path / "dataset_stats.json"
    bad.write_text(json.dumps({"rows_in": 3, "rows_rejected": 0}))
    with pytest.raises(ValueError, match=r"dataset_stats.json: splits: Field required"):
        DatasetStats.read(bad)
