"""The tiny pipeline through a real SLURM cluster (`.ci/slurm.sh up` starts a one-node one here).

Checks with SLURM's own job-completion record that every non-local job ran as a SLURM job, and that
a job failing on the cluster is retried per the profile and reported with its SLURM log path.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml
from conftest import REPO, SNAKEMAKE, tiny_config


def _cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mixed", "allocated"))


@pytest.fixture(scope="module")
def cluster():
    if not _cluster_up():
        message = "needs a running SLURM cluster: bash .ci/slurm.sh up (CI does it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    conf = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    match = re.search(r"JobCompLoc\s*=\s*(\S+)", conf)
    assert match and "filetxt" in conf, "the test cluster records completed jobs (JobCompType=jobcomp/filetxt)"
    return match.group(1)


def _jobcomp_size(jobcomp: str) -> int:
    return os.path.getsize(jobcomp) if os.path.exists(jobcomp) else 0


def _completed_jobs(jobcomp: str, workdir, since: int) -> list[dict]:
    """SLURM's job-completion records, written after byte ``since``, of jobs that ran in ``workdir``.

    The record outlives the test session (a CI machine can be reused, and pytest can hand out the
    same temporary path again once older ones are cleaned up), so only this run's lines count.
    """
    jobs = []
    with open(jobcomp) as f:
        f.seek(since)
        lines = f.read().splitlines()
    for line in lines:
        fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
        if fields.get("WorkDir") == str(workdir):
            jobs.append(fields)
    return jobs


def _run(workdir, config: dict, *extra: str) -> subprocess.CompletedProcess:
    (workdir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    cmd = [
        *SNAKEMAKE,
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(workdir / "config.yaml"),
        "--profile",
        str(REPO / "profiles" / "slurm"),
        *extra,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, timeout=1200)


def test_tiny_pipeline_runs_as_slurm_jobs(cluster, tmp_path):
    since = _jobcomp_size(cluster)
    proc = _run(tmp_path, tiny_config())
    assert proc.returncode == 0, proc.stderr[-6000:]
    submitted = re.findall(r"submitted with SLURM jobid (\d+) \(log: ([^)]+)\)", proc.stdout + proc.stderr)
    # Every rule but the local ones (all, compare, publish, data_report, ollama_modelfile) went to SLURM.
    remote = {"collect", "clean", "build_dataset", "tokenize", "base_model", "train", "merge", "evaluate", "manifest"}
    remote |= {"export_gguf"}
    assert len(submitted) == len(remote)
    assert {re.search(r"rule_([a-z_]+)/", log).group(1) for _, log in submitted} == remote
    records = {r["JobId"]: r for r in _completed_jobs(cluster, tmp_path, since)}
    for job_id, log in submitted:
        assert records[job_id]["JobState"] == "COMPLETED", records[job_id]
        assert os.path.exists(log)
    train = next(records[j] for j, log in submitted if "rule_train/" in log)
    # The rule's memory and the profile's CPUs reached sbatch.
    assert "mem=16000M" in train["Tres"] and "cpu=2" in train["Tres"], train["Tres"]
    assert (tmp_path / "results" / "tiny" / "metrics.json").exists()


def test_a_failing_job_is_retried_and_reported_with_its_slurm_log(cluster, tmp_path):
    cfg = tiny_config()
    # A download from a closed local port: fails when the job runs on the node, not at parse time.
    cfg["datasets"]["orders"]["sources"] = [
        {"name": "web", "kind": "url", "urls": ["http://127.0.0.1:9/x.jsonl"], "sha256": ["0" * 64]}
    ]
    since = _jobcomp_size(cluster)
    proc = _run(tmp_path, cfg, "results/data/orders/dataset_stats.json")
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    failed = [r for r in _completed_jobs(cluster, tmp_path, since) if r["JobState"] == "FAILED"]
    assert len(failed) == 2  # the first try and the one retry of the profile (retries: 1)
    assert re.search(r"\.snakemake/slurm_logs/rule_collect/\S+\.log", out), out[-3000:]
    assert "127.0.0.1:9" in out or any("127.0.0.1:9" in p.read_text() for p in tmp_path.rglob("*.log"))
