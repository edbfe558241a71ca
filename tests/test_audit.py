"""Issue 4: manifests, lineage, comparison, the report in a real browser, MLflow, model card, repro."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import KILN, REPO, SNAKEMAKE, tiny_config

from kiln.lineage import TraceError, trace
from kiln.manifest import sha256_file
from kiln.repro import reproduce


def test_manifest_records_data_code_packages_weights_stages_and_metrics(tiny_run):
    m = json.loads(tiny_run.path("tiny/manifest.json").read_text())
    stats = json.loads(tiny_run.path("data/orders/dataset_stats.json").read_text())
    assert m["data"]["splits"] == stats["splits"]  # per-split rows and content fingerprints
    identity = json.loads(tiny_run.path("base/tiny/identity.json").read_text())
    assert m["base_model"]["weights"] == identity["weights"] and m["base_model"]["id"]
    # File hashes are the files' real sha256.
    for rel, digest in m["adapter"]["files"].items():
        assert sha256_file(tiny_run.path("tiny/adapter", rel)) == digest
    assert "model.safetensors" in m["merged"]["files"]
    git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert m["code"]["commit"] == git.stdout.strip() and isinstance(m["code"]["dirty"], bool)
    if m["code"]["dirty"]:
        assert len(m["code"]["diff_sha256"]) == 64
    for pkg in ("python", "torch", "transformers", "peft", "trl", "bitsandbytes", "datasets", "pandas", "pyarrow"):
        assert m["packages"][pkg], pkg
    assert m["packages"]["snakemake"] and "unsloth" in m["packages"]  # None where not installed
    assert m["hardware"]["cpu"] and m["hardware"]["cpu_count"] >= 1 and "gpu" in m["hardware"]
    assert m["training"]["hardware"]["cpu"]  # the machine training ran on
    assert m["seeds"] == {"data_split": 0, "training": 42, "sources": {"synthetic": 7}}
    for stage in ("collect", "clean", "build_dataset", "tokenize", "base_model", "train", "merge", "evaluate"):
        assert m["stages"][stage]["wall_s"] > 0 and m["stages"][stage]["max_rss_mb"] > 0, stage
    metrics = json.loads(tiny_run.path("tiny/metrics.json").read_text())
    assert m["metrics"] == metrics
    assert m["config"]["experiment"]["training"]["learning_rate"] == 0.002


def test_comparison_table_and_plots(tiny_run):
    rows = list(csv.DictReader(open(tiny_run.path("experiments.csv"))))
    assert [r["experiment"] for r in rows] == ["tiny"]
    metrics = json.loads(tiny_run.path("tiny/metrics.json").read_text())
    row = rows[0]
    assert float(row["tuned_exact_match"]) == pytest.approx(metrics["tuned"]["exact_match"])
    assert float(row["delta_exact_match"]) == pytest.approx(
        metrics["tuned"]["exact_match"] - metrics["base"]["exact_match"]
    )
    assert float(row["delta_loss"]) == pytest.approx(metrics["tuned"]["loss"] - metrics["base"]["loss"])
    assert row["learning_rate"] == "0.002" and row["lora_r"] == "4"
    md = tiny_run.path("experiments.md").read_text().splitlines()
    assert md[0].startswith("| experiment | base_exact_match |") and md[2].startswith("| tiny |")
    for png in ("plots/loss_curves.png", "plots/main_metric.png", "data/orders/report/token_lengths.png"):
        assert tiny_run.path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


def test_model_card_is_generated_from_the_manifest(tiny_run):
    model = tiny_run.path("tiny/model")
    card = (model / "README.md").read_text()
    m = json.loads((model / "manifest.json").read_text())
    assert m == json.loads(tiny_run.path("tiny/manifest.json").read_text())
    assert m["data"]["splits"]["train"]["fingerprint"] in card
    assert f"{m['metrics']['tuned']['exact_match']:.4f}" in card
    assert "AutoModelForCausalLM.from_pretrained" in card and m["base_model"]["id"] in card
    # The card's "how to load it" snippet runs as written, in the model folder (path = ".").
    snippet = re.search(r"```python\n(.*?)```", card, flags=re.S).group(1)
    proc = subprocess.run([sys.executable, "-c", snippet], cwd=model, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "## Prompt format" in card and m["prompt_example"]["messages"][-1]["role"] == "user"
    # The weights are the merged model's (hard links, not copies).
    merged = tiny_run.path("tiny/merged/model.safetensors")
    assert os.path.samefile(model / "model.safetensors", merged) or sha256_file(
        model / "model.safetensors"
    ) == sha256_file(merged)


# ---- lineage -----------------------------------------------------------------------------------
def test_trace_of_a_kept_row_shows_raw_record_cleaning_and_split(tiny_run):
    clean = pq.read_table(tiny_run.path("data/orders/clean/synthetic/synthetic.parquet")).to_pylist()
    row = next((r for r in clean if r["edits"]), clean[0])  # one that cleaning changed, if any
    result = trace(tiny_run.workdir / "results", "orders", row["kiln_id"][:10])
    assert result["kiln_id"] == row["kiln_id"]
    occ = next(o for o in result["occurrences"] if o["row"] == row["row"])
    assert occ["source"] == "synthetic" and occ["raw"] and json.loads(occ["raw"])["messages"]
    assert occ["clean"]["status"] == "kept" and occ["clean"]["edits"] == (
        row["edits"].split(",") if row["edits"] else []
    )
    import datasets

    dd = datasets.load_from_disk(str(tiny_run.path("data/orders/dataset")))
    truth = [s for s, d in dd.items() if row["kiln_id"] in set(d["kiln_id"])]
    if truth:
        assert occ["build"]["split"] == truth[0] and result["split"] == truth[0]
    else:  # dropped in build as a duplicate of another shard's row
        assert occ["build"]["status"] == "rejected"


def test_trace_of_a_rejected_row_gives_the_reason(tiny_run):
    rejected = pq.read_table(tiny_run.path("data/orders/rejected/synthetic/synthetic.parquet")).to_pylist()
    row = next(r for r in rejected if r["reason"] != "duplicate")
    out = subprocess.run(
        [*KILN, "trace", row["kiln_id"], "--config", str(tiny_run.config_path)],
        capture_output=True,
        text=True,
        cwd=tiny_run.workdir,
    )
    assert out.returncode == 0, out.stderr
    assert f"row {row['row']}" in out.stdout and f"REJECTED, {row['reason']}" in out.stdout
    assert row["detail"] in out.stdout


def test_trace_of_an_unknown_id_is_a_clear_error(tiny_run):
    with pytest.raises(TraceError, match="no row of .* has an id starting with 'zzzz'"):
        trace(tiny_run.workdir / "results", "orders", "zzzz")


# ---- report in a real browser --------------------------------------------------------------------
def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def test_report_renders_the_metrics_table_in_a_browser(tiny_run, tmp_path):
    """`snakemake --report`, opened in headless Chromium: the metrics table is really rendered."""
    report = tiny_run.workdir / "results" / "report.html"
    tiny_run.run("--report", str(report))
    assert report.stat().st_size > 10_000
    browser, driver_path = _chromium(), shutil.which("chromedriver")
    if not (browser and driver_path):
        message = "needs headless Chromium and chromedriver (.ci/run installs them: chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(report.as_uri())
        wait = WebDriverWait(driver, 30)

        # The menu: the "Comparison" category, then the eye ("view") button of "metrics table".
        wait.until(ec.element_to_be_clickable((By.XPATH, "//span[normalize-space(text())='Comparison']"))).click()
        row = "//tr[td[normalize-space(text())='metrics table']]"
        wait.until(ec.element_to_be_clickable((By.XPATH, f"{row}//a[@iconname='eye']"))).click()
        # The result opens in a frame; its table must be rendered with the experiment's numbers.
        frame = wait.until(ec.presence_of_element_located((By.TAG_NAME, "iframe")))
        driver.switch_to.frame(frame)
        table = wait.until(ec.visibility_of_element_located((By.ID, "experiments")))
        headers = [th.text for th in table.find_elements(By.TAG_NAME, "th")]
        cells = [td.text for td in table.find_elements(By.CSS_SELECTOR, "tbody tr td")]
        assert table.size["height"] > 20 and table.size["width"] > 200  # laid out, not just present
        driver.switch_to.default_content()
        driver.save_screenshot(str(os.environ.get("KILN_REPORT_SCREENSHOT", tmp_path / "report.png")))
    finally:
        driver.quit()
    metrics = json.loads(tiny_run.path("tiny/metrics.json").read_text())
    row = dict(zip(headers, cells, strict=True))
    assert row["experiment"] == "tiny"
    assert float(row["tuned_exact_match"]) == pytest.approx(metrics["tuned"]["exact_match"], abs=1e-3)
    assert float(row["base_loss"]) == pytest.approx(metrics["base"]["loss"], rel=1e-3)


# ---- MLflow ------------------------------------------------------------------------------------
def test_training_metrics_reach_a_local_mlflow_store(workflow_factory, tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="mlflow-skinny is in the dev extra")
    cfg = tiny_config(max_steps=2)
    store = tmp_path / "mlruns"
    cfg["tracking"] = {"mlflow_uri": store.as_uri(), "mlflow_experiment": "kiln-test"}
    wf = workflow_factory(cfg)
    wf.run("results/tiny/adapter")
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = mlflow.tracking.MlflowClient(tracking_uri=store.as_uri())
    exp = client.get_experiment_by_name("kiln-test")
    assert exp is not None, "no MLflow experiment was created"
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1 and runs[0].info.run_name == "tiny"
    run = runs[0]
    assert run.data.params["learning_rate"] == "0.002" and run.data.params["max_steps"] == "2"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert len(history) == 2 and all(h.value > 0 for h in history)
    assert "eval_loss" in run.data.metrics


# ---- reproducibility -----------------------------------------------------------------------------
def test_reproducibility_check_rebuilds_data_and_retrains(tiny_run, tmp_path):
    result = reproduce(tiny_run.path("tiny/manifest.json"), tmp_path / "repro", train=True, base_dir=tiny_run.workdir)
    assert result.ok, result.checks
    names = {c.check for c in result.checks}
    assert {"data.train.fingerprint", "data.test.fingerprint", "base_model.weights", "metrics.tuned.loss"} <= names


def test_reproducibility_check_fails_on_a_changed_fingerprint(tiny_run, tmp_path):
    manifest = json.loads(tiny_run.path("tiny/manifest.json").read_text())
    manifest["data"]["splits"]["train"]["fingerprint"] = "0" * 64
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps(manifest))
    out = subprocess.run(
        [
            *KILN,
            "repro",
            "tiny",
            "--manifest",
            str(bad),
            "--data-only",
            "--workdir",
            str(tmp_path / "w"),
        ],
        capture_output=True,
        text=True,
        cwd=tiny_run.workdir,
    )
    assert out.returncode == 1, out.stderr
    assert "FAIL data.train.fingerprint" in out.stdout and "NOT REPRODUCED" in out.stdout
    assert "ok   data.test.fingerprint" in out.stdout


def test_snakemake_parse_still_imports_nothing_heavy():
    # The manifest's parameters (git, package versions) are computed at parse time: keep them light.
    code = (
        "import sys, time; t = time.time();"
        f"sys.path.append({str(REPO / 'scripts')!r});"
        "from kiln.provenance import code_version, package_versions;"
        f"code_version({str(REPO)!r}); package_versions();"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules; print(time.time() - t)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 3
    assert SNAKEMAKE  # the same interpreter runs the workflow


def test_tree_hashes_leave_out_snakemakes_timestamp_marker(tmp_path):
    from kiln.manifest import tree_hashes

    (tmp_path / "model.safetensors").write_bytes(b"w")
    (tmp_path / ".snakemake_timestamp").write_bytes(b"")
    assert list(tree_hashes(tmp_path)) == ["model.safetensors"]


def test_kiln_output_into_a_closed_pipe_ends_quietly():
    """`kiln trace ID --json | head`: when the reader stops early, no BrokenPipe traceback."""
    script = (
        "import sys\n"
        "from kiln import cli\n"
        "def noisy(argv):\n"
        "    for i in range(200000):\n"
        "        print('row', i, 'x' * 60)\n"
        "    return 0\n"
        "cli.COMMANDS['trace'] = noisy\n"
        "sys.exit(cli.main(['trace', 'abc']))\n"
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            f"import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', {script!r}], "
            "stdout=subprocess.PIPE, stderr=subprocess.PIPE); p.stdout.read(10); p.stdout.close(); "
            "err = p.stderr.read().decode(); sys.exit(3 if 'Traceback' in err else p.wait())",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO / "scripts")},
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("ok, kept", [(True, False), (False, True)])
def test_repro_removes_its_temporary_rebuild_when_it_passes(tmp_path, monkeypatch, capsys, ok, kept):
    import kiln.repro
    from kiln.cli import main

    made = []

    def fake(manifest, workdir, train=True, cores=2):
        (Path(workdir) / "results").mkdir()
        made.append(Path(workdir))
        failed = [] if ok else [kiln.repro.Check("data.train.fingerprint", "a", "b", False)]
        return kiln.repro.ReproResult(experiment="e", workdir=str(workdir), checks=failed)

    monkeypatch.setattr(kiln.repro, "reproduce", fake)
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "manifest.json").write_text("{}")
    code = main(["repro", "e", "--results", str(tmp_path)])
    assert code == (0 if ok else 1) and made[0].exists() == kept
    assert ("removed: every check passed" in capsys.readouterr().out) == ok
