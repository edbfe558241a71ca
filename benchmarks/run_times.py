"""How long the default run and the test suite take: the one place README's time figures come from.

    python benchmarks/run_times.py --out benchmarks/results/run_times.json          # make run
    python benchmarks/run_times.py --ci --out benchmarks/results/run_times.json     # and .ci/run

Clones this repository's HEAD into a fresh folder and does what a new user does: ``make install``
(timed), ``make run`` (timed; the install is already done), then reads each job's time and peak
memory from the Snakemake ``benchmark:`` files the run wrote. With ``--ci``, ``CI=true .ci/run`` in
a second fresh clone (system packages, the SLURM node, ``make install``, ``make test``), timed, with
pytest's counts and every skipped test's reason. Run it alone: two cores, and any other process
changes every figure.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks")]

from data_stages import machine  # noqa: E402


def job_times(results: Path) -> dict[str, dict]:
    """Rule -> {seconds, max_rss_mb, jobs} summed over its jobs' benchmark files."""
    out: dict[str, dict] = {}
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        rule = tsv.relative_to(results / "benchmarks").parts[0]
        with open(tsv) as fh:
            row = next(csv.DictReader(fh, delimiter="\t"))
        entry = out.setdefault(rule, {"seconds": 0.0, "max_rss_mb": 0.0, "jobs": 0})
        entry["seconds"] = round(entry["seconds"] + float(row["s"]), 1)
        rss = float(row["max_rss"]) if row["max_rss"] not in ("", "NA", "-") else 0.0
        entry["max_rss_mb"] = max(entry["max_rss_mb"], round(rss, 1))
        entry["jobs"] += 1
    return out


def timed(cmd: list[str], cwd: Path, log: Path) -> tuple[float, int]:
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    t0 = time.monotonic()
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, env=env | {"CI": "true"}).returncode
    return round(time.monotonic() - t0, 1), rc


def clone(dest: Path) -> str:
    subprocess.run(["git", "clone", "-q", str(REPO), str(dest)], check=True)
    return subprocess.run(["git", "-C", str(dest), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def pytest_summary(text: str) -> dict:
    """Counts from pytest's last line and the reason of every skipped test (-ra)."""
    final = [ln for ln in text.splitlines() if re.match(r"^=+ .*(passed|failed|error).* in [\d.]+s", ln)]
    found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", final[-1]) if final else []
    counts = {k: int(n) for n, k in found}
    secs = re.search(r" in ([\d.]+)s", final[-1]) if final else None
    skipped = re.findall(r"^SKIPPED \[\d+\] (.*)$", text, flags=re.M)
    return {"counts": counts, "pytest_seconds": float(secs.group(1)) if secs else None, "skipped": skipped}


DATA_STAGES = ("collect", "clean", "build_dataset", "tokenize")


def readme_sentences(record: dict) -> list[str]:
    """The sentences README quotes from a record, exactly (tests/test_readme.py holds README to them)."""
    run = record["make_run"]
    jobs = run["jobs"]

    def secs(rule: str) -> float:
        return jobs.get(rule, {}).get("seconds", 0.0)

    data = sum(secs(r) for r in DATA_STAGES)
    out = [
        f"`make install` {run['install_seconds'] / 60:.1f} min, then `make run` "
        f"{run['pipeline_seconds'] / 60:.1f} min, "
        f"of which the jobs {run['jobs_seconds'] / 60:.1f} min (base model {secs('base_model'):.0f} s, data stages "
        f"{data:.0f} s, training {run['steps']} steps {secs('train') / 60:.1f} min, merge {secs('merge'):.0f} s, "
        f"GGUF export {secs('export_gguf'):.0f} s, evaluation {secs('evaluate') / 60:.1f} min); peak memory "
        f"{run['peak_rss_mb'] / 1024:.1f} GB RSS ({record['date']}, commit {record['commit'][:7]})",
    ]
    ci = record.get("ci")
    if ci:
        counts = ci["counts"]
        out.append(
            f"`.ci/run` on a fresh clone: {ci['wall_seconds'] / 60:.0f} min in all, pytest "
            f"{ci['pytest_seconds'] / 60:.0f} min, {counts.get('passed', 0)} passed, "
            f"{counts.get('failed', 0)} failed, {counts.get('skipped', 0)} skipped ({record['date']})"
        )
    return out


MODEL_LABELS = {
    "base": "base (SmolLM2-135M-Instruct)",
    "tuned": "tuned (merged, published)",
    "adapter_4bit": "adapter on the 4-bit base",
    "gguf_q8_0": "the q8_0 GGUF, in llama.cpp",
}


def metrics_rows(record: dict) -> list[str]:
    """README's "What you get" table rows, from the run's metrics (GGUF: no loss, generation only)."""
    rows = []
    for key, name in MODEL_LABELS.items():
        m = record["metrics"].get(key)
        if not m:
            continue
        loss = f"{m['loss']:.4f} | {m['perplexity']:.3f}" if "loss" in m else "- | -"
        rows.append(
            f"| {name} | {m['exact_match']:.3f} | {m['valid_json']:.3f} | {m['mean_field_accuracy']:.3f} | {loss} |"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/run_times.json")
    ap.add_argument("--ci", action="store_true", help="also time CI=true .ci/run in a fresh clone")
    ap.add_argument("--ci-only", action="store_true", help="time only .ci/run; keep --out's make run figures")
    ap.add_argument("--keep", action="store_true", help="keep the clones (their logs and results)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kiln-run-times-"))
    if args.ci_only:
        record = json.loads(Path(args.out).read_text())
        ci = work / "ci"
        record["ci_commit"] = clone(ci)
        ci_s, rc = timed(["bash", ".ci/run"], ci, work / "ci.log")
        record["ci"] = {"wall_seconds": ci_s, "rc": rc, "date": time.strftime("%Y-%m-%d")}
        record["ci"] |= pytest_summary((work / "ci.log").read_text())
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
        print("\n".join(readme_sentences(record)), f"\nlog: {work / 'ci.log'}")
        return
    record: dict = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    first = work / "run"
    record["commit"] = clone(first)
    install_s, rc = timed(["make", "install"], first, work / "install.log")
    assert rc == 0, f"make install failed: see {work / 'install.log'}"
    run_s, rc = timed(["make", "run"], first, work / "run.log")
    assert rc == 0, f"make run failed: see {work / 'run.log'}"
    jobs = job_times(first / "results")
    record["make_run"] = {
        "install_seconds": install_s,
        "pipeline_seconds": run_s,
        "wall_seconds": round(install_s + run_s, 1),
        "jobs_seconds": round(sum(j["seconds"] for j in jobs.values()), 1),
        "peak_rss_mb": max(j["max_rss_mb"] for j in jobs.values()),
        "jobs": jobs,
        "steps": json.loads((first / "results/default/train_summary.json").read_text()).get("steps"),
    }
    # What the run scored (README's "What you get" table): every model block's numbers.
    metrics = json.loads((first / "results/default/metrics.json").read_text())
    record["metrics"] = {
        k: {m: v for m, v in metrics[k].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for k in metrics
        if k in ("base", "tuned", "adapter_4bit") or k.startswith("gguf_")
    }
    if args.ci:
        ci = work / "ci"
        clone(ci)
        ci_s, rc = timed(["bash", ".ci/run"], ci, work / "ci.log")
        record["ci"] = {"wall_seconds": ci_s, "rc": rc, **pytest_summary((work / "ci.log").read_text())}
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record, indent=1))
    print("\n".join(readme_sentences(record) + metrics_rows(record)))
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    else:
        print(f"kept: {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
