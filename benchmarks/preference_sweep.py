"""The sweep that chose the shipped DPO example's settings (issue 27): the example's experiment at a
few (learning rate, sft_weight, beta) settings in one workflow beside the default SFT experiment, each
scored as the example is (held-out preference accuracy base -> SFT -> DPO, the task's exact match SFT
-> DPO on the same test rows). Kept so the choice can be checked and repeated.

    python benchmarks/preference_sweep.py --folder DIR [--collect] [--out benchmarks/results/preference_sweep.json]

--folder: where to run (a default run's folder is reused: its SFT model is the one every setting
continues); --collect: only read the results of an earlier run there. No GGUF export (the settings
are compared on the merged model; the chosen one is measured with its export by preference.py).
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "scripts")]

from data_stages import machine  # noqa: E402

EXAMPLE = REPO / "config" / "examples" / "orders-dpo.yaml"
# (name, learning_rate, sft_weight, beta); plain DPO at lr 1e-4 is the record in preference_cpu.json's history
SETTINGS = [
    ("s-lr2e5-w1", 2e-5, 1.0, 0.1),
    ("s-lr2e5-w2", 2e-5, 2.0, 0.1),
    ("s-lr1e5-w1", 1e-5, 1.0, 0.1),
    ("s-lr5e5-w2-b05", 5e-5, 2.0, 0.5),
]


def sweep_config() -> dict:
    """The example's config with its DPO experiment once per setting (and no GGUF export)."""
    cfg = yaml.safe_load(EXAMPLE.read_text())
    example = cfg["experiments"].pop("orders-dpo")
    for name, lr, weight, beta in SETTINGS:
        exp = yaml.safe_load(yaml.safe_dump(example))
        exp["training"].update(learning_rate=lr, sft_weight=weight, beta=beta)
        exp["export"] = {"gguf": []}
        cfg["experiments"][name] = exp
    return cfg


def collect(results: Path) -> list[dict]:
    rows = []
    for name, lr, weight, beta in SETTINGS:
        path = results / name / "metrics.json"
        if not path.exists():
            rows.append({"name": name, "missing": str(path)})
            continue
        m = json.loads(path.read_text())
        pref, main = m["preference"], m["main_metric"]
        rows.append(
            {
                "name": name,
                "learning_rate": lr,
                "sft_weight": weight,
                "beta": beta,
                "pairs": pref["pairs"],
                "preference_accuracy": {k: pref[k]["preference_accuracy"] for k in ("base", "sft", "tuned")},
                "reward_margin": pref["tuned"]["mean_reward_margin"],
                "task_rows": m["generated_rows"],
                main: {"sft": m["sft"][main], "dpo": m["tuned"][main]},
                "gain_over_sft": pref["tuned"]["preference_accuracy"] - pref["sft"]["preference_accuracy"],
                "task_change": m["tuned"][main] - m["sft"][main],
            }
        )
    return rows


def table(result: dict) -> str:
    """docs/preference.md's sweep table, rendered from the results file (a test holds the page to it)."""
    lines = [
        "| learning rate | sft_weight | beta | preference accuracy, SFT -> DPO | exact match, SFT -> DPO |",
        "|---|---|---|---|---|",
    ]
    t = yaml.safe_load(EXAMPLE.read_text())["experiments"]["orders-dpo"]["training"]
    shipped = (t["learning_rate"], t.get("sft_weight", 0.0), t["beta"])
    for r in result["settings"]:
        mark = " (shipped)" if (r["learning_rate"], r["sft_weight"], r["beta"]) == shipped else ""
        acc, em = r["preference_accuracy"], r["exact_match"]
        lines.append(
            f"| {r['learning_rate']:g}{mark} | {r['sft_weight']:g} | {r['beta']:g} | {acc['sft']:.3f} -> "
            f"{acc['tuned']:.3f} | {em['sft']:.3f} -> {em['dpo']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--folder", required=True)
    ap.add_argument("--collect", action="store_true", help="only read an earlier run's results")
    ap.add_argument("--out", default="benchmarks/results/preference_sweep.json")
    ap.add_argument("--note", default="", help="what the record should say about this run (kept in it)")
    args = ap.parse_args()
    folder = Path(args.folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if not args.collect:
        if not (folder / "config").exists():
            (folder / "config").symlink_to(REPO / "config")
        (folder / "sweep.yaml").write_text(yaml.safe_dump(sweep_config(), sort_keys=False))
        targets = [f"results/{name}/metrics.json" for name, *_ in SETTINGS]
        cmd = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--cores", "1"]
        subprocess.run([*cmd, "--configfile", "sweep.yaml", *targets], cwd=folder, check=True)
    rows = collect(folder / "results")
    out = {"date": datetime.date.today().isoformat(), "machine": machine(), "note": args.note, "settings": rows}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(table(out))


if __name__ == "__main__":
    main()
