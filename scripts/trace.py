"""Trace one dataset row back to its raw record: python scripts/trace.py ID [--dataset D] [--json].

ID is a row's ``kiln_id`` (or a unique prefix of one), as found in any Kiln output: the dataset,
the rejected shards, samples.jsonl. Prints every raw occurrence of that content (source, file,
row, original text), what cleaning changed or why it rejected the row, and the split it is in.
"""

import sys

# This folder also holds rule entry points named like stdlib modules (tokenize.py): look here last.
_here = sys.path.pop(0)
sys.path.append(_here)

import argparse  # noqa: E402
import json  # noqa: E402

import yaml  # noqa: E402

from kiln.lineage import TraceError, format_trace, trace  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("id", help="kiln_id of the row, or a unique prefix of one")
    ap.add_argument("--dataset", help="dataset name (default: the only one, or the first, in the config)")
    ap.add_argument("--results", help="results folder (default: `results` of the config)")
    ap.add_argument("--config", default="config/config.yaml", help="the Kiln config the workflow ran with")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = ap.parse_args(argv)
    cfg = {}
    try:
        with open(args.config) as f:
            cfg = yaml.safe_load(f) or {}
    except OSError:
        if not (args.dataset and args.results):
            print(f"trace: cannot read {args.config}; pass --dataset and --results", file=sys.stderr)
            return 2
    dataset = args.dataset or next(iter(cfg.get("datasets") or {}), None)
    results = args.results or cfg.get("results", "results")
    try:
        result = trace(results, dataset, args.id)
    except TraceError as exc:
        print(f"trace: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2, ensure_ascii=False) if args.json else format_trace(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
