"""The shipped examples (config/examples/) run with README's command, each in a fresh folder laid out
like a clone's root; their base vs tuned scores and job times kept for README.

    python benchmarks/examples.py --out benchmarks/results/examples.json

Run it alone (2 cores: any other process slows training and shifts the times, not the scores).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "scripts")]

from data_stages import machine  # noqa: E402

EXAMPLES = ("stdlib-modules", "stdlib-summaries")


def run_example(name: str, folder: Path) -> dict:
    (folder / "config").symlink_to(REPO / "config")
    cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "1"]
    cmd += ["--configfile", f"config/examples/{name}.yaml"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
    results = folder / "results"
    metrics = json.loads((results / name / "metrics.json").read_text())
    main = metrics["main_metric"]
    jobs = {}
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):  # benchmarks/<rule>/...: seconds per rule
        rule = tsv.relative_to(results / "benchmarks").parts[0]
        with open(tsv) as fh:
            jobs[rule] = jobs.get(rule, 0.0) + float(next(csv.DictReader(fh, delimiter="\t"))["s"])
    stats = json.loads((results / "data" / name / "dataset_stats.json").read_text())
    return {
        "command": f"snakemake --cores 1 --configfile config/examples/{name}.yaml",
        "task": metrics["task"],
        "main_metric": main,
        "test_rows_scored": metrics["generated_rows"],
        "splits": {k: v["rows"] for k, v in stats["splits"].items()},
        "rejected_by_reason": stats["rejected_by_reason"],
        "scores": {
            model: {k: metrics[model][k] for k in [*metrics["task_metrics"], "loss"]}
            for model in ("base", "tuned", "adapter_4bit")
        },
        "tuned_minus_base": metrics["tuned"][main] - metrics["base"][main],
        "job_seconds": {k: round(v, 1) for k, v in jobs.items()},
        "wall_seconds": round(wall, 1),
    }


def readme_table(result: dict) -> str:
    """The README's table of the examples, rendered from the results file (a test holds README to it)."""
    from kiln.metrics import label

    lines = [
        f"Measured on the {result['machine']['cores']}-core CPU by `benchmarks/examples.py` "
        f"(`benchmarks/results/examples.json`, {result['date']}):",
        "",
        "| example | task (main metric) | test rows | base | tuned (merged) | adapter on 4-bit base "
        "| other metric, base -> tuned | wall time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, ex in result["examples"].items():
        main, scores = ex["main_metric"], ex["scores"]
        other = next(k for k in scores["tuned"] if k not in (main, "loss", "exact_match"))
        digits = 2 if main == "chrf" else 3
        lines.append(
            f"| `{name}` | {ex['task']} ({label(main)}) | {ex['test_rows_scored']} "
            + "".join(f"| {scores[m][main]:.{digits}f} " for m in ("base", "tuned", "adapter_4bit"))
            + f"| {label(other)} {scores['base'][other]:.3f} -> {scores['tuned'][other]:.3f} "
            f"| {ex['wall_seconds'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/examples.json")
    args = ap.parse_args()
    out = {"date": datetime.date.today().isoformat(), "machine": machine(), "examples": {}}
    for name in EXAMPLES:
        with tempfile.TemporaryDirectory() as tmp:
            out["examples"][name] = run_example(name, Path(tmp))
            print(name, json.dumps(out["examples"][name]["scores"]["tuned"]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(readme_table(out))


if __name__ == "__main__":
    main()
