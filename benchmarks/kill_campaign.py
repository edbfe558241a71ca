"""The kill campaign of tests/test_kills.py, run on its own and kept: the figures README quotes.

    python benchmarks/kill_campaign.py --seed 12 --out benchmarks/results/kill_campaign.json

SIGKILL of the tiny pipeline's whole process group at seeded random moments in every stage, each
followed by the plain rerun (tests/killcampaign.py says how); then every output of the last rerun
compared by content hash with an uninterrupted run's. Run it alone: the kill moments are fractions
of each stage's duration in the reference run, measured in the same call.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO / "benchmarks")]

from conftest import Workflow, tiny_config  # noqa: E402
from data_stages import machine  # noqa: E402
from killcampaign import campaign  # noqa: E402
from test_kills import AFTER_CHECKPOINT, EXTRA  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--out", default="benchmarks/results/kill_campaign.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        wf = Workflow(Path(tmp) / "run", tiny_config())
        summary = campaign(wf.command(), wf.workdir, args.seed, EXTRA, AFTER_CHECKPOINT)
    summary["machine"] = machine()
    Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"{summary['kills']} kills over {len(summary['stages_hit'])} stages, {summary['runs']} runs, "
        f"completed: {summary['completed']}, identical {summary['identical']}/{summary['checked']} files "
        f"({summary['exempt']} exempt), different: {summary['different'] + summary['missing'] + summary['extra']}"
    )


if __name__ == "__main__":
    main()
