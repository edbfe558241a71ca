"""A full disk: the stage that cannot write says so on the console, naming the path, and nothing
half-written is taken as complete (the same command, after freeing space, finishes the run)."""

from __future__ import annotations

import json
import subprocess

import pytest
from conftest import Workflow, tiny_config
from safetensors.torch import load_file


@pytest.fixture
def small_disk(tmp_path):
    """results/ on a 4 MB tmpfs: the data stages fit, the tiny base model's 13 MB of weights do not."""
    results = tmp_path / "results"
    results.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(results)], capture_output=True)
    assert mounted.returncode == 0, f"this test mounts a tmpfs (root): {mounted.stderr.decode()}"
    try:
        yield results
    finally:
        subprocess.run(["umount", "-l", str(results)], check=False)


def test_a_full_disk_is_named_on_the_console_and_the_rerun_finishes(tmp_path, small_disk):
    wf = Workflow(tmp_path, tiny_config())
    target = "results/tiny/train_summary.json"
    full = wf.run(target, check=False)
    text = full.stdout + full.stderr
    assert full.returncode != 0
    line = next((ln for ln in text.splitlines() if ln.startswith("Kiln: rule base_model could not write")), None)
    assert line and "the disk is full (No space left on device)" in line and "results/base/tiny" in line, text[-3000:]
    assert not (small_disk / "base" / "tiny" / "model.safetensors").exists()  # removed, not left half-written

    # More space, the same command: it finishes, and the base model it writes is whole.
    subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], check=True)
    wf.run(target)
    weights = load_file(small_disk / "base" / "tiny" / "model.safetensors")
    identity = json.loads((small_disk / "base" / "tiny" / "identity.json").read_text())
    assert weights and identity["weights"]
    assert json.loads((small_disk / "tiny" / "train_summary.json").read_text())["steps"] == 4


def test_a_library_error_is_shown_with_its_type_and_kilns_as_they_are():
    import json

    from kiln.smk import failure_line
    from kiln.sources import file_encoding

    try:
        json.loads("{")
    except ValueError as exc:
        line = failure_line(exc, "clean", "results/logs/clean/x.log")
    assert line.startswith("Kiln: rule clean failed: JSONDecodeError: Expecting property name")
    assert line.endswith("(details: results/logs/clean/x.log)")
    try:
        file_encoding("x.jsonl", "no-such-codec")
    except Exception as exc:  # noqa: BLE001 (the type is what is checked)
        line = failure_line(exc, "collect", None)
    assert line == (
        "Kiln: rule collect failed: x.jsonl: unknown encoding 'no-such-codec' (set `encoding:` to a Python codec name)"
    )
