"""Two default runs, before and after a refactor, compared file by file (issue 25: "behaviour does
not change: the default run's adapter, merged weights, GGUF and metrics are byte-identical").

    python benchmarks/byte_identical.py BEFORE/results AFTER/results --before-commit X --after-commit Y

Each tree comes from `snakemake --cores 1` on the embedded default config at one commit (run each
from its own checkout, with PYTHONPATH=<checkout>/scripts so it imports its own kiln). The named
artifacts (adapter, merged model, GGUF files) must be equal byte for byte; metrics.json equal less
its measured timings (eval_seconds, tokens/s); then every other file under results/ is compared the
way the kill campaign compares (tests/killcampaign.py: logs, timings and pages that render timings
exempt, JSON less its timing keys), and the files that record the code version are listed apart.
Writes the record to benchmarks/results/byte_identical.json (or --out)."""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from killcampaign import _comparable, compare, content_hashes  # noqa: E402

EXPERIMENT = "default"
RAW = ("adapter", "merged", "gguf")  # compared byte for byte, every file
# Files that name the commit they were made at (the code version is what changed, by design).
CODE_VERSION = ("manifest.json", "model/manifest.json", "model/README.md", "compare", "report")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def raw_artifacts(before: Path, after: Path) -> dict:
    out = {}
    for part in RAW:
        a, b = before / EXPERIMENT / part, after / EXPERIMENT / part
        names = sorted({p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()})
        names += sorted({p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()} - set(names))
        names = [n for n in names if not n.endswith(".snakemake_timestamp")]
        different = [n for n in names if not (a / n).exists() or not (b / n).exists() or sha256(a / n) != sha256(b / n)]
        out[part] = {"files": len(names), "identical": len(names) - len(different), "different": different}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--before-commit", required=True)
    ap.add_argument("--after-commit", required=True)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "byte_identical.json")
    args = ap.parse_args()
    raw = raw_artifacts(args.before, args.after)
    metrics = [args.before / EXPERIMENT / "metrics.json", args.after / EXPERIMENT / "metrics.json"]
    same_metrics = _comparable(metrics[0], metrics[0].read_bytes()) == _comparable(metrics[1], metrics[1].read_bytes())
    tree = compare(content_hashes(args.before), content_hashes(args.after))
    code_version = [
        r for r in tree["different"] if any(r.startswith(f"{EXPERIMENT}/{c}") or r.startswith(c) for c in CODE_VERSION)
    ]
    record = {
        "date": dt.date.today().isoformat(),
        "before_commit": args.before_commit,
        "after_commit": args.after_commit,
        "raw_artifacts": raw,
        "metrics_identical_less_timings": same_metrics,
        "tree": {
            **tree,
            "different_code_version": code_version,
            "different_other": sorted(set(tree["different"]) - set(code_version)),
        },
    }
    record["ok"] = bool(
        all(not r["different"] and r["files"] for r in raw.values())
        and same_metrics
        and not record["tree"]["different_other"]
        and not tree["missing"]
        and not tree["extra"]
    )
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "tree"}, indent=1))
    print(
        "tree:",
        {
            k: record["tree"][k]
            for k in ("checked", "identical", "different_code_version", "different_other", "missing", "extra")
        },
    )
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
