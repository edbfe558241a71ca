"""Reproducibility check: python scripts/repro.py EXPERIMENT [--workdir DIR] [--data-only].

Rebuilds the experiment from its manifest (results/EXPERIMENT/manifest.json) in an empty folder:
the data stages must give the manifest's split fingerprints exactly and the base model its weight
hashes; then it retrains on this machine with the same seed and compares the test metrics within
the tolerances printed. Exit status 0 when everything reproduced, 1 when something did not.
"""

import sys

# This folder also holds rule entry points named like stdlib modules (tokenize.py): look here last.
_here = sys.path.pop(0)
sys.path.append(_here)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402

from kiln.repro import format_report, reproduce  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("experiment")
    ap.add_argument("--results", default="results", help="where the original run's outputs are")
    ap.add_argument("--manifest", help="manifest to check against (default: RESULTS/EXPERIMENT/manifest.json)")
    ap.add_argument("--workdir", help="empty folder to rebuild in (default: a new temporary folder)")
    ap.add_argument("--data-only", action="store_true", help="check data and base model only, no retraining")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    manifest = args.manifest or os.path.join(args.results, args.experiment, "manifest.json")
    if not os.path.exists(manifest):
        print(f"repro: {manifest} does not exist: build the experiment first", file=sys.stderr)
        return 2
    workdir = args.workdir or tempfile.mkdtemp(prefix=f"kiln-repro-{args.experiment}-")
    result = reproduce(manifest, workdir, train=not args.data_only, cores=args.cores)
    print(json.dumps(result, indent=2) if args.json else format_report(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
