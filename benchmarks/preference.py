"""The preference example (config/examples/orders-dpo.yaml) run with README's command; its held-out
preference accuracy base -> SFT -> DPO, the task's exact match SFT -> DPO and the times kept for
README (issue 27).

    python benchmarks/preference.py --out benchmarks/results/preference_cpu.json [--folder DIR]

--folder: run where a default run already is (its SFT experiment is reused, as README says);
without it, a fresh folder laid out like a clone's root (the SFT experiment is trained first).
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

EXAMPLE, SFT = "orders-dpo", "default"
COMMAND = f"snakemake --cores 1 --configfile config/examples/{EXAMPLE}.yaml"


def example_training() -> dict:
    """The example's training section as shipped (config/examples/orders-dpo.yaml)."""
    import yaml

    return yaml.safe_load((REPO / "config" / "examples" / f"{EXAMPLE}.yaml").read_text())["experiments"][EXAMPLE][
        "training"
    ]


def job_seconds(results: Path, experiment: str) -> dict[str, float]:
    """Seconds of each rule's job for one experiment (Snakemake's benchmark files)."""
    jobs = {}
    for tsv in sorted((results / "benchmarks").rglob("*.tsv")):
        rule, name = tsv.relative_to(results / "benchmarks").parts[0], tsv.stem
        if name == experiment or name.startswith(f"{experiment}-"):
            with open(tsv) as fh:
                jobs[rule] = round(jobs.get(rule, 0.0) + float(next(csv.DictReader(fh, delimiter="\t"))["s"]), 1)
    return jobs


def collect(results: Path, wall: float, reused_sft: bool) -> dict:
    metrics = json.loads((results / EXAMPLE / "metrics.json").read_text())
    summary = json.loads((results / EXAMPLE / "train_summary.json").read_text())
    stats = json.loads((results / "data" / "order-pairs" / "dataset_stats.json").read_text())
    pref, main = metrics["preference"], metrics["main_metric"]
    return {
        "command": COMMAND,
        "sft_experiment_reused": reused_sft,
        "pairs": {k: v["rows"] for k, v in stats["splits"].items()},
        "rejected_by_reason": stats["rejected_by_reason"],
        "preference": {k: pref[k] for k in ("pairs", "base", "sft", "tuned", "delta_tuned_minus_sft") if k in pref},
        "task": {
            "main_metric": main,
            "test_rows": metrics["generated_rows"],
            "same_rows": metrics["sft"]["same_rows"],
            "base": metrics["base"][main],
            "sft": metrics["sft"][main],
            "dpo": metrics["tuned"][main],
            "dpo_adapter_4bit": metrics["adapter_4bit"][main],
            "dpo_minus_sft": metrics["tuned"][main] - metrics["sft"][main],
            "gguf": {k: metrics[k][main] for k in metrics if k.startswith("gguf_")},
        },
        "training": {
            k: summary[k]
            for k in ("steps", "effective_batch", "tokens_trained", "wall_time_s", "first_loss", "final_loss")
        }
        | {
            "settings": {k: summary["preference"][k] for k in ("beta", "loss_type", "sft_weight")}
            | {"learning_rate": example_training()["learning_rate"], "max_steps": example_training()["max_steps"]}
        },
        "job_seconds": job_seconds(results, EXAMPLE),
        "wall_seconds": round(wall, 1),
    }


def readme_rows(result: dict) -> str:
    """README's preference table, rendered from the results file (a test holds README to it)."""
    r, p, t = result["run"], result["run"]["preference"], result["run"]["task"]
    acc = " -> ".join(f"{p[m]['preference_accuracy']:.3f}" for m in ("base", "sft", "tuned"))
    margin = " -> ".join(f"{p[m]['mean_logp_margin']:.2f}" for m in ("base", "sft", "tuned"))
    em = f"{t['sft']:.3f} -> {t['dpo']:.3f}"
    return "\n".join(
        [
            f"Measured on the {result['machine']['cores']}-core CPU by `benchmarks/preference.py` "
            f"(`benchmarks/results/preference_cpu.json`, {result['date']}):",
            "",
            "| held-out pairs | preference accuracy, base -> SFT -> DPO | log-prob margin (nats) | "
            "DPO reward margin | exact match, SFT -> DPO (test rows) | DPO train | the DPO experiment's jobs |",
            "|---|---|---|---|---|---|---|",
            f"| {p['pairs']} | {acc} | {margin} | {p['tuned']['mean_reward_margin']:.2f} | {em} ({t['test_rows']}) "
            f"| {r['job_seconds']['train'] / 60:.1f} min | {sum(r['job_seconds'].values()) / 60:.1f} min |",
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/preference_cpu.json")
    ap.add_argument("--folder", default="", help="run here (a default run's folder: its SFT model is reused)")
    ap.add_argument("--note", default="", help="what the record should say about this run (kept in it)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.folder).resolve() if args.folder else Path(tmp)
        if not (folder / "config").exists():
            (folder / "config").symlink_to(REPO / "config")
        reused = (folder / "results" / SFT / "metrics.json").exists()
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *COMMAND.split()[1:]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode:
            raise SystemExit(f"{EXAMPLE} failed:\n{proc.stderr[-4000:]}")
        out = {"date": datetime.date.today().isoformat(), "machine": machine(), "note": args.note}
        out["run"] = collect(folder / "results", wall, reused)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(readme_rows(out))


if __name__ == "__main__":
    main()
