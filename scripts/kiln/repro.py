"""Reproducibility check: rebuild an experiment from its manifest in an empty folder and compare.

The data stages must reproduce the manifest's split fingerprints exactly (and the base model its
weight hashes); retraining on the CPU with the same seed must reproduce the metrics within
``TOLERANCE``. Each comparison is reported with the two values side by side.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

from kiln.metrics import scale, task_metrics

REPO = Path(__file__).resolve().parents[2]
# Stated tolerances for a CPU retrain with the same seed. Training on one machine with the same
# thread count is deterministic in practice; these leave room for another CPU's float rounding
# (one test row of 64 flipping is 0.016 exact match).
# Loss within 2% relative; each task metric within 5% of its scale (0.05 of a rate, 5 chrF points).
TOLERANCE = {"loss_rel": 0.02, "score_abs": 0.05}


def repro_config(manifest: dict, results: str, base_dir: str | Path = ".") -> dict:
    """A Kiln config with only this experiment, its dataset and model, outputs under ``results``.

    Relative paths of local sources and tokenizer folders are made absolute against ``base_dir``
    (the working directory of the original run), so the rebuild reads the same raw files.
    """
    cfg = manifest["config"]
    exp, dataset, model = copy.deepcopy(cfg["experiment"]), copy.deepcopy(cfg["dataset"]), copy.deepcopy(cfg["model"])
    ds_name, model_name = dataset.pop("name"), model.pop("name")
    for src in dataset["sources"]:
        if src["kind"] == "local" and not os.path.isabs(src["path"]):
            src["path"] = str(Path(base_dir, src["path"]).resolve())
    if (
        model.get("kind") == "random"
        and model.get("tokenizer_from")
        and os.path.isdir(Path(base_dir, model["tokenizer_from"]))
    ):
        model["tokenizer_from"] = str(Path(base_dir, model["tokenizer_from"]).resolve())
    if model.get("kind") == "local" and not os.path.isabs(model.get("path", "/")):
        model["path"] = str(Path(base_dir, model["path"]).resolve())
    harness = exp.get("evaluate", {}).get("lm_eval") or {}
    if harness.get("include_path") and not os.path.isabs(harness["include_path"]):
        harness["include_path"] = str(Path(base_dir, harness["include_path"]).resolve())
    datasets = {ds_name: dataset}
    if cfg.get("regression_datasets"):  # each entry becomes the dataset it named, paths made absolute
        names = []
        for item in cfg["regression_datasets"]:
            extra = copy.deepcopy(item["dataset"])
            name = extra.pop("name")
            for src in extra["sources"]:
                if src["kind"] == "local" and not os.path.isabs(src["path"]):
                    src["path"] = str(Path(base_dir, src["path"]).resolve())
            datasets[name] = extra
            names.append(name)
        exp["evaluate"]["regression"] = names
    return {
        "results": results,
        "datasets": datasets,
        "models": {model_name: model},
        "experiments": {manifest["experiment"]: exp},
    }


def _templating(value, where: str = "config") -> str | None:
    """Where a config would be code rather than data: YTE keys (``__use_yte__``, ``?if ...``) or values."""
    if isinstance(value, dict):
        for key, item in value.items():
            if str(key) == "__use_yte__" or str(key).startswith("?"):
                return f"{where}.{key}"
            found = _templating(item, f"{where}.{key}")
            if found:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found = _templating(item, f"{where}[{i}]")
            if found:
                return found
    elif isinstance(value, str) and value.startswith("?"):
        return where
    return None


def refuse_code(cfg: dict) -> None:
    """A manifest is data someone may have sent you: its config must be a valid Kiln config as plain
    data (no templating, a query that parses as a filter) before anything of it runs."""
    from kiln.config import ConfigError, validate

    where = _templating(cfg)
    if where:
        raise ValueError(f"repro: refused: the manifest's config has templating at {where} (YTE runs code)")
    try:
        validate(cfg)
    except ConfigError as exc:
        raise ValueError(f"repro: refused: the manifest's config is not a valid Kiln config: {exc}") from None


def compare_data(manifest: dict, dataset_stats: dict) -> list[dict]:
    """One check per split: the rebuilt fingerprint and row count must equal the manifest's."""
    checks = []
    for split, want in manifest["data"]["splits"].items():
        got = dataset_stats["splits"].get(split, {})
        checks.append(
            {
                "check": f"data.{split}.fingerprint",
                "manifest": want["fingerprint"],
                "rebuilt": got.get("fingerprint"),
                "ok": got.get("fingerprint") == want["fingerprint"] and got.get("rows") == want["rows"],
            }
        )
    return checks


def compare_base(manifest: dict, identity: dict) -> list[dict]:
    want, got = manifest["base_model"].get("weights"), identity.get("weights")
    return [{"check": "base_model.weights", "manifest": want, "rebuilt": got, "ok": want == got}]


def compare_metrics(manifest: dict, metrics: dict, tolerance: dict = TOLERANCE) -> list[dict]:
    """The tuned model's test metrics against the manifest's, within the stated tolerances.

    Every task metric the manifest recorded is checked (whatever the task: metrics are data), each
    within ``score_abs`` of its scale (0.05 of a rate, 5 chrF points); the loss within ``loss_rel``.
    """
    want, got = manifest["metrics"]["tuned"], metrics["tuned"]
    checks = []
    rel = abs(got["loss"] - want["loss"]) / max(abs(want["loss"]), 1e-12)
    checks.append(
        {
            "check": "metrics.tuned.loss",
            "manifest": want["loss"],
            "rebuilt": got["loss"],
            "difference": f"{rel:.2%} relative (tolerance {tolerance['loss_rel']:.0%})",
            "ok": rel <= tolerance["loss_rel"],
        }
    )
    for key in task_metrics(manifest["metrics"]):
        if key not in want or scale(key) is None:
            continue  # a metric without a fixed scale (perplexity) follows the loss, checked above
        allowed = tolerance["score_abs"] * (scale(key) or 1.0)
        diff = abs(got[key] - want[key]) if key in got else None
        checks.append(
            {
                "check": f"metrics.tuned.{key}",
                "manifest": want[key],
                "rebuilt": got.get(key),
                "difference": "missing in the rebuild" if diff is None else f"{diff:.4f} (tolerance {allowed:g})",
                "ok": diff is not None and diff <= allowed,
            }
        )
    return checks


def snakemake(workdir: Path, config_path: Path, targets: list[str], cores: int) -> None:
    cmd = [
        sys.executable,
        "-m",
        "snakemake",
        "--snakefile",
        str(REPO / "Snakefile"),
        "--directory",
        str(workdir),
        "--configfile",
        str(config_path),
        "--cores",
        str(cores),
        *targets,
    ]
    # The rebuild's own console, passed through as it comes (a retrain takes many minutes: its
    # jobs and progress bars are the progress of this command), and its tail kept for an error.
    print(f"kiln repro: {' '.join(targets)} in {workdir}", file=sys.stderr, flush=True)
    tail: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stderr.write(line)
            tail = (tail + [line])[-200:]
    if proc.returncode:
        raise RuntimeError(f"the rebuild failed ({' '.join(cmd)}):\n{''.join(tail)[-6000:]}")


def reproduce(
    manifest_path: str | Path, workdir: str | Path, train: bool = True, cores: int = 2, base_dir: str | Path = "."
) -> dict:
    """Rebuild from nothing in ``workdir``; return every check and whether all passed."""
    manifest = json.loads(Path(manifest_path).read_text())
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    if any((work / "results").iterdir() if (work / "results").exists() else []):
        raise ValueError(f"{work}/results is not empty: a reproducibility check starts from nothing")
    cfg = repro_config(manifest, "results", base_dir)
    refuse_code(cfg)
    # JSON, not YAML: Snakemake reads a JSON config as plain data (YAML may go through YTE templating).
    config_path = work / "config.json"
    config_path.write_text(json.dumps(cfg, indent=1))
    name = manifest["experiment"]
    exp = cfg["experiments"][name]
    data_target = f"results/data/{exp['dataset']}/dataset_stats.json"
    snakemake(work, config_path, [data_target, f"results/base/{exp['model']}"], cores)
    checks = compare_data(manifest, json.loads((work / data_target).read_text()))
    checks += compare_base(manifest, json.loads((work / "results/base" / exp["model"] / "identity.json").read_text()))
    if train:
        snakemake(work, config_path, [f"results/{name}/metrics.json"], cores)
        checks += compare_metrics(manifest, json.loads((work / f"results/{name}/metrics.json").read_text()))
    return {
        "experiment": name,
        "workdir": str(work),
        "tolerance": TOLERANCE,
        "checks": checks,
        "ok": all(c["ok"] for c in checks),
    }


def format_report(result: dict) -> str:
    where = result["workdir"] + (", removed: every check passed" if result.get("workdir_removed") else "")
    lines = [f"reproducibility of '{result['experiment']}' (rebuilt in {where})"]
    for c in result["checks"]:
        mark = "ok  " if c["ok"] else "FAIL"
        extra = f"  [{c['difference']}]" if "difference" in c else ""
        lines.append(f"  {mark} {c['check']}: manifest {c['manifest']} / rebuilt {c['rebuilt']}{extra}")
    lines.append("REPRODUCED" if result["ok"] else "NOT REPRODUCED")
    return "\n".join(lines)
