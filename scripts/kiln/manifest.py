"""The experiment manifest: everything needed to say, later, how a model was made and how it scored.

Plain functions over values and paths. `code_version` and `package_versions` are cheap and run when
the workflow is parsed (they are rule parameters, so a new commit, a dirty tree or an upgraded
package reruns the manifest); the rest runs in the manifest job.
"""

from __future__ import annotations

import csv
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
from pathlib import Path

from kiln.base_model import sha256_file  # noqa: F401 (also this module's, for callers)

PACKAGES = (
    "torch",
    "transformers",
    "peft",
    "trl",
    "bitsandbytes",
    "accelerate",
    "unsloth",
    "unsloth_zoo",
    "datasets",
    "tokenizers",
    "pandas",
    "pyarrow",
    "snakemake",
)
STAGES = ("collect", "clean", "build_dataset", "tokenize", "base_model", "train", "merge", "evaluate")


def package_versions(names=PACKAGES) -> dict[str, str | None]:
    """Installed version of each package (None where it is not installed), and Python's."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def code_version(repo: str | Path) -> dict:
    """Git commit of the workflow's checkout; when the tree is dirty, a hash of what differs."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True, timeout=30
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None, "note": f"{repo} is not a git checkout (or git is missing)"}
    status = git("status", "--porcelain", "--untracked-files=all")
    out = {"commit": commit, "dirty": bool(status.strip())}
    if out["dirty"]:
        h = hashlib.sha256(git("diff", "HEAD", "--binary").encode())
        for line in status.splitlines():
            if line.startswith("??"):
                path = Path(repo) / line[3:]
                h.update(line.encode() + (path.read_bytes() if path.is_file() else b""))
        out["diff_sha256"] = h.hexdigest()
        out["changed_files"] = [line[3:] for line in status.splitlines()][:50]
    return out


def hardware() -> dict:
    """The machine this runs on: CPU model and cores, memory, and the GPU when torch sees one."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    out: dict = {"cpu": cpu, "cpu_count": os.cpu_count(), "platform": platform.platform()}
    try:
        out["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        pass
    try:
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            out["gpu"] = {
                "name": props.name,
                "count": torch.cuda.device_count(),
                "memory_gb": round(props.total_memory / 2**30, 1),
                "cuda": torch.version.cuda,
            }
        else:
            out["gpu"] = None
    except ImportError:
        out["gpu"] = None
    return out


def tree_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under a folder, by relative path."""
    root = Path(folder)
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


def read_benchmark(path: str | Path) -> dict | None:
    """One Snakemake `benchmark:` TSV -> wall seconds, peak RSS (MB), CPU seconds."""
    path = Path(path)
    if not path.exists():
        return None
    with open(path) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        return None
    row = rows[-1]

    def num(key):
        try:
            return round(float(row[key]), 2)
        except (KeyError, TypeError, ValueError):
            return None

    return {"wall_s": num("s"), "max_rss_mb": num("max_rss"), "cpu_time_s": num("cpu_time")}


def stage_benchmarks(paths: dict[str, list[str]]) -> dict:
    """Stage -> wall time and peak memory (summed over a stage's jobs; peak is the largest)."""
    out = {}
    for stage, files in paths.items():
        runs = [b for b in (read_benchmark(p) for p in files) if b]
        if not runs:
            out[stage] = None
            continue
        out[stage] = {
            "jobs": len(runs),
            "wall_s": round(sum(r["wall_s"] or 0 for r in runs), 2),
            "max_rss_mb": max((r["max_rss_mb"] or 0) for r in runs),
            "cpu_time_s": round(sum(r["cpu_time_s"] or 0 for r in runs), 2),
        }
    return out


def build_manifest(
    experiment: str,
    config: dict,
    dataset_stats: str | Path,
    tokenize_stats: str | Path,
    base_dir: str | Path,
    adapter_dir: str | Path,
    merged_dir: str | Path,
    metrics: str | Path,
    train_summary: str | Path,
    merge_report: str | Path,
    benchmarks: dict[str, list[str]],
    code: dict,
    packages: dict,
) -> dict:
    """Everything about one experiment in one JSON-able dict."""
    exp = config["experiments"][experiment]
    data = json.loads(Path(dataset_stats).read_text())
    tok = json.loads(Path(tokenize_stats).read_text())
    summary = json.loads(Path(train_summary).read_text())
    scores = json.loads(Path(metrics).read_text())
    training = json.loads((Path(adapter_dir) / "kiln_training.json").read_text())
    return {
        "kiln_manifest": 1,
        "experiment": experiment,
        "config": {
            "experiment": exp,
            "dataset": {"name": exp["dataset"], **config["datasets"][exp["dataset"]]},
            "model": {"name": exp["model"], **config["models"][exp["model"]]},
        },
        "data": {
            "splits": data["splits"],
            "rows_in": data["rows_in"],
            "rejected_in_build": data["rows_rejected"],
            "tokenized": {
                split: {k: s[k] for k in ("rows_kept", "tokens", "trainable_tokens", "truncated") if k in s}
                for split, s in tok["splits"].items()
            },
        },
        "base_model": json.loads((Path(base_dir) / "identity.json").read_text()),
        "adapter": {"files": tree_hashes(adapter_dir)},
        "merged": {"files": tree_hashes(merged_dir), "report": json.loads(Path(merge_report).read_text())},
        "training": {
            "backend": training["backend"],
            "backend_reason": training["backend_reason"],
            "compute_dtype": training["compute_dtype"],
            "steps": summary["steps"],
            "tokens_trained": summary["tokens_trained"],
            "first_loss": summary["first_loss"],
            "final_loss": summary["final_loss"],
            "device": summary["device"],
            "hardware": summary.get("hardware"),
        },
        "seeds": {
            "data_split": config["datasets"][exp["dataset"]]["build"]["seed"],
            "training": exp["training"]["seed"],
            "sources": {s["name"]: s["seed"] for s in config["datasets"][exp["dataset"]]["sources"] if "seed" in s},
        },
        "code": code,
        # Versions in the training job's environment (with --sdm conda, envs/model.yaml), and in
        # the environment Snakemake itself ran in (a parameter: a change reruns the manifest).
        "packages": summary.get("packages") or packages,
        "workflow_packages": packages,
        "hardware": hardware(),
        "stages": stage_benchmarks(benchmarks),
        "metrics": scores,
    }


def write_manifest(path: str | Path, manifest: dict) -> None:
    Path(path).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
