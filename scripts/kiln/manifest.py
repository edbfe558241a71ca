"""The experiment manifest: everything needed to say, later, how a model was made and how it scored.

Plain functions over values and paths, run in the manifest job; where the packages, code version
and hardware come from is kiln.provenance.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, fields
from pathlib import Path

from kiln.base_model import sha256_file  # noqa: F401 (also this module's, for callers)
from kiln.manifest_record import DatasetRecord
from kiln.provenance import hardware
from kiln.reports import DatasetStats, GgufReport, ShardStats, TokenizeStats, TrainSummary
from kiln.trained import TrainedAdapter

STAGES = ("collect", "clean", "build_dataset", "tokenize", "base_model", "train", "merge", "export_gguf", "evaluate")


def tree_hashes(folder: str | Path) -> dict[str, str]:
    """sha256 of every file under a folder, by relative path (not Snakemake's empty
    .snakemake_timestamp marker of a directory output: it is no part of a model)."""
    root = Path(folder)
    return {
        str(p.relative_to(root)): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != ".snakemake_timestamp"
    }


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


@dataclass(frozen=True)
class ManifestInputs:
    """The files of one experiment the manifest reads (the manifest rule's inputs, by name)."""

    dataset_stats: str | Path
    tokenize_stats: str | Path
    base: str | Path  # the prepared base model's folder
    adapter: str | Path
    merged: str | Path
    metrics: str | Path
    summary: str | Path  # train_summary.json
    merge_report: str | Path
    shard_stats: tuple = ()
    samples: str | Path | None = None
    gguf_reports: tuple = ()

    @classmethod
    def from_rule(cls, inputs) -> ManifestInputs:
        """From a rule's named inputs (Snakemake's ``input``; lists become tuples)."""
        values = {f.name: getattr(inputs, f.name) for f in fields(cls) if hasattr(inputs, f.name)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def _read(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def _prompt_example(samples: str | Path | None) -> dict | None:
    """The first test conversation, as the model saw it."""
    if not samples or not Path(samples).exists():
        return None
    for line in Path(samples).read_text().splitlines():
        sample = json.loads(line)
        if sample.get("messages"):
            return {"messages": sample["messages"], "reference": sample["reference"]}
    return None


def _data_section(files: ManifestInputs) -> dict:
    data, tok = DatasetStats.read(files.dataset_stats), TokenizeStats.read(files.tokenize_stats)
    return {
        "splits": {k: v.to_dict() for k, v in data.splits.items()},
        "rows_in": data.rows_in,
        "rejected_in_build": data.rows_rejected,
        # url shards: the final URL after redirects, the byte count and the sha256 of what came
        "downloads": [s.download for s in map(ShardStats.read, files.shard_stats) if s.download],
        "tokenized": {split: s.counts() for split, s in tok.splits.items()},
    }


def _training_section(trained: TrainedAdapter, summary: TrainSummary) -> dict:
    return {
        "backend": trained.backend,
        "backend_reason": trained.backend_reason,
        "compute_dtype": trained.compute_dtype,
        "steps": summary.steps,
        "tokens_trained": summary.tokens_trained,
        "first_loss": summary.first_loss,
        "final_loss": summary.final_loss,
        "device": summary.device,
        "hardware": summary.hardware,
    }


def _seeds(dataset: DatasetRecord, trained: TrainedAdapter) -> dict:
    return {
        "data_split": dataset.build.get("seed"),
        "training": trained.training.seed,
        "sources": {s.name: s.seed for s in dataset.sources if "seed" in s.model_fields_set},
    }


def _gguf_reports(paths) -> dict:
    """Each exported GGUF's report as written (file, sha256, converter, verification), by type."""
    raws = {str(p): _read(p) for p in paths}
    # checked as its type (naming the file if it does not fit), kept as written
    return {GgufReport.from_dict(raw, path).type: raw for path, raw in raws.items()}


def build_manifest(
    experiment: str,
    stage_settings: dict,
    files: ManifestInputs,
    benchmarks: dict[str, list[str]],
    code: dict,
    packages: dict,
) -> dict:
    """Everything about one experiment in one JSON-able dict (read back as kiln.reports.Manifest).

    What made the adapter (dataset, model, tokenize and training settings, what training resolved)
    comes from the experiment.json beside it; ``stage_settings`` holds the merge and evaluate
    settings (the rule's parameter).
    """
    trained = TrainedAdapter.read(files.adapter)
    dataset = DatasetRecord.from_dict(trained.dataset, f"{files.adapter}/experiment.json: dataset")
    stage_settings = dict(stage_settings)
    # Each evaluate.regression entry and the dataset it names (kiln repro rebuilds them too).
    regression = stage_settings.pop("regression_datasets", [])
    exp = {
        "dataset": dataset.name,
        "model": trained.model["name"],
        "tokenize": trained.tokenize.to_dict(),
        "training": trained.training.to_dict(),
        **stage_settings,
    }
    summary = TrainSummary.read(files.summary)
    config = {"experiment": exp, "dataset": trained.dataset, "model": trained.model, "regression_datasets": regression}
    return {
        "kiln_manifest": 1,
        "experiment": experiment,
        "prompt_example": _prompt_example(files.samples),
        "config": config,
        "data": _data_section(files),
        "base_model": _read(Path(files.base) / "identity.json"),
        "adapter": {"files": tree_hashes(files.adapter)},
        "merged": {"files": tree_hashes(files.merged), "report": _read(files.merge_report)},
        "gguf": _gguf_reports(files.gguf_reports),
        "training": _training_section(trained, summary),
        "seeds": _seeds(dataset, trained),
        "code": code,
        # Versions in the training job's environment (with --sdm conda, envs/model.yaml), and in
        # the environment Snakemake itself ran in (a parameter: a change reruns the manifest).
        "packages": summary.packages or packages,
        "workflow_packages": packages,
        "hardware": hardware(),
        "stages": stage_benchmarks(benchmarks),
        "metrics": _read(files.metrics),
    }


def write_manifest(path: str | Path, manifest: dict) -> None:
    Path(path).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
