"""Reproducibility check: rebuild an experiment from its manifest in an empty folder and compare.

The data stages must reproduce the manifest's split fingerprints exactly (and the base model its
weight hashes); retraining on the CPU with the same seed must reproduce the metrics within
``TOLERANCE``. Each comparison is reported with the two values side by side.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kiln.layout import Layout
from kiln.manifest_record import BaseIdentity, Manifest
from kiln.metrics import scale
from kiln.reports import DatasetStats, Metrics

REPO = Path(__file__).resolve().parents[2]
REBUILT = "results"  # the rebuild's results folder, inside its work folder


@dataclass(frozen=True)
class Tolerance:
    """Stated tolerances for a CPU retrain with the same seed. Training on one machine with the same
    thread count is deterministic in practice; these leave room for another CPU's float rounding
    (one test row of 64 flipping is 0.016 exact match)."""

    loss_rel: float = 0.02  # the loss within 2% relative
    score_abs: float = 0.05  # each task metric within 5% of its scale (0.05 of a rate, 5 chrF points)


TOLERANCE = Tolerance()


@dataclass(frozen=True)
class Check:
    """One comparison of the rebuild with the manifest, the two values side by side."""

    check: str
    manifest: Any
    rebuilt: Any
    ok: bool
    difference: str | None = None

    def line(self) -> str:
        extra = f"  [{self.difference}]" if self.difference else ""
        return (
            f"  {'ok  ' if self.ok else 'FAIL'} {self.check}: manifest {self.manifest} / rebuilt {self.rebuilt}{extra}"
        )


@dataclass(frozen=True)
class ReproResult:
    experiment: str
    workdir: str
    checks: list[Check]
    tolerance: Tolerance = TOLERANCE
    workdir_removed: bool = False  # a temporary rebuild, removed once every check passed

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def to_dict(self) -> dict:
        """What ``kiln repro --json`` prints."""
        checks = [{k: v for k, v in asdict(c).items() if v is not None or k != "difference"} for c in self.checks]
        out = {"experiment": self.experiment, "workdir": self.workdir, "tolerance": asdict(self.tolerance)}
        return {**out, "checks": checks, "ok": self.ok, **({"workdir_removed": True} if self.workdir_removed else {})}


def repro_config(manifest: Manifest, results: str, base_dir: str | Path = ".") -> dict:
    """A Kiln config with only this experiment, its dataset and model, outputs under ``results``
    (the manifest's own config: kiln.reports.ManifestConfig.to_config)."""
    return manifest.config.to_config(manifest.experiment, results, base_dir)


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


def _read_manifest(path: str | Path) -> Manifest:
    """The manifest as a type, refused when any of it would be code (templating) or it is not a
    manifest this Kiln reads."""
    raw = json.loads(Path(path).read_text())
    where = _templating(raw, "manifest")
    if where:
        raise ValueError(f"repro: refused: {path} has templating at {where} (YTE runs code)")
    try:
        return Manifest.from_dict(raw, str(path))
    except ValueError as exc:
        raise ValueError(f"repro: refused: {exc}") from None


def compare_data(manifest: Manifest, rebuilt: DatasetStats) -> list[Check]:
    """One check per split: the rebuilt fingerprint and row count must equal the manifest's."""
    checks = []
    for split, want in manifest.data.splits.items():
        got = rebuilt.splits.get(split)
        same = got is not None and (got.fingerprint, got.rows) == (want.fingerprint, want.rows)
        checks.append(Check(f"data.{split}.fingerprint", want.fingerprint, got and got.fingerprint, same))
    return checks


def compare_base(manifest: Manifest, identity: BaseIdentity) -> list[Check]:
    want, got = manifest.base_model.weights, identity.weights
    return [Check("base_model.weights", want, got, want == got)]


def compare_metrics(manifest: Manifest, metrics: Metrics, tolerance: Tolerance = TOLERANCE) -> list[Check]:
    """The tuned model's test metrics against the manifest's, within the stated tolerances.

    Every task metric the manifest recorded is checked (whatever the task: metrics are data), each
    within ``score_abs`` of its scale (0.05 of a rate, 5 chrF points); the loss within ``loss_rel``.
    """
    want, got = manifest.metrics.tuned, metrics.tuned
    rel = abs(got.loss - want.loss) / max(abs(want.loss), 1e-12)
    difference = f"{rel:.2%} relative (tolerance {tolerance.loss_rel:.0%})"
    checks = [Check("metrics.tuned.loss", want.loss, got.loss, rel <= tolerance.loss_rel, difference)]
    for key in manifest.metrics.task_metric_names:
        if want.value(key) is None or scale(key) is None:
            continue  # a metric without a fixed scale (perplexity) follows the loss, checked above
        allowed = tolerance.score_abs * (scale(key) or 1.0)
        a, b = want.value(key), got.value(key)
        diff = None if b is None else abs(b - a)
        difference = "missing in the rebuild" if diff is None else f"{diff:.4f} (tolerance {allowed:g})"
        checks.append(Check(f"metrics.tuned.{key}", a, b, diff is not None and diff <= allowed, difference))
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
) -> ReproResult:
    """Rebuild from nothing in ``workdir``; return every check (``.ok``: all passed)."""
    manifest = _read_manifest(manifest_path)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    if any((work / "results").iterdir() if (work / "results").exists() else []):
        raise ValueError(f"{work}/results is not empty: a reproducibility check starts from nothing")
    cfg = repro_config(manifest, REBUILT, base_dir)
    refuse_code(cfg)
    # JSON, not YAML: Snakemake reads a JSON config as plain data (YAML may go through YTE templating).
    config_path = work / "config.json"
    config_path.write_text(json.dumps(cfg, indent=1))
    name, exp, tree = manifest.experiment, manifest.config.experiment, Layout(REBUILT)
    data_target, base_target = tree.dataset_stats(exp.dataset), tree.base(exp.model)
    snakemake(work, config_path, [data_target, base_target], cores)
    checks = compare_data(manifest, DatasetStats.read(work / data_target))
    checks += compare_base(manifest, BaseIdentity.read(work / base_target / "identity.json"))
    if train:
        snakemake(work, config_path, [tree.metrics(name)], cores)
        checks += compare_metrics(manifest, Metrics.read(work / tree.metrics(name)))
    return ReproResult(experiment=name, workdir=str(work), checks=checks)


def format_report(result: ReproResult) -> str:
    where = result.workdir + (", removed: every check passed" if result.workdir_removed else "")
    lines = [f"reproducibility of '{result.experiment}' (rebuilt in {where})", *(c.line() for c in result.checks)]
    lines.append("REPRODUCED" if result.ok else "NOT REPRODUCED")
    return "\n".join(lines)
