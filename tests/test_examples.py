"""The shipped examples (config/examples/): their data is what this Python's standard library makes,
their configs pass the parse-time checks, and the label example, run with README's command, gives a
tuned model that beats the base on its main metric by a stated margin."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import SNAKEMAKE

from kiln.config import check_local_paths, extend_default, validate
from kiln.examples import label_rows, summary_rows

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "config" / "examples"
# The label example's tuned model must beat the base's macro-F1 by this much (measured 2026-11-28
# on the 2-core CPU: see config/examples/README.md).
MARGIN = 0.3


def _rows(name):
    return [json.loads(line) for line in (EXAMPLES / "data" / name).read_text().splitlines()]


def test_the_example_data_is_what_this_python_makes():
    source = json.loads((EXAMPLES / "data" / "SOURCE.json").read_text())
    made_by = source["python"].rsplit(".", 1)[0]
    assert platform.python_version().startswith(made_by + "."), f"data made by Python {source['python']}"
    assert _rows("stdlib_modules.jsonl") == label_rows()
    assert _rows("stdlib_summaries.jsonl") == summary_rows()
    assert source["rows"] == {"stdlib_modules.jsonl": 362, "stdlib_summaries.jsonl": 473}
    assert "PSF" in source["license"]


@pytest.mark.parametrize("name", ["stdlib-modules.yaml", "stdlib-summaries.yaml"])
def test_each_example_config_passes_the_parse_time_checks(name, monkeypatch):
    monkeypatch.chdir(REPO)  # README runs them from the clone's root
    default = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    cfg = validate(extend_default(default, yaml.safe_load((EXAMPLES / name).read_text())))
    check_local_paths(cfg)
    assert len(cfg["experiments"]) == 1 and "default" not in cfg["experiments"]
    assert "smollm2-135m" in cfg["models"]  # the embedded model, from the default


def test_readme_gives_the_example_commands():
    readme = (REPO / "README.md").read_text()
    for name in ("stdlib-modules.yaml", "stdlib-summaries.yaml"):
        assert f"snakemake --cores 1 --configfile config/examples/{name}" in readme


@pytest.mark.slow
def test_the_label_example_beats_the_base_model(tmp_path):
    # README's command, run from a folder laid out like a clone's root (config/ is the repo's).
    (tmp_path / "config").symlink_to(REPO / "config")
    cmd = [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--cores", "2"]
    cmd += ["--configfile", "config/examples/stdlib-modules.yaml"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "is extended by additional config" not in proc.stderr
    metrics = json.loads((tmp_path / "results" / "stdlib-modules" / "metrics.json").read_text())
    assert metrics["task"] == "label" and metrics["main_metric"] == "macro_f1"
    base, tuned = metrics["base"]["macro_f1"], metrics["tuned"]["macro_f1"]
    print(f"stdlib-modules macro-F1: base {base:.3f}, tuned {tuned:.3f}; accuracy {metrics['tuned']['accuracy']:.3f}")
    assert tuned - base >= MARGIN, (base, tuned)
    assert set(metrics["tuned"]["confusion"]) <= {"math", "os", "str", "operator", "time", "random", "shutil"}


def test_readme_quotes_the_committed_example_results():
    """README's example table is the one benchmarks/examples.py renders from its results file."""
    import sys

    sys.path.insert(0, str(REPO / "benchmarks"))
    from examples import readme_table

    result = json.loads((REPO / "benchmarks" / "results" / "examples.json").read_text())
    assert readme_table(result) in (REPO / "README.md").read_text()
    label_example = result["examples"]["stdlib-modules"]
    assert label_example["tuned_minus_base"] >= MARGIN and label_example["task"] == "label"
