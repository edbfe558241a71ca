"""A killed run's lock goes away on the next plain run; a live run's lock is never touched."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from conftest import tiny_config

from kiln.locks import live_snakemake, release_stale_lock

COLLECT = "results/data/orders/raw/synthetic/synthetic.parquet"


def _start(wf):
    """The whole tiny workflow in the background, in its own process group."""
    return subprocess.Popen(
        wf.command(cores=1),
        cwd=wf.workdir,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _wait_for_lock(wf, proc, timeout=120) -> None:
    locks = wf.workdir / ".snakemake" / "locks"
    deadline = time.time() + timeout
    while time.time() < deadline and not list(locks.glob("*.lock")):
        assert proc.poll() is None, "the run ended before it took its lock"
        time.sleep(0.2)
    assert list(locks.glob("*.lock")), "no lock appeared"


def test_a_killed_run_is_unlocked_by_the_next_plain_run(workflow_factory):
    wf = workflow_factory(tiny_config())
    proc = _start(wf)
    _wait_for_lock(wf, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert list((wf.workdir / ".snakemake" / "locks").glob("*.lock"))  # what a kill leaves
    out = wf.run(COLLECT)  # no --unlock first
    assert "Kiln: removed a stale lock left by a run that was killed" in out.stdout + out.stderr
    assert (wf.workdir / COLLECT).exists()


def test_a_running_workflow_keeps_its_lock(workflow_factory):
    wf = workflow_factory(tiny_config())
    proc = _start(wf)
    try:
        _wait_for_lock(wf, proc)
        assert proc.pid in live_snakemake(wf.workdir, exclude=set())
        second = wf.run("results/tiny/metrics.json", check=False)
        text = second.stdout + second.stderr
        assert second.returncode != 0
        assert "belongs to a running Snakemake" in text and str(proc.pid) in text
        assert list((wf.workdir / ".snakemake" / "locks").glob("*.lock"))  # untouched
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_process_called_snakemake_in_another_folder_does_not_count(tmp_path):
    here, there = tmp_path / "here", tmp_path / "there"
    for d in (here, there):
        (d / ".snakemake" / "locks").mkdir(parents=True)
    fake = tmp_path / "snakemake"
    fake.write_text("#!/bin/sh\nsleep 30\n")
    fake.chmod(0o755)
    proc = subprocess.Popen([str(fake)], cwd=there)
    try:
        time.sleep(0.3)
        assert live_snakemake(there) == [proc.pid] and live_snakemake(here) == []
        (there / ".snakemake" / "locks" / "0.output.lock").write_text("x")
        assert "belongs to a running Snakemake" in release_stale_lock(there)
        assert (there / ".snakemake" / "locks" / "0.output.lock").exists()
        (here / ".snakemake" / "locks" / "0.output.lock").write_text("x")
        assert "removed a stale lock" in release_stale_lock(here)
        assert not list((here / ".snakemake" / "locks").glob("*.lock"))
        assert release_stale_lock(here) is None  # nothing left to do: says nothing
    finally:
        proc.kill()
        proc.wait()
